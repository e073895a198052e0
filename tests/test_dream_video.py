"""Dream videos: dreamed poses placed in MuJoCo (objects, IK arm, fingers), the IK miss marker, the video files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mujoco
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from common.policies import Policy
from data_prep.tasks import STATE_SLICES, quat_to_rot6, state_from_obs
from evaluation.arm_ik import ORIENTATION_TOLERANCE, POSITION_TOLERANCE
from evaluation.dream_video import DreamScene, finite_states, object_slots, write_dream_videos
from evaluation.envs import RobosuiteEnv, Start, VideoSpec
from evaluation.records import EpisodeRecord, read_episodes, write_episodes
from evaluation.rollout import rollout
from evaluation.video import RenderingUnavailable, shown_steps

MAGENTA = (200, 80)  # a pixel is the marker's when red and blue exceed 200 and green stays below 80


def observed_state(scene: DreamScene) -> np.ndarray:
    """The scene's state as robosuite observes it (its own sensors, not our pose code)."""
    return state_from_obs(scene.sim.env._get_observations(force_update=True), scene.task)[0]


def magenta_pixels(image: np.ndarray) -> int:
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return int(((r > MAGENTA[0]) & (b > MAGENTA[0]) & (g < MAGENTA[1])).sum())


@pytest.mark.parametrize("task", ["lift", "square", "cubes_green"])
def test_scene_places_the_object_and_fingers_at_the_dreamed_pose(task: str) -> None:
    scene = DreamScene(task, seed=3)
    try:
        state = observed_state(scene)
        rotation = Rotation.from_euler("xyz", [0.4, -0.3, 1.2])
        state[STATE_SLICES["object pos"]] = (0.05, -0.08, 0.95)
        state[STATE_SLICES["object rot"]] = quat_to_rot6(rotation.as_quat())  # x y z w
        state[STATE_SLICES["gripper"]] = (0.02, -0.02)
        frame = scene.pose(state)
        slot = object_slots(task)[0]  # slot 0 (the cubes scene: the red cube; the green one stays where it was)
        assert [s.name for s in object_slots(task)] == {"lift": ["cube"], "square": ["SquareNut"],
                                                          "cubes_green": ["cubeA", "cubeB"]}[task]
        body = scene.model.body(f"{slot.name}_main").id
        np.testing.assert_allclose(scene.data.xpos[body], (0.05, -0.08, 0.95), atol=1e-9)
        np.testing.assert_allclose(scene.data.xmat[body].reshape(3, 3), rotation.as_matrix(), atol=1e-6)
        observed = observed_state(scene)  # read back through robosuite's observations, in the state layout
        for name in ("object pos", "object rot", "gripper"):
            np.testing.assert_allclose(observed[STATE_SLICES[name]], state[STATE_SLICES[name]], atol=1e-5, err_msg=name)
        assert frame.ik.ok  # the arm stays where it was: its own pose is reachable
        np.testing.assert_allclose(observed[STATE_SLICES["eef pos"]], state[STATE_SLICES["eef pos"]], atol=1e-3)
    finally:
        scene.close()


def test_ik_reaches_a_reachable_pose_misses_an_unreachable_one_and_recovers() -> None:
    scene = DreamScene("lift", seed=0)
    try:
        start = observed_state(scene)
        far = start.copy()
        far[STATE_SLICES["eef pos"]] += (0.0, 1.0, 0.0)  # 1 m to the side: beyond the Panda's reach
        for _ in range(10):  # a dream that stays out of reach for a while
            missed = scene.pose(far)
            assert not missed.ik.ok and missed.ik.position_error > POSITION_TOLERANCE
        # The frame after the misses is reached again, though they left the arm twisted against its joint limits
        # (from there alone, the descent stalls 6 cm and 90 degrees off).
        again = scene.pose(start)
        assert again.ik.ok and again.ik.orientation_error < ORIENTATION_TOLERANCE, again.ik

        arm = scene.ik.qpos
        scene.data.qpos[arm] += (0.3, 0.2, -0.2, 0.3, 0.2, -0.3, 0.4)  # another arm pose: its eef pose is reachable
        mujoco.mj_forward(scene.model, scene.data)
        target = observed_state(scene)
        scene.data.qpos[arm] = scene.ik.rest  # solve from the rest posture, far from the answer
        reached = scene.pose(target)
        assert reached.ik.ok and reached.ik.position_error < 1e-3 and reached.ik.orientation_error < 0.1, reached.ik
        observed = observed_state(scene)  # robosuite's own eef observation of the solved arm
        for name in ("eef pos", "eef rot"):
            np.testing.assert_allclose(observed[STATE_SLICES[name]], target[STATE_SLICES[name]], atol=1e-3, err_msg=name)
    finally:
        scene.close()


def test_the_marker_is_drawn_where_ik_misses_and_only_there() -> None:
    scene = DreamScene("lift", seed=0, size=128)
    try:
        state = observed_state(scene)
        reached = scene.pose(state)
        try:
            clean = scene.render(reached)
        except RenderingUnavailable as err:
            pytest.skip(f"no offscreen rendering here: {err}")
        far = state.copy()
        far[STATE_SLICES["eef pos"]] += (0.45, 0.0, 0.25)  # ~11 cm out of reach, in the agentview camera's view
        missed = scene.pose(far)
        assert not missed.ik.ok
        marked = scene.render(missed)
        assert clean.shape == marked.shape == (128, 128, 3)
        assert magenta_pixels(clean) == 0 and magenta_pixels(marked) > 20
    finally:
        scene.close()


class ZeroPolicy(Policy):
    name = "zero"

    def act(self, states, instructions, active):
        return np.zeros((len(states), 7), np.float32)


def test_a_short_dream_video_is_written_beside_the_real_one(tmp_path: Path) -> None:
    import imageio.v2 as imageio

    folder = tmp_path / "videos"
    with RobosuiteEnv("lift", workers=1, video=VideoSpec(folder, episodes=1, prefix="zero", size=128)) as env:
        (real,) = rollout(env, ZeroPolicy(), [Start(seed=0)], ["Lift the red cube"], horizon=4, progress=False)
        notes = env.finish()
    if any("video skipped" in n for n in notes):
        pytest.skip(f"no offscreen rendering here: {notes}")
    steps = len(real.states)
    dream = dataclasses.replace(real, env="dream", std=np.full((steps, 83), 0.01, np.float32),
                                p_success=np.linspace(0, 1, steps, dtype=np.float32))
    dream.states = real.states + np.float32(0.002)  # a dream slightly off the real path
    notes, videos = write_dream_videos([dream], folder, episodes=1, real_prefix="zero", reals=[real], size=128)
    assert notes == [f"dream video written: dream_lift_seed0.mp4, side_by_side_lift_seed0.mp4 (IK reached {steps}/{steps} frames)"]
    alone = list(imageio.get_reader(folder / "dream_lift_seed0.mp4").iter_data())
    both = list(imageio.get_reader(folder / "side_by_side_lift_seed0.mp4").iter_data())
    assert len(alone) == len(both) == steps
    assert alone[0].shape == (128 + 96, 128, 3) and both[0].shape == (128 + 96, 256, 3)
    strip = both[0][128:]
    assert strip.std() > 10  # a plot, not a blank band
    assert np.abs(both[1][128:].astype(int) - both[-1][128:].astype(int)).sum() > 0  # the cursor moves


def test_without_opengl_only_the_video_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluation.dream_video as dream_video

    def no_gl(env: object) -> None:
        raise RuntimeError("no EGL display")

    monkeypatch.setattr(dream_video, "attach_offscreen_context", no_gl)
    states = np.zeros((3, 83), np.float32)
    scene = DreamScene("lift", seed=0)
    states[:] = observed_state(scene)
    scene.close()
    dream = EpisodeRecord("p", "lift", "dream", 0, 0, "i", False, 0.0, 2, None, states, np.zeros((2, 7)))
    notes, videos = write_dream_videos([dream, dream], tmp_path / "videos", episodes=2)
    assert videos == [] and len(notes) == 1 and notes[0].startswith("dream video skipped: offscreen rendering failed")
    assert "no EGL display" in notes[0] and not (tmp_path / "videos").exists()


def test_a_video_stride_films_every_kth_step_and_the_last() -> None:
    assert shown_steps(5, 2) == [0, 2, 4, 5]
    assert shown_steps(4, 2) == [0, 2, 4]
    assert shown_steps(0, 3) == [0]
    assert shown_steps(3, 1) == [0, 1, 2, 3]


def test_a_diverged_dream_is_drawn_up_to_its_last_finite_state() -> None:
    states = np.zeros((5, 83), np.float32)
    states[3, 4] = np.nan
    record = EpisodeRecord("p", "lift", "dream", 0, 0, "i", False, 0.0, 4, "non-finite", states, np.zeros((4, 7)))
    assert len(finite_states(record)) == 3
    record.states = states[:3]
    assert len(finite_states(record)) == 3


def test_records_keep_the_dream_success_probability_and_read_older_folders(tmp_path: Path) -> None:
    states = np.zeros((3, 83), np.float32)
    dream = EpisodeRecord("p", "lift", "dream", 0, 7, "i", True, 0.9, 2, None, states, np.zeros((2, 7)),
                          std=np.ones_like(states), p_success=np.array([0.0, 0.2, 0.7], np.float32), success_step=2)
    real = dataclasses.replace(dream, env="real", std=None, p_success=None)
    write_episodes([dream, real], tmp_path)
    back = {r.env: r for r in read_episodes(tmp_path)}
    np.testing.assert_allclose(back["dream"].p_success, [0.0, 0.2, 0.7], rtol=1e-6)
    assert back["real"].p_success is None and back["real"].std is None
    arrays = dict(np.load(tmp_path / "trajectories.npz"))
    np.savez(tmp_path / "trajectories.npz", **{k: v for k, v in arrays.items() if not k.endswith("__p_success")})
    assert read_episodes(tmp_path)[0].p_success is None  # a folder written before p_success was stored
