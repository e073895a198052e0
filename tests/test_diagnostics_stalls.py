"""benchmarks/diagnostics/stalls.py: finding the step a failed episode stalls at, reading results folders back, and replaying a
real Lift episode whose gripper was driven into the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from common.policies import Policy
from data_prep.tasks import state_from_obs
from evaluation.records import EpisodeRecord, read_episodes, write_episodes

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_stalls", REPO / "benchmarks" / "diagnostics" / "stalls.py")
bs = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bs)


def still_after(moving_steps: int, still_steps: int, speed: float = 0.005) -> np.ndarray:
    """eef positions: `moving_steps` steps along x at `speed` m per step, then `still_steps` steps in place."""
    x = np.r_[np.arange(moving_steps + 1) * speed, np.full(still_steps, moving_steps * speed)]
    return np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=1)


def test_the_stall_starts_where_the_gripper_stops_moving() -> None:
    # 4 mm a step until step 30: from step 28 on, less than 1 cm of motion is left in any 20 steps
    assert bs.stall_step(still_after(30, 100, speed=0.004)) == 28
    # a crawl below 1 cm per 20 steps is a stall from the first step
    assert bs.stall_step(still_after(100, 0, speed=0.0004)) == 0


def test_short_pauses_and_steady_motion_are_not_stalls() -> None:
    assert bs.stall_step(still_after(300, bs.STALL_STEPS - 15)) is None
    assert bs.stall_step(still_after(300, 0)) is None
    assert bs.stall_step(still_after(3, 0)) is None


def record(index: int, success: bool, policy: str = "mlp", length: int = 4) -> EpisodeRecord:
    rng = np.random.default_rng(index)
    return EpisodeRecord(policy=policy, task="lift", env="real", index=index, seed=100 + index,
                         instruction="Lift the red cube", success=success, episode_return=float(success),
                         length=length, error=None, states=rng.normal(size=(length + 1, 83)).astype(np.float32),
                         actions=rng.normal(size=(length, 7)).astype(np.float32), success_step=length if success else None)


def test_results_folders_read_back_as_written(tmp_path: Path) -> None:
    written = [record(0, True), record(1, False, length=6)]
    write_episodes(written, tmp_path)
    read = read_episodes(tmp_path)
    for a, b in zip(written, read, strict=True):
        assert (a.key, a.seed, a.success, a.length, a.success_step) == (b.key, b.seed, b.success, b.length, b.success_step)
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.actions, b.actions)


def test_bad_results_folders_get_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"episodes.jsonl: not found"):
        read_episodes(tmp_path)
    write_episodes([record(0, False)], tmp_path)
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write(json.dumps({"policy": "mlp"}) + "\n")
    with pytest.raises(UserError, match=r"episodes.jsonl:2: not an episode record \(KeyError"):
        read_episodes(tmp_path)
    write_episodes([record(0, False), record(1, False, policy="vla")], tmp_path)
    with pytest.raises(UserError, match="several policies \\(mlp, vla\\); choose one with --policy"):
        bs.failed_episodes(tmp_path, "lift", None)
    with pytest.raises(UserError, match="no real square episodes"):
        bs.failed_episodes(tmp_path, "square", None)
    assert [r.policy for r in bs.failed_episodes(tmp_path, "lift", "vla")] == ["vla"]


def test_dreams_from_stalled_starts_are_matched_by_policy_and_seed() -> None:
    stalled = [record(0, False), record(1, False)]
    dream = replace(record(0, True), env="dream")
    others = [replace(record(0, True), env="dream", policy="vla"), replace(record(2, True), env="dream"),
              replace(record(1, True), env="dream", error="worker died")]
    pooled = replace(record(1, False), env="dream", world_model="wm_b")
    twins = bs.dream_twins([*stalled, dream, *others, pooled], stalled)
    assert {source: [r.seed for r in rs] for source, rs in twins.items()} == {"dream": [100], "dream@wm_b": [101]}


def test_a_gripper_pressed_into_the_table_is_found_there_and_freed_by_lifting() -> None:
    """Drive Lift's open gripper straight down for 60 steps: it stalls on the table, and the replay agrees."""
    from data_prep.sim import make_env

    seed, push_down = 3, np.array([0.0, 0.3, -1.0, 0.0, 0.0, 0.0, -1.0])
    sim = make_env("lift", seed)
    states = [state_from_obs(sim.reset(seed), "lift")[0]]
    for _ in range(60 + bs.STALL_STEPS):
        obs, *_ = sim.env.step(push_down)
        states.append(state_from_obs(obs, "lift")[0])
    episode = EpisodeRecord(policy="scripted", task="lift", env="real", index=0, seed=seed, instruction="Lift the red cube",
                            success=False, episode_return=0.0, length=len(states) - 1, error=None,
                            states=np.asarray(states, np.float32), actions=np.tile(push_down, (len(states) - 1, 1)))
    t = bs.stall_step(episode.states[:, :3])
    assert t is not None and 10 < t < 60
    result = bs.probe(episode, t)
    assert result.replay_error <= bs.REPLAY_TOLERANCE
    assert result.fingers_on_table and not result.fingers_on_object
    assert result.moved["recorded"] < 0.01 < result.moved["lift"]
    assert result.expert_success


class DriftingWorldModel:
    """A stand-in world model: every step moves the end effector `drift` m along x, whatever the action."""

    def __init__(self, drift: float) -> None:
        import torch

        self.drift = drift
        self._param = torch.nn.Parameter(torch.zeros(1))

    def eval(self) -> DriftingWorldModel:
        return self

    def parameters(self):
        return iter([self._param])

    def step(self, state, action, instructions, state_mask=None, prev_state=None):
        import torch

        mean = state.clone()
        mean[:, 0] += self.drift
        zeros = torch.zeros(len(state), 1)
        return mean, torch.zeros_like(state), zeros, zeros


class StillPolicy(Policy):
    name = "mlp"

    def act(self, states, instructions, active):
        return np.zeros((len(states), 7), np.float32)


@pytest.mark.parametrize(("drift", "stays"), [(0.0, True), (0.002, False)])
def test_a_stall_dreamed_from_inside_stays_only_if_the_world_model_holds_the_gripper(drift: float, stays: bool) -> None:
    from data_prep.tasks import STATE_DIM

    eef = still_after(20, 100)
    states = np.zeros((len(eef), STATE_DIM), np.float32)
    states[:, :3] = eef
    episode = EpisodeRecord(policy="mlp", task="lift", env="real", index=0, seed=7, instruction="Lift the red cube",
                            success=False, episode_return=0.0, length=len(states) - 1, error=None,
                            states=states, actions=np.zeros((len(states) - 1, 7), np.float32))
    t = bs.stall_step(episode.states[:, :3])
    assert t is not None and 10 < t <= 20
    [result] = bs.dream_from_stalls(DriftingWorldModel(drift), StillPolicy(), [episode], {7: t})
    # the recorded motion from the stall step on (the last millimetres of the approach, then none)
    assert result.real_cm_per_step == pytest.approx(np.linalg.norm(np.diff(eef[t:], axis=0), axis=1).mean() * 100)
    assert result.dreamed_cm_per_step == pytest.approx(drift * 100, rel=1e-4, abs=1e-6)
    assert result.start_step == t + bs.DREAM_OFFSET
    assert result.dream.length == 400 - result.start_step and not result.dream.success  # lift's horizon: 400
    np.testing.assert_allclose(result.dream.states[0], states[result.start_step])
    assert (bs.stall_step(result.dream.states[:, :3]) == 0) == stays


def dataset_rows(eef: np.ndarray, episode: int, task: str = "lift") -> list[dict]:
    """One row per step of an eef path, as vla-preprocess writes them (state, action, next_state)."""
    from data_prep.tasks import STATE_DIM

    states = np.zeros((len(eef), STATE_DIM), np.float32)
    states[:, :3] = eef
    return [{"task": task, "instruction": "Lift the red cube", "episode": episode, "step": t, "state": states[t],
             "action": np.zeros(7, np.float32), "next_state": states[t + 1], "source": "raw/lift/demo.hdf5"}
            for t in range(len(eef) - 1)]


def test_training_stalls_scores_the_world_models_motion_on_a_datasets_stalled_steps(monkeypatch, capsys) -> None:
    import datasets
    import pandas as pd
    import pyarrow as pa

    stalled, moving = still_after(20, 100), still_after(120, 0)  # only the first one stalls (from step ~18)
    splits = {split: datasets.Dataset(pa.Table.from_pandas(pd.DataFrame(rows)), fingerprint=split) for split, rows in (
        ("train", dataset_rows(stalled, 0)[::-1] + dataset_rows(moving, 1)),  # row order must not matter
        ("validation", dataset_rows(moving, 0)),
    )}
    monkeypatch.setattr("data_prep.preprocess.load_vla_dataset", lambda path: splits)
    t = bs.stall_step(stalled.astype(np.float32))  # the dataset's float32 states
    bs.training_stalls(DriftingWorldModel(0.002), Path("unused"), "lift")
    lines = capsys.readouterr().out.splitlines()
    train = next(line for line in lines if line.startswith("| train"))
    # stall steps: real 0 (the median step is still), dreamed 0.2 cm; before it the arm moved 0.5 cm per step
    assert train == f"| train | 1 | {len(stalled) - 1 - t} | 0.000 | 0.200 | 0.500 | 0.200 |"
    assert next(line for line in lines if line.startswith("| validation")).startswith("| validation | 0 | 0 |")
