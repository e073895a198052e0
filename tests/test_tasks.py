"""The shared state layout: robomimic's object order, 6-D rotations, padding, and clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from common.errors import UserError
from data_prep.tasks import (
    ROBOT_DIM,
    SLOT_DIM,
    STATE_DIM,
    STATE_SLICES,
    get_task,
    quat_to_rot6,
    relative_pose_from_poses,
    state_from_obs,
    state_mask,
    success_from_state,
    task_names,
)
from modeling_geometry import layout_mask


@pytest.mark.parametrize("task", ["lift", "can", "square"])
def test_live_robosuite_observation_follows_robomimic_object_order(task: str) -> None:
    """robosuite 1.5 orders Can/Square's "object-state" relative-pose first; our state must not."""
    from data_prep.sim import make_env

    sim = make_env(task, seed=0)
    obs = sim.reset(7)
    state, mask = state_from_obs(obs, task)
    position_key, quat_key, relative = get_task(task).object_keys[:3]
    np.testing.assert_allclose(state[STATE_SLICES["object pos"]], obs[position_key], rtol=0, atol=1e-6)
    np.testing.assert_allclose(state[STATE_SLICES["object rot"]], quat_to_rot6(obs[quat_key]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(state[STATE_SLICES["object-eef pos"]], obs[relative], rtol=0, atol=1e-6)
    np.testing.assert_allclose(state[STATE_SLICES["eef rot"]], quat_to_rot6(obs["robot0_eef_quat"]), rtol=0, atol=1e-6)
    assert np.abs(obs[relative]).sum() > 0, "object-to-eef entries must be observed after reset, not zeros"
    assert state.shape == mask.shape == (STATE_DIM,)
    assert mask.sum() == (ROBOT_DIM + 12 if task == "lift" else ROBOT_DIM + SLOT_DIM)  # slot 0 only
    np.testing.assert_array_equal(layout_mask(torch.as_tensor(state)).numpy(), mask)  # what an acting policy uses
    assert not state[ROBOT_DIM + SLOT_DIM :].any(), "the other slots of a one-object scene are empty"


def test_rot6_is_the_first_two_rotation_matrix_columns_and_ignores_the_quaternion_sign() -> None:
    quats = Rotation.random(50, random_state=0).as_quat()  # x y z w, as robosuite
    matrices = Rotation.from_quat(quats).as_matrix()
    expected = np.concatenate([matrices[:, :, 0], matrices[:, :, 1]], axis=-1)
    np.testing.assert_allclose(quat_to_rot6(quats), expected, atol=1e-6)
    np.testing.assert_allclose(quat_to_rot6(-quats), expected, atol=1e-6)
    np.testing.assert_array_equal(quat_to_rot6(np.zeros(4)), [1, 0, 0, 0, 1, 0])  # no NaN for robosuite's zeros


def test_a_quaternion_sign_flip_in_the_observation_leaves_the_state_unchanged() -> None:
    """The reason for the layout: robosuite's quaternions jump to -q between steps; the state must not."""
    rng = np.random.default_rng(0)
    obs = {"robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": Rotation.random(random_state=1).as_quat(),
           "robot0_gripper_qpos": rng.normal(size=2),
           "object": np.concatenate([rng.normal(size=3), Rotation.random(random_state=2).as_quat(),
                                     rng.normal(size=3), Rotation.random(random_state=3).as_quat()])}
    flipped = {**obs, "robot0_eef_quat": -obs["robot0_eef_quat"], "object": obs["object"].copy()}
    flipped["object"][3:7] *= -1
    flipped["object"][10:14] *= -1
    np.testing.assert_allclose(state_from_obs(obs, "can")[0], state_from_obs(flipped, "can")[0], atol=1e-6)


def test_lift_object_is_zero_padded_and_masked() -> None:
    obs = {"robot0_eef_pos": np.ones(3), "robot0_eef_quat": np.ones(4), "robot0_gripper_qpos": np.ones(2),
           "object": np.full(10, 2.0)}
    state, mask = state_from_obs(obs, "lift")
    padding = STATE_SLICES["object-eef rot"]
    assert np.all(state[padding] == 0) and np.all(mask[padding] == 0) and np.all(mask[: padding.start] == 1)
    np.testing.assert_array_equal(state[STATE_SLICES["object-eef pos"]], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(mask, state_mask("lift"))


def test_state_of_a_whole_episode_matches_the_state_of_each_step() -> None:
    rng = np.random.default_rng(1)
    episode = {"robot0_eef_pos": rng.normal(size=(5, 3)), "robot0_eef_quat": rng.normal(size=(5, 4)),
               "robot0_gripper_qpos": rng.normal(size=(5, 2)), "object": rng.normal(size=(5, 14))}
    states, masks = state_from_obs(episode, "square")
    assert states.shape == masks.shape == (5, STATE_DIM)
    for t in range(5):
        np.testing.assert_allclose(states[t], state_from_obs({k: v[t] for k, v in episode.items()}, "square")[0], atol=1e-6)


def test_bad_observations_name_the_key_and_the_expected_width() -> None:
    obs = {"robot0_eef_pos": np.ones(3), "robot0_eef_quat": np.ones(4), "robot0_gripper_qpos": np.ones(2)}
    with pytest.raises(UserError, match="missing observation key 'object'"):
        state_from_obs(obs, "can", source="f.hdf5")
    with pytest.raises(UserError, match="'object' has width 9, expected 14"):
        state_from_obs({**obs, "object": np.ones(9)}, "can")
    with pytest.raises(UserError, match="unknown task 'stack'"):
        state_from_obs(obs, "stack")


def expert_at_reset(task: str, seed: int):
    """A live robosuite env of `task` just reset with `seed`, its first observation, and the scripted expert for it."""
    from data_prep.sim import make_env
    from data_prep.tasks import make_expert

    sim = make_env(task, seed=seed)
    obs = sim.reset(seed)
    expert = make_expert(task, seed=seed)
    expert.reset(sim.env)
    return sim.env, obs, expert


@pytest.mark.parametrize("task", ["lift", "can", "square", "cubes_green", "nuts_round", "bins_bread"])
def test_success_from_state_agrees_with_robosuite_along_an_expert_episode(task: str) -> None:
    """The dream's success rule, applied to each observed state, says what the simulator says (env._check_success;
    a scene goal's per-object check). The scene goals' rules read the named object's slot, which the state does not
    name."""
    env, obs, expert = expert_at_reset(task, seed=3)
    if task == "can":  # the constants of can's success_rule (data_prep/tasks.py) are this env's
        np.testing.assert_allclose(env.bin2_pos, [0.1, 0.28, 0.8])
        np.testing.assert_allclose(env.bin_size[:2], [0.39, 0.49])
    if task == "square":
        np.testing.assert_allclose(env.sim.data.body_xpos[env.peg1_body_id], [0.23, 0.1, 0.85])
        np.testing.assert_allclose(env.table_offset, [0, 0, 0.82])
    ours, theirs = [], []
    for _ in range(get_task(task).horizon):
        obs, _, _, _ = env.step(expert.act(obs))
        ours.append(bool(success_from_state(state_from_obs(obs, task)[0], task)))
        sim_success = get_task(task).sim_success
        theirs.append(bool(sim_success(env) if sim_success is not None else env._check_success()))
        if sum(theirs) >= 5:  # a few steps of success after the first
            break
    assert ours == theirs
    assert any(theirs) and not all(theirs)  # both outcomes were checked


@pytest.mark.parametrize("task", ["lift", "can", "square", "cubes_red", "nuts_square", "bins_cereal"])
def test_relative_pose_from_poses_reproduces_robosuites_observation(task: str) -> None:
    """Dreams may derive the object-to-eef block from the poses: the formula must be robosuite's, lag included."""
    env, obs, expert = expert_at_reset(task, seed=5)
    states = [state_from_obs(obs, task)[0]]
    for _ in range(60):  # approach and grasp: the eef moves fast and turns, the object moves once held
        obs, _, _, _ = env.step(expert.act(obs))
        states.append(state_from_obs(obs, task)[0])
    states = np.stack(states)
    prev = np.concatenate([states[:1], states[:-1]])  # a reset is its own previous state
    derived = relative_pose_from_poses(states, prev, task)
    np.testing.assert_allclose(derived, states, atol=1e-5)
    moved = np.linalg.norm(np.diff(states[:, STATE_SLICES["eef pos"]], axis=0), axis=-1).max()
    assert moved > 0.005  # the lag matters only while things move, so they must have moved
    if get_task(task).relative_pose_frame != "world":  # the object of the previous step: the same-step formula is off
        same_step = relative_pose_from_poses(states, states, task)
        assert np.abs(same_step - states).max() > 1e-3
    rest = relative_pose_from_poses(states[:1], states[:1], task)
    np.testing.assert_array_equal(rest[:, : STATE_SLICES["object-eef pos"].start], states[:1, : STATE_SLICES["object-eef pos"].start])


def test_each_task_names_a_relative_pose_frame_that_the_world_model_knows() -> None:
    """The trainer copies TaskSpec.relative_pose_frame into WorldModelConfig.relative_pose_frames, which checks it."""
    from configuration_vla import RELATIVE_POSE_FRAMES, WorldModelConfig

    frames = {name: get_task(name).relative_pose_frame for name in task_names()}
    assert {name: frames[name] for name in ("lift", "can", "square")} == {"lift": "world", "can": "eef_lagged",
                                                                          "square": "eef_lagged"}
    assert frames["cubes_red"] == frames["cubes_green"] == "world" and frames["bins_milk"] == "eef_lagged"
    assert set(frames.values()) <= set(RELATIVE_POSE_FRAMES)
    assert WorldModelConfig(derive_relative_pose=True, relative_pose_frames=frames).relative_pose_frames == frames


def test_a_task_is_registered_once_and_must_fit_the_state() -> None:
    from data_prep.tasks import register_task

    lift = get_task("lift")
    with pytest.raises(ValueError, match="'lift' is registered already"):
        register_task(lift)
    with pytest.raises(ValueError, match="do not fit the state's 4 object slots of 18"):
        register_task(dataclasses.replace(lift, name="wide", object_dim=20))
    with pytest.raises(ValueError, match="do not fit the state's 4 object slots of 18"):
        register_task(dataclasses.replace(lift, name="crowded", object_dim=50, slot_widths=(10,) * 5))
    with pytest.raises(ValueError, match="slot_widths .* do not add up to object_dim 10"):
        register_task(dataclasses.replace(lift, name="odd", slot_widths=(4, 4)))
    assert not {"wide", "crowded", "odd"} & set(task_names())


def test_a_plugin_that_cannot_be_imported_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLA_PLUGINS", "lift_plugin_that_does_not_exist")
    with pytest.raises(UserError, match="VLA_PLUGINS: cannot import plugin module 'lift_plugin_that_does_not_exist'"):
        get_task("lift")
    monkeypatch.delenv("VLA_PLUGINS")
    assert get_task("lift").instruction == "Lift the red cube"


def test_the_task_registry_loads_without_the_simulator_or_the_experts() -> None:
    """The dream-only Space reads the registry where robosuite (and scipy, which the experts need) may be missing."""
    import subprocess
    import sys

    from data_prep.tasks import make_expert

    code = ("import sys, data_prep.tasks as t; t.get_task('lift').instruction; "
            "print(sorted(m for m in ('robosuite', 'scipy', 'data_prep.experts') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
    assert type(make_expert("lift", seed=0)).__name__ == "LiftExpert"  # built from its class when asked
