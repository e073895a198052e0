"""vla-generate: scripted experts in robosuite -> robomimic HDF5 (real simulator, one short demo per task).

The committed fixtures tests/fixtures/tiny_<task>.hdf5 were made with this command (then renamed):

    vla-generate demos --tasks lift --episodes 2 --out <tmp> --workers 1 --seed 0
    vla-generate demos --tasks can square --episodes 1 --out <tmp> --workers 1 --seed 0
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import robosuite
import torch

from common.errors import UserError, run_cli
from data_prep.generate import (
    OBS_KEYS,
    OUTPUT_NAME,
    Perturbation,
    RolloutSettings,
    generate,
    generate_task,
    perturb_probs,
)
from data_prep.robomimic_io import Episode, read_robomimic_hdf5, write_robomimic_hdf5
from data_prep.sim import make_env
from data_prep.tasks import STATE_DIM, get_task, make_expert, state_from_obs, task_names

FIXTURES = Path(__file__).parent / "fixtures"
TASK_NAMES = sorted(task_names())
OBS_WIDTHS = {
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_gripper_qpos": 2,
    "robot0_joint_pos": 7,
    "robot0_joint_pos_cos": 7,
    "robot0_joint_pos_sin": 7,
    "robot0_joint_vel": 7,
    "robot0_gripper_qvel": 2,
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One demo per task, generated in this process through the CLI function."""
    out = tmp_path_factory.mktemp("raw")
    report = out / "report.json"
    generate(["demos", "--tasks", *TASK_NAMES, "--episodes", "1", "--out", str(out), "--workers", "1", "--seed", "0",
              "--no-progress", "--report", str(report)])
    return {"out": out, "report": report, **{task: out / task / OUTPUT_NAME for task in TASK_NAMES}}


def solves_task(env, model_file: str, state: np.ndarray, task: str) -> bool:
    """Ask the simulator, loaded with the demo's own model, whether `state` solves the task (a scene goal: its own
    per-object check)."""
    env.reset_from_xml_string(model_file)
    env.sim.set_state_from_flattened(state)
    env.sim.forward()
    sim_success = get_task(task).sim_success
    return bool(sim_success(env) if sim_success is not None else env._check_success())


def check_robomimic_layout(path: Path, task: str) -> None:
    spec = get_task(task)
    widths = {**OBS_WIDTHS, "object": spec.object_dim}
    env = make_env(task).env
    with h5py.File(path, "r") as f:
        data = f["data"]
        demos = sorted(data.keys())
        assert demos and all(name.startswith("demo_") for name in demos)
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["env_name"] == spec.env_name
        assert env_args["env_version"] == robosuite.__version__
        assert env_args["type"] == 1
        kwargs = env_args["env_kwargs"]
        assert kwargs["robots"] == ["Panda"] and kwargs["control_freq"] == 20
        assert kwargs["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        assert kwargs["use_object_obs"] and not kwargs["use_camera_obs"] and not kwargs["has_offscreen_renderer"]
        assert not kwargs["reward_shaping"]
        total = 0
        for name in demos:
            demo = data[name]
            steps = int(demo.attrs["num_samples"])
            total += steps
            assert steps > 10
            assert demo.attrs["model_file"].startswith("<mujoco")
            for group in ("obs", "next_obs"):
                assert set(demo[group].keys()) == set(OBS_KEYS)
                for key, width in widths.items():
                    assert demo[group][key].shape == (steps, width), (group, key)
            # next_obs is the following step's obs
            for key in OBS_KEYS:
                np.testing.assert_array_equal(demo["next_obs"][key][:-1], demo["obs"][key][1:])
            actions = demo["actions"][:]
            assert actions.shape == (steps, 7) and np.all(np.abs(actions) <= 1.0)
            rewards, dones = demo["rewards"][:], demo["dones"][:]
            assert rewards.shape == dones.shape == (steps,)
            assert rewards[-1] == 1.0 and set(np.unique(rewards)) <= {0.0, 1.0}
            assert dones[-1] == 1 and dones.sum() == 1
            assert demo["states"].ndim == 2 and len(demo["states"]) == steps
            # every kept demo is a success according to the simulator itself, and did not start solved
            assert solves_task(env, demo.attrs["model_file"], demo["states"][-1], task)
            assert not solves_task(env, demo.attrs["model_file"], demo["states"][0], task)
        assert int(data.attrs["total"]) == total
        train = {n.decode() for n in f["mask/train"][:]}
        valid = {n.decode() for n in f["mask/valid"][:]}
        assert train | valid == set(demos) and not train & valid
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generated_file_has_robomimic_layout(generated: dict[str, Path], task: str) -> None:
    check_robomimic_layout(generated[task], task)
    assert [p.name for p in generated[task].parent.iterdir()] == [OUTPUT_NAME]  # no temp files left behind


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generated_file_reads_back_into_the_shared_state(generated: dict[str, Path], task: str) -> None:
    file = read_robomimic_hdf5(generated[task])
    assert file.task == task and len(file) == 1
    episode = next(iter(file))
    state, mask = state_from_obs(episode.obs, task)
    assert state.shape == (len(episode), STATE_DIM) and np.isfinite(state).all()


def test_report_records_the_measurement(generated: dict[str, Path]) -> None:
    report = json.loads(generated["report"].read_text())
    assert set(report["tasks"]) == set(TASK_NAMES)
    for task in TASK_NAMES:
        stats = report["tasks"][task]
        assert stats["successes"] == 1 and stats["attempts"] >= 1
        assert stats["success_rate"] == pytest.approx(stats["successes"] / stats["attempts"])
        with h5py.File(generated[task], "r") as f:
            assert stats["mean_length"] == f["data"].attrs["total"]


def test_same_seed_same_demos_regardless_of_workers(tmp_path: Path) -> None:
    settings = RolloutSettings(task="lift", horizon=get_task("lift").horizon)
    first, _ = generate_task(settings, episodes=2, seed=5, workers=1, progress=False)
    again, _ = generate_task(settings, episodes=2, seed=5, workers=2, progress=False)
    other, _ = generate_task(settings, episodes=1, seed=6, workers=1, progress=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.states, b.states)
    # seed 6 is the second attempt of the seed-5 run, and a different episode from seed 5
    np.testing.assert_array_equal(other[0].actions, first[1].actions)
    assert not np.allclose(first[0].states[0], first[1].states[0])


def test_failed_attempts_are_not_kept(tmp_path: Path) -> None:
    # 5 steps cannot solve lift: every attempt fails, nothing is written, the error says why in one line
    with pytest.raises(UserError, match="too few successful demos.*lift \\(0/1\\)"):
        generate(["demos", "--tasks", "lift", "--episodes", "1", "--max-attempts", "2", "--horizon", "5",
                  "--out", str(tmp_path), "--workers", "1", "--no-progress"])
    assert not (tmp_path / "lift").exists() or not any((tmp_path / "lift").iterdir())


def test_unknown_task_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="unknown task 'stack'"):
        generate(["demos", "--tasks", "lift", "stack", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: generate(["play", "--tasks", "stack", "--out", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'stack'") and "\n" not in err
    with pytest.raises(UserError, match="unknown task 'stack'"):
        make_expert("stack")


def test_bad_counts_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--episodes"):
        generate(["demos", "--tasks", "lift", "--episodes", "0", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--max-attempts"):
        generate(["demos", "--tasks", "lift", "--episodes", "3", "--max-attempts", "2", "--out", str(tmp_path)])


def test_expert_acts_as_a_policy_on_a_fresh_env() -> None:
    sim = make_env("lift", seed=0)
    try:
        obs = sim.reset(seed=3)
        expert = make_expert("lift", seed=3)
        expert.reset(sim.env)
        for _ in range(get_task("lift").horizon):
            action = expert(obs)
            assert action.shape == (7,) and np.all(np.abs(action) <= 1.0)
            obs, _, _, _ = sim.env.step(action)
            if sim.success():
                break
        assert sim.success()
    finally:
        sim.env.close()


FIXTURE_TASKS = sorted(path.stem.removeprefix("tiny_") for path in FIXTURES.glob("tiny_*.hdf5"))


def test_every_default_task_and_one_scene_has_a_committed_fixture() -> None:
    assert {"lift", "can", "square", "cubes_red"} <= set(FIXTURE_TASKS) <= set(TASK_NAMES)


@pytest.mark.parametrize("task", FIXTURE_TASKS)
def test_committed_fixture_is_a_valid_generated_file(task: str) -> None:
    path = FIXTURES / f"tiny_{task}.hdf5"
    assert path.stat().st_size < 300_000
    check_robomimic_layout(path, task)


# ----- play data: perturbation bursts and kept failures ---------------------------------------------
# Lift, horizon 60, a burst of 5-10 random steps with chance 0.05 per step: seeds 3 and 5 still succeed, 4 fails.
PLAY_ARGS = ["play", "--tasks", "lift", "--episodes", "3", "--seed", "3", "--horizon", "60",
             "--perturb-prob", "0.05", "--perturb-steps", "5", "10", "--no-progress"]
PLAY_SETTINGS = RolloutSettings(task="lift", horizon=60, keep_failures=True, perturbation=Perturbation(0.05, 5, 10))


def stored(episode: Episode) -> Episode:
    """An in-memory episode with its arrays in the dtypes the HDF5 file stores."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.hdf5"
        write_robomimic_hdf5(path, [episode], {"env_name": "Lift", "type": 1, "env_kwargs": {}}, valid_fraction=0.0)
        return next(iter(read_robomimic_hdf5(path)))


def h5_contents(path: Path) -> dict[str, object]:
    """Every dataset and attribute of an HDF5 file, by path (attributes as 'group@name')."""
    contents: dict[str, object] = {}

    def visit(name: str, obj) -> None:
        for key, value in obj.attrs.items():
            contents[f"{name}@{key}"] = value
        if isinstance(obj, h5py.Dataset):
            contents[name] = obj[()]

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return contents


def test_no_perturbation_writes_exactly_the_committed_expert_file(tmp_path: Path) -> None:
    # the fixture predates play mode and the expert labels: `demos` must still write the same file, value by value,
    # plus each demo's noise-free `expert_actions`
    generate(["demos", "--tasks", "lift", "--episodes", "2", "--out", str(tmp_path), "--workers", "1", "--seed", "0",
              "--no-progress"])
    new, old = h5_contents(tmp_path / "lift" / OUTPUT_NAME), h5_contents(FIXTURES / "tiny_lift.hdf5")
    labels = {key for key in new if key.endswith("/expert_actions")}
    assert labels == {"data/demo_0/expert_actions", "data/demo_1/expert_actions"}
    assert new.keys() - labels == old.keys()
    for key, value in old.items():
        if key.endswith("@model_file"):  # MuJoCo XML with absolute asset paths into this checkout's robosuite
            new[key], value = (without_install_prefix(str(v)) for v in (new[key], value))
        if np.asarray(value).dtype.kind == "f":  # last-bit rounding differs between CPUs (Intel vs AMD BLAS kernels)
            np.testing.assert_allclose(new[key], value, rtol=0, atol=1e-9, err_msg=key)
        else:
            np.testing.assert_array_equal(new[key], value, err_msg=key)
    for key in labels:
        executed, label = new[key.replace("expert_actions", "actions")], new[key]
        np.testing.assert_array_equal(label[:, 6], executed[:, 6])  # the gripper command carries no noise
        inside = np.abs(executed[:, :6]) < 1.0  # entries the final clip to [-1, 1] left alone
        noise = (executed[:, :6] - label[:, :6])[inside]
        assert 0.035 < noise.std() < 0.065 and abs(noise.mean()) < 0.01  # the expert's N(0, 0.05) exploration noise


def without_install_prefix(xml: str) -> str:
    return re.sub(r'file="[^"]*/robosuite/', 'file="robosuite/', xml)


@pytest.fixture(scope="module")
def play(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("raw_play")
    report = out / "report.json"
    generate([*PLAY_ARGS, "--out", str(out), "--workers", "1", "--report", str(report)])
    return {"out": out, "file": out / "lift" / OUTPUT_NAME, "report": report}


def test_play_file_keeps_failures_with_no_done(play: dict[str, Path]) -> None:
    file = read_robomimic_hdf5(play["file"])
    assert file.origin == "generated (play)"
    episodes = list(file)
    assert len(episodes) == 3
    failed = [e for e in episodes if e.dones[-1] == 0]
    solved = [e for e in episodes if e.dones[-1] == 1]
    assert len(failed) == 1 and len(solved) == 2
    for episode in failed:  # ran to the horizon; a time limit is not a done, and it never succeeded
        assert len(episode) == 60 and not episode.dones.any() and not episode.rewards.any()
    for episode in solved:  # successes keep the expert-demo labels
        assert episode.dones.sum() == 1 and episode.rewards[-1] == 1.0
    with h5py.File(play["file"], "r") as f:
        attrs = f["data"].attrs
        assert bool(attrs["keep_failures"]) and attrs["perturb_prob"] == 0.05
        # lists are stored as JSON text, like demo_seeds
        assert json.loads(attrs["perturb_steps"]) == [5, 10] and json.loads(attrs["failed_seeds"]) == [4]
    stats = json.loads(play["report"].read_text())["tasks"]["lift"]
    assert (stats["attempts"], stats["successes"], stats["kept_successes"], stats["kept_failures"]) == (3, 2, 2, 1)
    assert stats["perturb_bursts"] > 0


def test_bursts_replace_actions_but_leave_the_expert_untouched(play: dict[str, Path]) -> None:
    plain = RolloutSettings(task="lift", horizon=60, keep_failures=True)
    expert, _ = generate_task(plain, episodes=3, seed=3, workers=1, progress=False)
    perturbed = list(read_robomimic_hdf5(play["file"]))
    for ours, theirs in zip(perturbed, expert, strict=True):
        theirs = stored(theirs)
        np.testing.assert_array_equal(ours.states[0], theirs.states[0])  # same initial state
        differ = np.flatnonzero(np.any(ours.actions[: len(theirs)] != theirs.actions[: len(ours)], axis=1))
        if len(differ):  # up to the first burst, the very same (noisy) expert actions
            first = differ[0]
            np.testing.assert_array_equal(ours.actions[:first], theirs.actions[:first])
            # a burst is one random move held for >= 5 steps, which the noisy expert never repeats
            np.testing.assert_array_equal(ours.actions[first:first + 5], np.repeat(ours.actions[first:first + 1], 5, 0))
            assert np.abs(ours.actions[first, 3:6]).max() <= 0.5
    assert any(len(o) != len(t) or not np.array_equal(o.actions, stored(t).actions)
               for o, t in zip(perturbed, expert, strict=True))


def test_play_labels_are_the_experts_correction_not_the_burst(play: dict[str, Path]) -> None:
    from data_prep.generate import Perturber

    for seed, episode in zip((3, 4, 5), read_robomimic_hdf5(play["file"]), strict=True):
        # the bursts' generator depends on the seed alone: replay it to find the burst steps
        bursts, expert_turn = Perturber(PLAY_SETTINGS.perturbation, seed), object()
        in_burst = np.array([bursts(expert_turn) is not expert_turn for _ in range(len(episode))])
        assert in_burst.any() or seed != 4
        outside = ~in_burst
        # outside bursts the executed action is the label plus the expert's small noise
        np.testing.assert_array_equal(episode.actions[outside, 6], episode.expert_actions[outside, 6])
        assert np.abs(episode.actions[outside, :6] - episode.expert_actions[outside, :6]).max() < 0.3
        # inside, the executed move is held while the expert's label keeps correcting
        if in_burst.any():
            assert np.abs(episode.actions[in_burst, :6] - episode.expert_actions[in_burst, :6]).max() > 0.3


def test_play_is_reproducible_and_independent_of_workers(play: dict[str, Path]) -> None:
    again, _ = generate_task(PLAY_SETTINGS, episodes=3, seed=3, workers=2, progress=False)
    for ours, theirs in zip(read_robomimic_hdf5(play["file"]), map(stored, again), strict=True):
        np.testing.assert_array_equal(ours.actions, theirs.actions)
        np.testing.assert_array_equal(ours.states, theirs.states)
        np.testing.assert_array_equal(ours.dones, theirs.dones)


def test_play_failures_become_unsuccessful_dataset_rows(play: dict[str, Path], tmp_path: Path) -> None:
    from data_prep.preprocess import collect

    rows = collect([play["file"]], seed=0, valid_fraction=0.4).columns
    every = {key: np.concatenate([rows[s][key] for s in rows]) for key in ("episode", "success", "done")}
    per_episode = {e: every["success"][every["episode"] == e] for e in np.unique(every["episode"])}
    assert sorted(int(flags.any()) for flags in per_episode.values()) == [0, 1, 1]
    assert every["done"].sum() == 2


def test_per_task_perturbation_probability() -> None:
    assert perturb_probs(["0"], ["lift", "can"]) == {"lift": 0.0, "can": 0.0}
    assert perturb_probs(["0.02", "lift=0.06", "square=0.01"], ["lift", "can"]) == {"lift": 0.06, "can": 0.02}
    # by default each task's registered level; TASK=P changes that task alone
    assert perturb_probs(None, ["lift", "can"]) == {"lift": get_task("lift").play_perturb_prob, "can": 0.02}
    assert perturb_probs(["lift=0.1"], ["lift", "square"]) == {"lift": 0.1, "square": 0.01}


@pytest.mark.parametrize(("flags", "message"), [
    (["--perturb-prob", "1.5"], "--perturb-prob must be in \\[0, 1\\], got 1.5"),
    (["--perturb-prob", "-0.1"], "--perturb-prob must be in \\[0, 1\\], got -0.1"),
    (["--perturb-prob", "lift=2"], "--perturb-prob must be in \\[0, 1\\], got lift=2"),
    (["--perturb-prob", "often"], "--perturb-prob 'often': expected a number"),
    (["--perturb-prob", "stack=0.1"], "unknown task 'stack'"),
    (["--perturb-steps", "20", "5"], "--perturb-steps LO HI must satisfy 1 <= LO <= HI, got 20 5"),
    (["--perturb-steps", "-3", "5"], "--perturb-steps LO HI must satisfy 1 <= LO <= HI, got -3 5"),
])
def test_bad_play_settings_are_one_line_errors(flags: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["play", "--tasks", "lift", "--episodes", "3", "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(UserError, match=message):
        generate(argv)
    with pytest.raises(SystemExit):
        run_cli(lambda: generate(argv))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


# ----- DAgger data: a policy drives the first steps, the expert takes over ----------------------------
DAGGER_ARGS = ["dagger", "--tasks", "lift", "--episodes", "3", "--seed", "3", "--handover-steps", "30", "--no-progress"]


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from configuration_vla import MLPPolicyConfig
    from modeling_vla import MLPPolicy

    folder = tmp_path_factory.mktemp("policy") / "mlp"
    torch.manual_seed(0)
    MLPPolicy(MLPPolicyConfig(hidden_dim=16, num_layers=1, chunk_size=4, tasks=["lift"])).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("on_stall", [False, True])
def test_policy_drives_then_the_expert_takes_over_from_its_state(random_policy: Path, tmp_path: Path,
                                                                  on_stall: bool) -> None:
    from common.policies import ChunkPolicy
    from common.saved_models import load_model

    report = tmp_path / "report.json"
    generate([*DAGGER_ARGS, "--out", str(tmp_path), "--workers", "1", "--policy", str(random_policy),
              "--report", str(report), *(["--handover-on-stall"] if on_stall else [])])
    source = read_robomimic_hdf5(tmp_path / "lift" / OUTPUT_NAME)
    stats = json.loads(report.read_text())["tasks"]["lift"]
    assert source.attrs["driver_policy"] == str(random_policy) and source.attrs["handover_steps"] == 30
    assert bool(source.attrs["handover_on_stall"]) is on_stall
    assert source.origin == "generated (DAgger)"
    assert json.loads(source.attrs["handovers"]) == stats["handovers"] and len(stats["handovers"]) == 3
    assert max(stats["handovers"]) <= 30
    if not on_stall:
        assert len(set(stats["handovers"])) > 1  # a random share for the policy
    policy = ChunkPolicy(load_model(random_policy, "--policy", "cpu"))
    sim = make_env("lift")
    for seed, steps, episode in zip(json.loads(source.attrs["demo_seeds"]), stats["handovers"], source, strict=True):
        # replaying the policy for its share of the steps gives the episode's first recorded state
        obs = sim.reset(seed)
        policy.reset(1)
        for _ in range(steps):
            action = policy.act(state_from_obs(obs, "lift")[0][None], [get_task("lift").instruction], np.ones(1, bool))
            obs, _, _, _ = sim.env.step(np.asarray(action[0], dtype=np.float64))
        np.testing.assert_allclose(episode.states[0], sim.env.sim.get_state().flatten(), atol=1e-9)
        # from there on the expert drove (label = executed action up to its noise) and solved the task
        np.testing.assert_array_equal(episode.expert_actions[:, 6], episode.actions[:, 6])
        assert np.abs(episode.expert_actions - episode.actions).max() < 0.3
        assert episode.dones[-1] == 1 and episode.rewards[-1] > 0
    sim.env.close()


def test_policy_rollouts_record_the_policys_whole_episode_failures_kept(random_policy: Path, tmp_path: Path) -> None:
    from common.policies import ChunkPolicy
    from common.saved_models import load_model

    horizon = 25
    generate(["rollouts", "--tasks", "lift", "--episodes", "2", "--seed", "5", "--horizon", str(horizon), "--no-progress",
              "--out", str(tmp_path), "--workers", "1", "--policy", str(random_policy)])
    source = read_robomimic_hdf5(tmp_path / "lift" / OUTPUT_NAME)
    assert source.origin == "generated (policy)" and source.attrs["rollout_policy"] == str(random_policy)
    episodes = list(source)
    assert len(episodes) == 2 and json.loads(source.attrs["demo_seeds"]) == [5, 6]
    policy = ChunkPolicy(load_model(random_policy, "--policy", "cpu"))
    sim = make_env("lift")
    for seed, episode in zip([5, 6], episodes, strict=True):
        # a random policy fails: the whole horizon is kept, with no done, and the label is the executed action
        assert len(episode) == horizon and episode.dones.sum() == 0
        np.testing.assert_array_equal(episode.expert_actions, episode.actions)
        obs = sim.reset(seed)  # replaying the policy from the seed's reset reproduces the recorded states
        np.testing.assert_allclose(episode.states[0], sim.env.sim.get_state().flatten(), atol=1e-9)
        policy.reset(1)
        for t in range(horizon):
            action = policy.act(state_from_obs(obs, "lift")[0][None], [get_task("lift").instruction], np.ones(1, bool))
            np.testing.assert_allclose(episode.actions[t], action[0], atol=1e-6)
            obs, _, _, _ = sim.env.step(np.asarray(action[0], dtype=np.float64))
    sim.env.close()


def test_stall_handover_comes_when_the_gripper_stops(random_policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_prep.generate import STALL_HANDOVER_STEPS, LearnerDriver
    from data_prep.stalls import STALL_WINDOW

    sim = make_env("lift")
    still = np.r_[np.zeros(6), -1.0]  # OSC holds the pose: the eef does not move
    for on_stall, expected in [(True, STALL_WINDOW + STALL_HANDOVER_STEPS - 1), (False, 60)]:
        driver = LearnerDriver(str(random_policy), "lift", handover_steps=60, on_stall=on_stall)
        monkeypatch.setattr(driver, "act", lambda obs: still)
        if on_stall:
            assert driver.steps_for(7) == 60  # the cap: the stall decides when to hand over
        _, solved, steps = driver.roll_in(sim, sim.reset(7), 60)
        assert (solved, steps) == (False, expected)
    # a gripper that keeps moving is never handed over early
    driver = LearnerDriver(str(random_policy), "lift", handover_steps=60, on_stall=True)
    moves = iter([np.r_[0.0, 0.0, 0.3 * (-1) ** (t // 20), 0.0, 0.0, 0.0, -1.0] for t in range(60)])
    monkeypatch.setattr(driver, "act", lambda obs: next(moves))
    assert driver.roll_in(sim, sim.reset(7), 60)[1:] == (False, 60)
    sim.env.close()


def test_online_stall_check_agrees_with_the_episode_one() -> None:
    from data_prep.stalls import STALL_STEPS, STALL_WINDOW, stall_step, stalled_for

    path = np.zeros((200, 3))
    path[:, 0] = 0.01 * np.minimum(np.arange(200), 99)  # 1 cm a step up to step 99, then still
    assert stall_step(path) == 99
    first = next(t for t in range(len(path)) if stalled_for(path[: t + 1], STALL_STEPS))
    assert first == 99 + STALL_WINDOW + STALL_STEPS - 1  # STALL_STEPS still windows after the stall step
    assert not stalled_for(path[:120], 5)


def test_expert_resumes_a_grasp_it_did_not_make() -> None:
    sim = make_env("lift")
    obs = sim.reset(1)
    expert = make_expert("lift", seed=1)
    expert.reset(sim.env)
    while expert.phase != "lift":  # the expert closes its fingers on the cube, still on the table
        obs, _, _, _ = sim.env.step(expert.act(obs))
    fresh = make_expert("lift", seed=2)
    fresh.reset(sim.env)
    fresh.resume(obs)
    assert fresh.phase == "lift" and fresh.grasped()
    assert fresh.act(obs)[6] == 1.0  # keeps the fingers closed and lifts
    start = sim.reset(1)
    fresh.resume(start)
    assert fresh.phase == "above" and not fresh.grasped()
    sim.env.close()


@pytest.mark.parametrize(("mode", "flags", "message"), [
    ("dagger", ["--policy", "{missing}"], "--policy .*missing: folder not found"),
    ("rollouts", ["--policy", "{missing}"], "--policy .*missing: folder not found"),
    ("dagger", ["--policy", "{policy}", "--handover-steps", "-1"], "--handover-steps must be >= 0, got -1"),
    ("dagger", ["--policy", "{policy}", "--tasks", "can"], "tasks \\['lift'\\] do not include \\['can'\\]"),
    ("rollouts", ["--policy", "{policy}", "--tasks", "can"], "tasks \\['lift'\\] do not include \\['can'\\]"),
])
def test_bad_dagger_settings_are_one_line_errors(mode: str, flags: list[str], message: str, random_policy: Path,
                                                 tmp_path: Path) -> None:
    flags = [f.format(policy=random_policy, missing=tmp_path / "missing") for f in flags]
    argv = [mode, "--tasks", "lift", "--episodes", "2", "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(UserError, match=message):
        generate(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["demos", "--policy", "p"],  # a policy drives only in dagger and rollouts
    ["demos", "--perturb-prob", "0.1"],  # bursts only in play
    ["play", "--max-attempts", "9"],  # play keeps every attempt: nothing to give up on
    ["dagger", "--tasks", "lift"],  # no --policy
    ["rollouts", "--policy", "p", "--handover-steps", "5"],  # the policy drives whole episodes
    ["rollouts", "--policy", "p", "--noise", "0.1"],  # the expert does not act
    ["--tasks", "lift"],  # no mode
])
def test_each_mode_takes_only_its_own_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from data_prep.generate import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and "vla-generate" in capsys.readouterr().err
