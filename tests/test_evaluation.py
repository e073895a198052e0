"""Evaluation: metrics, the rollout loop, action chunking, dreams, real simulators, the vla-rollout CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.policies import ChunkExecution, ChunkPolicy, Policy
from data_prep.tasks import STATE_DIM, STATE_LAYOUT
from evaluation.envs import DreamEnv, RobosuiteEnv, Start, StepResult
from evaluation.expert_policy import ExpertPolicy
from evaluation.metrics import OBJECT_POS, agreement, summarize, wilson_interval
from evaluation.records import EpisodeRecord
from evaluation.rollout import rollout

torch.set_num_threads(1)
INSTRUCTION = "Lift the red cube"


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_without_trials_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def record(seed: int, env: str, success: bool, states: np.ndarray | None = None, error: str | None = None) -> EpisodeRecord:
    states = np.zeros((4, STATE_DIM), np.float32) if states is None else states
    return EpisodeRecord("p", "lift", env, seed, seed, INSTRUCTION, success, float(success), len(states) - 1, error,
                         states, np.zeros((len(states) - 1, 7), np.float32))


def test_summary_leaves_errors_out_of_the_rate() -> None:
    records = [record(0, "real", True), record(1, "real", False), record(2, "real", False, error="crash")]
    s = summarize(records)
    assert (s.episodes, s.successes, s.errors) == (2, 1, 1)
    assert s.success_rate == 0.5
    assert (s.ci_low, s.ci_high) == pytest.approx(wilson_interval(1, 2))
    assert math.isnan(s.wall_seconds) and math.isnan(s.steps_per_second)  # an untimed batch says so
    for r in records:
        r.batch_seconds = 2.0
    assert summarize(records).steps_per_second == 9 / 2.0  # every executed step, errored episode included


def test_agreement_pairs_by_seed_and_measures_trajectory_error() -> None:
    moved = np.zeros((4, STATE_DIM), np.float32)
    moved[:, 0] = [0.0, 0.1, 0.2, 0.3]  # eef x drifts away from the real path
    dream = [record(0, "dream", True, moved), record(1, "dream", True), record(2, "dream", False), record(3, "dream", False)]
    real = [record(3, "real", False), record(2, "real", True), record(1, "real", True), record(0, "real", True),
            record(9, "real", True)]
    a = agreement(dream, real)
    assert (a.pairs, a.both_succeed, a.both_fail, a.dream_only, a.real_only) == (4, 2, 1, 0, 1)
    assert a.agreement_rate == 0.75 and a.success_gap == pytest.approx(-0.25)
    assert a.eef_error == pytest.approx([0.0, 0.025, 0.05, 0.075])  # only seed 0 differs: mean over 4 pairs
    assert a.object_error == pytest.approx([0.0] * 4)


# ------------------------------------------------------------------------------------------ rollout loop


class CountingEnv:
    """Fake env: state[0] counts steps; episode 0 succeeds at step 3, 1 is done at 2, 2 errors at 4, 3 runs on."""

    kind, task = "real", "lift"

    def reset(self, starts, instructions) -> StepResult:
        self.n = len(starts)
        self.t = np.zeros(self.n)
        self.seen_actions: list[np.ndarray] = []
        return self._result()

    def _result(self) -> StepResult:
        result = StepResult.empty(self.n)
        result.states[:, 0] = self.t
        return result

    def step(self, actions, active) -> StepResult:
        self.seen_actions.append(actions.copy())
        self.t[active] += 1
        result = self._result()
        result.success[0] = self.t[0] == 3
        result.done[1] = self.t[1] == 2
        if self.t[2] == 4:
            result.errors[2] = "boom"
        result.reward = result.success.astype(np.float32)
        return result

    def close(self) -> None:
        pass


class ConstantPolicy(Policy):
    name = "constant"

    def act(self, states, instructions, active):
        return np.full((len(states), 7), 2.0, np.float32)  # out of range on purpose


def test_rollout_ends_each_episode_on_success_done_error_or_horizon() -> None:
    env = CountingEnv()
    records = rollout(env, ConstantPolicy(), [Start(seed=i) for i in range(4)], [INSTRUCTION] * 4, horizon=6, progress=False)
    assert [r.length for r in records] == [3, 2, 4, 6]
    assert [r.success for r in records] == [True, False, False, False]
    assert [r.error for r in records] == [None, None, "boom", None]
    assert records[0].success_step == 3 and records[0].episode_return == 1.0
    assert records[3].states[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert records[1].states.shape == (3, STATE_DIM) and records[1].actions.shape == (2, 7)
    assert np.all(np.abs(np.concatenate(env.seen_actions)) <= 1.0)  # clipped to the controller range
    assert [r.seed for r in records] == [0, 1, 2, 3]


class NanPolicy(Policy):
    """Episode 3's actions turn NaN at step 2, episode 2's inf at step 0; the others stay finite."""

    name = "nan"

    def reset(self, n: int) -> None:
        super().reset(n)
        self.t = 0

    def act(self, states, instructions, active):
        actions = np.zeros((len(states), 7), np.float32)
        if self.t == 2:
            actions[3, 3] = np.nan
        if self.t == 0:
            actions[2, 0] = np.inf
        self.t += 1
        return actions


def test_non_finite_policy_actions_end_the_episode_as_an_error_and_never_reach_the_env() -> None:
    """Issue 40, case 2: NaN actions were sent to robosuite and the episode counted as an ordinary failure."""
    env = CountingEnv()
    records = rollout(env, NanPolicy(), [Start(seed=i) for i in range(4)], [INSTRUCTION] * 4, horizon=6, progress=False)
    assert np.isfinite(np.concatenate(env.seen_actions)).all()
    assert records[3].error == "policy: non-finite action (NaN or inf) at step 2" and records[3].length == 2
    assert records[2].error == "policy: non-finite action (NaN or inf) at step 0" and records[2].length == 0
    assert [(r.error, r.length, r.success) for r in records[:2]] == [(None, 3, True), (None, 2, False)]


def test_a_dream_from_a_non_finite_start_is_an_error(tiny_models: dict[str, Path]) -> None:
    """Issue 40, case 2: a dream from a NaN start was counted as an ordinary failure."""
    world, policy = load(tiny_models["world"]), ChunkPolicy(load(tiny_models["mlp"]), "mlp")
    good = np.random.default_rng(0).normal(size=STATE_DIM).astype(np.float32)
    bad = good.copy()
    bad[4] = np.nan
    records = rollout(DreamEnv(world, "lift", 1.0, 1.0), policy, [Start(0, good), Start(1, bad)], [INSTRUCTION] * 2,
                      horizon=3, progress=False)
    assert records[0].error is None and records[0].length == 3
    assert records[1].error == "non-finite state (NaN or inf) at step 0" and records[1].length == 0


class ChunkModel(torch.nn.Module):
    """predict_actions returns chunk[b, h] = 10 * calls + h in every action dim."""

    def __init__(self, horizon: int = 3):
        super().__init__()
        self.horizon, self.calls = horizon, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_actions(self, state, instruction):
        value = 10.0 * self.calls + torch.arange(self.horizon, dtype=torch.float32)
        self.calls += 1
        return value.view(1, -1, 1).expand(len(state), -1, 7).clone()


def play(policy: ChunkPolicy, steps: int) -> list[float]:
    policy.reset(2)
    states, active = np.zeros((2, STATE_DIM), np.float32), np.ones(2, bool)
    return [float(policy.act(states, [INSTRUCTION] * 2, active)[0, 0]) for _ in range(steps)]


def test_receding_horizon_replans_every_k_steps() -> None:
    policy = ChunkPolicy(ChunkModel(), execution=ChunkExecution("receding", execute=2))
    assert play(policy, 5) == [0, 1, 10, 11, 20]


class VelocityModel(ChunkModel):
    """A ChunkModel whose config reads velocities: records the prev_state of every call."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"velocity_input": True})()
        self.seen: list[np.ndarray | None] = []

    def predict_actions(self, state, instruction, prev_state=None):
        self.seen.append(None if prev_state is None else prev_state[:, 0].numpy().copy())
        return super().predict_actions(state, instruction)


@pytest.mark.parametrize("mode", ["ensemble", "receding"])
def test_chunk_policy_hands_velocity_models_the_previous_step(mode: str) -> None:
    model = VelocityModel()
    policy = ChunkPolicy(model, execution=ChunkExecution(mode, execute=2))
    for episode in range(2):
        policy.reset(2)
        for t in range(5):
            states = np.full((2, STATE_DIM), 10.0 * episode + t, np.float32)
            policy.act(states, [INSTRUCTION] * 2, np.array([True, t < 3]))  # row 1 ends after step 2
    # first step of each episode: at rest (no prev_state); then the states of the step before, even when a receding
    # policy played the previous step from its chunk without a call
    steps = [0, 1, 2, 3, 4] if mode == "ensemble" else [0, 2, 4]
    expected = [None if t == 0 else 10.0 * episode + t - 1 for episode in range(2) for t in steps]
    seen = [None if s is None else float(s[0]) for s in model.seen]
    assert seen == expected
    assert [None if s is None else len(s) for s in model.seen][-1] == 1  # only the active rows


def test_temporal_ensembling_averages_overlapping_chunks_like_act() -> None:
    decay = 0.5
    policy = ChunkPolicy(ChunkModel(), execution=ChunkExecution("ensemble", decay=decay))
    w = np.exp(-decay * np.arange(3))
    # step 2 sees chunk0[2]=2, chunk1[1]=11, chunk2[0]=20, oldest weighted most; step 3 drops chunk0.
    expected_2 = (w[0] * 2 + w[1] * 11 + w[2] * 20) / w.sum()
    expected_3 = (w[0] * 12 + w[1] * 21 + w[2] * 30) / w.sum()
    assert play(policy, 4) == pytest.approx([0, (1 + w[1] * 10) / (1 + w[1]), expected_2, expected_3])


# ------------------------------------------------------------------------------------------ tiny trained-model stand-ins


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Randomly initialised WorldModel and MLPPolicy saved like trained ones (tasks lift and can)."""
    from configuration_vla import MLPPolicyConfig, WorldModelConfig
    from modeling_vla import MLPPolicy, WorldModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    WorldModel(WorldModelConfig(hidden_dim=16, token_mlp_dim=8, channel_mlp_dim=16, num_layers=1, num_ensemble=3,
                                tasks=["lift", "can"])).save_pretrained(root / "world")
    MLPPolicy(MLPPolicyConfig(hidden_dim=16, num_layers=1, chunk_size=4, tasks=["lift", "can"])).save_pretrained(root / "mlp")
    return {"world": root / "world", "mlp": root / "mlp"}


def load(path: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), trust_remote_code=True).eval()


def test_dream_env_shapes_and_termination_thresholds(tiny_models: dict[str, Path]) -> None:
    world, policy = load(tiny_models["world"]), ChunkPolicy(load(tiny_models["mlp"]), "mlp")
    starts = [Start(seed=i, state=np.random.default_rng(i).normal(size=STATE_DIM).astype(np.float32)) for i in range(3)]
    # sigmoid < 1: runs to the horizon
    never = DreamEnv(world, "lift", success_threshold=1.0, done_threshold=1.0)
    records = rollout(never, policy, starts, [INSTRUCTION] * 3, horizon=4, progress=False)
    assert [r.length for r in records] == [4, 4, 4] and not any(r.success for r in records)
    r = records[0]
    assert r.states.shape == (5, STATE_DIM) and r.std.shape == (5, STATE_DIM) and r.actions.shape == (4, 7)
    np.testing.assert_allclose(r.states[0], starts[0].state)
    assert np.all(r.std[1:] >= 0) and np.any(r.std[1:] > 0)  # ensemble members disagree at random init
    assert np.all(r.states[1:, STATE_DIM - 6 :] == 0)  # lift's padded object dims stay exactly zero
    always = DreamEnv(world, "lift", success_threshold=0.0)
    records = rollout(always, policy, starts, [INSTRUCTION] * 3, horizon=4, progress=False)
    assert [(r.length, r.success, r.success_step) for r in records] == [(1, True, 1)] * 3


def test_dream_success_is_robosuites_rule_on_the_imagined_state(tiny_models: dict[str, Path]) -> None:
    world, policy = load(tiny_models["world"]), ChunkPolicy(load(tiny_models["mlp"]), "mlp")
    lifted, resting = np.zeros(STATE_DIM, np.float32), np.zeros(STATE_DIM, np.float32)
    lifted[13], resting[13] = 0.90, 0.82  # cube height; robosuite's Lift succeeds above 0.84
    # success_threshold 0: the head alone would call both a success
    env = DreamEnv(world, "lift", success_threshold=0.0, done_threshold=1.0, success_from="state")
    records = rollout(env, policy, [Start(0, lifted), Start(1, resting)], [INSTRUCTION] * 2, horizon=3, progress=False)
    assert [(r.success, r.length) for r in records] == [(True, 1), (False, 3)]
    with pytest.raises(ValueError, match="success_from"):
        DreamEnv(world, "lift", success_from="oracle")


def test_dream_relative_pose_is_derived_from_the_imagined_poses(tiny_models: dict[str, Path]) -> None:
    from data_prep.tasks import STATE_SLICES, relative_pose_from_poses

    world = load(tiny_models["world"])
    starts = [Start(seed=i, state=np.random.default_rng(i).normal(size=STATE_DIM).astype(np.float32)) for i in range(2)]
    actions, active = np.zeros((2, 7), np.float32), np.array([True, True])
    imagined = DreamEnv(world, "square", relative_from="model")
    derived = DreamEnv(world, "square")  # the default
    before = imagined.reset(starts, [INSTRUCTION] * 2).states
    derived.reset(starts, [INSTRUCTION] * 2)
    model_says, poses_say = imagined.step(actions, active).states, derived.step(actions, active).states
    relative = slice(STATE_SLICES["object-eef pos"].start, STATE_DIM)
    np.testing.assert_array_equal(poses_say[:, : relative.start], model_says[:, : relative.start])
    np.testing.assert_allclose(poses_say, relative_pose_from_poses(model_says, before, "square"), atol=1e-6)
    assert np.abs(poses_say[:, relative] - model_says[:, relative]).max() > 1e-3  # the model's own block is replaced
    with pytest.raises(ValueError, match="relative_from"):
        DreamEnv(world, "square", relative_from="simulator")
    world.config.derive_relative_pose = True  # trained on the derived block: its own block is untrained
    with pytest.raises(ValueError, match="trained with derive_relative_pose"):
        DreamEnv(world, "square", relative_from="model")


def test_dream_env_feeds_the_previous_state_for_velocities(tiny_models: dict[str, Path]) -> None:
    world = load(tiny_models["world"])
    seen = []
    step = world.step

    def recording_step(state, action, *args, **kwargs):
        seen.append((state.clone(), kwargs["prev_state"].clone()))
        return step(state, action, *args, **kwargs)

    world.step = recording_step
    env = DreamEnv(world, "lift")
    starts = [Start(seed=i, state=np.random.default_rng(i).normal(size=STATE_DIM).astype(np.float32)) for i in range(2)]
    first = env.reset(starts, [INSTRUCTION] * 2)
    after_one = env.step(np.zeros((2, 7), np.float32), np.array([True, True])).states
    env.step(np.zeros((2, 7), np.float32), np.array([True, True]))
    (state0, prev0), (state1, prev1) = seen
    np.testing.assert_array_equal(prev0.numpy(), first.states)  # a reset is at rest
    np.testing.assert_array_equal(state1.numpy(), after_one)
    np.testing.assert_array_equal(prev1.numpy(), first.states)


def test_dream_env_needs_starting_states(tiny_models: dict[str, Path]) -> None:
    env = DreamEnv(load(tiny_models["world"]), "lift")
    with pytest.raises(ValueError, match="starting state"):
        env.reset([Start(seed=0)], [INSTRUCTION])


def test_expert_refuses_dreams(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="--env real"):
        ExpertPolicy(DreamEnv(load(tiny_models["world"]), "lift"))


# ------------------------------------------------------------------------------------------ real simulators


class ZeroPolicy(Policy):
    name = "zero"

    def act(self, states, instructions, active):
        return np.zeros((len(states), 7), np.float32)


def test_robosuite_env_in_process_and_in_two_workers_agree() -> None:
    starts = [Start(seed=3), Start(seed=4)]
    results = []
    for workers in (1, 2):
        with RobosuiteEnv("lift", workers=workers) as env:
            results.append(rollout(env, ZeroPolicy(), starts, [INSTRUCTION] * 2, horizon=3, progress=False))
    for one, two in zip(*results, strict=True):
        assert one.error is None and two.error is None and one.length == 3
        np.testing.assert_allclose(one.states, two.states, atol=1e-6)  # same seed, same physics
    assert not np.allclose(results[0][0].states[0], results[0][1].states[0])  # seeds differ -> states differ
    assert np.all(results[0][0].states[0, STATE_DIM - 6 :] == 0) and np.any(results[0][0].states[0, OBJECT_POS] != 0)


def crash_on_seed(bad_seed: int, how: str):
    """A make_env whose simulator for `bad_seed` dies on its first step (exception or process exit)."""
    from data_prep.sim import make_env

    def make(task: str, seed: int):
        sim = make_env(task, seed)
        if seed == bad_seed:
            def step(action):
                if how == "exit":
                    os._exit(3)
                raise RuntimeError("simulated MuJoCo instability")

            sim.env.step = step
        return sim

    return make


@pytest.mark.parametrize(("workers", "how", "message"), [(1, "raise", "simulated MuJoCo instability"),
                                                          (2, "exit", "worker 1 crashed")])
def test_crashed_simulator_is_recorded_and_the_run_goes_on(workers: int, how: str, message: str) -> None:
    with RobosuiteEnv("lift", workers=workers, make_env=crash_on_seed(1, how)) as env:
        records = rollout(env, ZeroPolicy(), [Start(seed=0), Start(seed=1)], [INSTRUCTION] * 2, horizon=3, progress=False)
    assert records[0].error is None and records[0].length == 3
    assert message in records[1].error and records[1].length == 1 and not records[1].success


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_rollout_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from evaluation.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_cli_writes_results_folder(tiny_models: dict[str, Path], tmp_path: Path, offline: None,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    code, err = run_rollout_cli(
        ["--policy", str(tiny_models["mlp"]), "--world-model", str(tiny_models["world"]), "--tasks", "lift",
         "--episodes", "2", "--env", "both", "--out", str(out), "--workers", "1", "--horizon", "4",
         "--success-threshold", "1.0", "--done-threshold", "1.0", "--no-progress"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert sorted((e["env"], e["seed"]) for e in lines) == [("dream", 100_000), ("dream", 100_001), ("real", 100_000), ("real", 100_001)]
    by_key = {(e["env"], e["seed"]): e for e in lines}
    assert by_key[("dream", 100_000)]["initial_state"] == by_key[("real", 100_000)]["initial_state"]  # same start
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["env"], r["episodes"]) for r in summary["results"]} == {("real", 2), ("dream", 2)}
    for row in summary["results"]:  # each batch is timed: steps/s = executed steps / its wall time
        steps = sum(e["length"] for e in lines if e["env"] == row["env"])
        assert row["wall_seconds"] > 0 and row["steps_per_second"] == pytest.approx(steps / row["wall_seconds"])
    assert summary["agreement"][0]["pairs"] == 2 and len(summary["agreement"][0]["eef_error"]) == 5
    assert "| mlp | lift | real | 2 |" in (out / "summary.md").read_text()
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"success_rates.png", "trajectory_error.png", "trajectories_mlp_lift_real.png",
            "dream_vs_real_mlp_lift_seed100000.png"} <= figures
    assert np.load(out / "trajectories.npz")["mlp__lift__dream__0__std"].shape == (5, STATE_DIM)
    assert not list(tmp_path.glob("results.tmp-*"))


def test_cli_out_is_replaced_only_with_overwrite_and_only_its_own(tiny_models: dict[str, Path], tmp_path: Path,
                                                                    offline: None, make_robomimic_file,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Issue 40, case 1: vla-rollout --out X replaced an existing folder, its unrelated files deleted, without a flag."""
    from data_prep.preprocess import preprocess

    dataset = tmp_path / "dataset"  # dreams from its episodes: no simulator to start
    preprocess([make_robomimic_file("lift", episodes=4, valid_fraction=0.5)], dataset)
    capsys.readouterr()  # its progress bars
    out = tmp_path / "results"
    args = ["--policy", str(tiny_models["mlp"]), "--world-model", str(tiny_models["world"]), "--tasks", "lift",
            "--episodes", "1", "--env", "dream", "--dataset", str(dataset), "--horizon", "2", "--no-progress",
            "--out", str(out)]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra, message in (([], "pass --overwrite"), (["--overwrite"], "not written by vla-rollout")):
        code, err = run_rollout_cli(args + extra, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run_rollout_cli(args, capsys)[0] == 0
    assert run_rollout_cli(args, capsys)[0] == 2  # its own results, but no --overwrite
    code, err = run_rollout_cli(args + ["--overwrite"], capsys)
    assert code == 0, err
    code, err = run_rollout_cli(args[:-1] + [str(tiny_models["world"])], capsys)  # --out = an input
    assert code == 2 and "is the input" in err


def test_cli_refuses_a_model_folder_whose_weights_do_not_fit(tiny_models: dict[str, Path], tmp_path: Path,
                                                             offline: None, capsys: pytest.CaptureFixture) -> None:
    """Issue 40, case 4: MLP weights in a world-model folder loaded as random weights and dreamed "100 % success"."""
    import shutil

    mismatched, truncated = tmp_path / "mismatched", tmp_path / "truncated"
    for folder in (mismatched, truncated):
        shutil.copytree(tiny_models["world"], folder)
    shutil.copy(tiny_models["mlp"] / "model.safetensors", mismatched / "model.safetensors")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for folder, message in ((mismatched, "weights missing (action_token.bias"), (truncated, "truncated or corrupt")):
        code, err = run_rollout_cli(["--policy", str(tiny_models["mlp"]), "--world-model", str(folder), "--tasks",
                                     "lift", "--episodes", "1", "--env", "dream", "--horizon", "2", "--no-progress",
                                     "--out", str(tmp_path / "results")], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert str(folder) in errors[0] and message in errors[0], errors
    assert not (tmp_path / "results").exists()


def edit_config(folder: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    copy = tmp_path / f"{folder.name}_edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_spread_of_several_world_models_dreaming_the_same_starts() -> None:
    from evaluation.report import agreements_of, spread_markdown, spreads_of

    real = [record(seed, "real", success) for seed, success in enumerate([True, True, False, False])]
    dreams = {"wm_a": [True, True, True, False], "wm_b": [False, True, False, False], "wm_c": [True, True, False, True]}
    records = list(real)
    for name, outcomes in dreams.items():
        for seed, success in enumerate(outcomes):
            records.append(record(seed, "dream", success))
            records[-1].world_model = name
    agreements = agreements_of(records)
    assert [(a.world_model, a.success_gap) for _, a in agreements] == [("wm_a", 0.25), ("wm_b", -0.25), ("wm_c", 0.25)]
    (spread,) = spreads_of(agreements)
    assert spread.world_models == ["wm_a", "wm_b", "wm_c"] and spread.real_success_rate == 0.5
    assert spread.mean_gap == pytest.approx(0.25 / 3)
    assert spread.sd_gap == pytest.approx(np.std([0.25, -0.25, 0.25], ddof=1))
    assert spread.mean_agreement == pytest.approx((0.75 + 0.75 + 0.75) / 3)
    assert "| p | lift | 50% | 75% / 25% / 75% | +25 / -25 / +25 | +8 pp | 29 pp | 75% |" in spread_markdown([spread])
    assert spreads_of(agreements[:1]) == []  # one world model: no spread table


def copy_run(folder: Path, run: Path) -> Path:
    import shutil

    shutil.copytree(folder, run / "best")
    return run / "best"


OLD_LAYOUT = "eef_pos3+eef_rot6+gripper_qpos2+object18pad.rot6"  # one object, 29 numbers (before issue 46)


def test_a_model_saved_with_the_one_object_layout_is_refused_in_one_line(tiny_models: dict[str, Path], tmp_path: Path,
                                                                         offline: None, capsys: pytest.CaptureFixture):
    old = copy_run(tiny_models["mlp"], tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "state_layout": OLD_LAYOUT, "state_dim": 29}))
    code, err = run_rollout_cli(["--policy", str(old), "--tasks", "lift", "--episodes", "1", "--env", "real",
                                 "--out", str(tmp_path / "results"), "--workers", "1", "--no-progress"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"state_layout {OLD_LAYOUT!r} does not match this code's {STATE_LAYOUT!r}" in errors[0]
    assert not (tmp_path / "results").exists()


def test_cli_dreams_each_start_in_every_world_model(tiny_models: dict[str, Path], tmp_path: Path, offline: None,
                                                     capsys: pytest.CaptureFixture) -> None:
    worlds = [str(copy_run(tiny_models["world"], tmp_path / name)) for name in ("wm_s0", "wm_s1")]
    out = tmp_path / "results"
    code, err = run_rollout_cli(
        ["--policy", str(tiny_models["mlp"]), "--world-model", *worlds, "--tasks", "lift", "--episodes", "2",
         "--env", "both", "--out", str(out), "--workers", "1", "--horizon", "3", "--no-progress"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert sorted((e["env"], e.get("world_model", ""), e["seed"]) for e in lines) == [
        ("dream", "wm_s0", 100_000), ("dream", "wm_s0", 100_001), ("dream", "wm_s1", 100_000), ("dream", "wm_s1", 100_001),
        ("real", "", 100_000), ("real", "", 100_001)]
    summary = json.loads((out / "summary.json").read_text())
    assert [a["world_model"] for a in summary["agreement"]] == ["wm_s0", "wm_s1"]
    (spread,) = summary["dream_spread"]
    assert spread["world_models"] == ["wm_s0", "wm_s1"] and spread["sd_gap"] == 0.0  # the same weights twice
    markdown = (out / "summary.md").read_text()
    assert "| mlp | lift | dream@wm_s1 | 2 |" in markdown and "Dream vs real over 2 world models" in markdown
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"trajectories_mlp_lift_dream_wm_s0.png", "dream_vs_real_mlp_lift_seed100000_wm_s1.png"} <= figures
    dreamed = next(e for e in lines if e.get("world_model") == "wm_s1" and e["seed"] == 100_000)
    assert np.load(out / "trajectories.npz")["mlp__lift__dream@wm_s1__0__std"].shape == (dreamed["length"] + 1, STATE_DIM)

    same_name = [str(copy_run(tiny_models["world"], tmp_path / "other" / "wm_s0"))]
    code, err = run_rollout_cli(["--policy", str(tiny_models["mlp"]), "--world-model", worlds[0], *same_name,
                                 "--tasks", "lift", "--env", "dream", "--out", str(tmp_path / "r2"), "--no-progress"], capsys)
    assert code == 2 and "several folders are named 'wm_s0'" in err and not (tmp_path / "r2").exists()


def test_pooled_world_model_is_the_ensemble_of_its_inputs(tiny_models: dict[str, Path], tmp_path: Path, offline: None,
                                                           capsys: pytest.CaptureFixture) -> None:
    from configuration_vla import WorldModelConfig
    from evaluation.pool import main as pool_main
    from modeling_vla import WorldModel

    def tiny_world(folder: Path, seed: int, **changes) -> Path:
        torch.manual_seed(seed)
        config = dict(hidden_dim=16, token_mlp_dim=8, channel_mlp_dim=16, num_layers=1, num_ensemble=3, tasks=["lift", "can"])
        WorldModel(WorldModelConfig(**{**config, **changes})).save_pretrained(folder)
        return folder

    other = tiny_world(tmp_path / "other", seed=1)
    out = tmp_path / "pool" / "best"
    pool_main(["--inputs", str(tiny_models["world"]), str(other), "--out", str(out)])
    a, b, pooled = load(tiny_models["world"]), load(other), load(out)
    assert pooled.config.num_ensemble == 6 and not list(out.parent.glob("*.tmp-*"))
    rng = np.random.default_rng(0)
    state = torch.tensor(rng.normal(size=(4, STATE_DIM)), dtype=torch.float32)
    action = torch.tensor(rng.normal(size=(4, 7)), dtype=torch.float32)
    (ma, sa, pa, da), (mb, sb, pb, db), (mp, sp, pp, dp) = (m.step(state, action, [INSTRUCTION] * 4) for m in (a, b, pooled))
    torch.testing.assert_close(mp, (ma + mb) / 2, atol=1e-5, rtol=1e-5)  # equal member counts: the mean of the means
    torch.testing.assert_close(sp ** 2, (sa ** 2 + ma ** 2 + sb ** 2 + mb ** 2) / 2 - mp ** 2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((pp, dp), ((pa + pb) / 2, (da + db) / 2))

    lift_only = tiny_world(tmp_path / "lift_only", seed=2, tasks=["lift"])
    for inputs, message in [([other], "expected two or more"), ([other, lift_only], "config field 'tasks'")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            pool_main(["--inputs", *map(str, inputs), "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # (stderr also has load progress)
        assert exit_.value.code == 2 and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "bad").exists()

    # issue 40, case 1: --out is replaced only with --overwrite, and only when vla-pool-world-models wrote it
    for target, extra, message in ((out, [], "pass --overwrite"), (tiny_models["world"].parent, ["--overwrite"], "contains the input")):
        with pytest.raises(SystemExit):
            pool_main(["--inputs", str(tiny_models["world"]), str(other), "--out", str(target), *extra])
        assert message in capsys.readouterr().err
    pool_main(["--inputs", str(tiny_models["world"]), str(other), "--out", str(out), "--overwrite"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        pool_main(["--inputs", str(tiny_models["world"]), str(other), "--out", str(foreign), "--overwrite"])
    assert "not written by vla-pool-world-models" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_cli_refuses_bad_setups_before_any_rollout(tiny_models: dict[str, Path], tmp_path: Path, offline: None,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    base = ["--out", str(out), "--episodes", "1", "--tasks", "lift", "--no-progress"]
    mlp, world = str(tiny_models["mlp"]), str(tiny_models["world"])
    other_layout = str(edit_config(tiny_models["world"], tmp_path, state_layout="eef_pos3+object10"))
    cases = [
        (["--policy", mlp, "--world-model", other_layout, "--env", "dream"], "state_layout 'eef_pos3+object10' differs"),
        (["--policy", mlp, "--world-model", world, "--tasks", "square", "--env", "dream"], "do not include ['square']"),
        (["--policy", mlp, "--tasks", "stack", "--env", "real"], "unknown task 'stack'"),
        (["--policy", str(tmp_path / "nowhere"), "--env", "real"], "nowhere: folder not found"),
        (["--policy", mlp, "--env", "both"], "needs --world-model"),
        (["--policy", "expert", "--env", "dream"], "runs only with --env real"),
        (["--policy", world, "--env", "real"], "model_type 'vla_world_model'"),
    ]
    for args, message in cases:
        code, err = run_rollout_cli(base + args, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not out.exists()


def test_cli_dreams_from_held_out_dataset_episodes(tiny_models: dict[str, Path], tmp_path: Path, offline: None,
                                                   make_robomimic_file, capsys: pytest.CaptureFixture) -> None:
    from data_prep.preprocess import load_vla_dataset, preprocess

    dataset = tmp_path / "dataset"
    preprocess([make_robomimic_file("lift", episodes=6, valid_fraction=0.5)], dataset)
    validation = load_vla_dataset(dataset)["validation"]
    firsts = {row["episode"]: row["state"] for row in validation if row["step"] == 0}
    out = tmp_path / "results"
    code, err = run_rollout_cli(
        ["--policy", str(tiny_models["mlp"]), "--world-model", str(tiny_models["world"]), "--tasks", "lift",
         "--episodes", "2", "--env", "dream", "--dataset", str(dataset), "--out", str(out), "--horizon", "2",
         "--no-progress"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {e["env"] for e in lines} == {"dream"}
    for episode in lines:  # seed = dataset episode id, start = its first state
        np.testing.assert_allclose(episode["initial_state"], firsts[episode["seed"]], atol=1e-5)


def test_real_rollout_video_or_a_clear_skip(tmp_path: Path) -> None:
    from evaluation.envs import VideoSpec

    video = VideoSpec(tmp_path / "videos", episodes=1, prefix="zero", size=64)
    with RobosuiteEnv("lift", workers=1, video=video) as env:
        records = rollout(env, ZeroPolicy(), [Start(seed=0), Start(seed=1)], [INSTRUCTION] * 2, horizon=3, progress=False)
        notes = env.finish()
    if any("video skipped" in n for n in notes):
        pytest.skip(f"no offscreen rendering here: {notes}")
    assert notes == ["video written: zero_lift_seed0.mp4"]  # only episode 0 is filmed
    import imageio.v2 as imageio

    frames = [f for f in imageio.get_reader(tmp_path / "videos" / "zero_lift_seed0.mp4")]  # not list(): len() is inf
    assert len(frames) == records[0].length + 1 and frames[0].shape == (64, 64, 3) and frames[0].std() > 0


def test_cli_video_films_the_dream_beside_the_real_rollout(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Two tasks and two simulator workers: the second task's workers are forked after the first task's dreams were
    filmed, which hung them (in their first GL call) while vla-rollout rendered dreams in its own process. Run as a
    user would, in a fresh process: this test process may have rendered already (the in-process video tests)."""
    import subprocess
    import sys

    out = tmp_path / "results"
    command = [sys.executable, "-m", "evaluation.cli", "--policy", str(tiny_models["mlp"]), "--world-model",
               str(tiny_models["world"]), "--tasks", "lift", "can", "--episodes", "2", "--env", "both", "--out",
               str(out), "--workers", "2", "--horizon", "3", "--video", "--video-episodes", "1", "--success-threshold",
               "1.0", "--done-threshold", "1.0", "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    dream_p = np.load(out / "trajectories.npz")["mlp__lift__dream__0__p_success"]
    assert dream_p.shape == (4,) and dream_p[0] == 0 and (dream_p[1:] > 0).all()  # the success head, per step
    videos = {p.name for p in (out / "videos").iterdir()} if (out / "videos").is_dir() else set()
    if not videos:
        assert "video skipped" in run.stdout, run.stdout
        pytest.skip("no offscreen rendering here")
    assert videos == {f"{name}_{task}_seed100000.mp4" for name in ("mlp", "dream", "side_by_side") for task in ("lift", "can")}
    for task in ("lift", "can"):
        assert f"dream video written: dream_{task}_seed100000.mp4, side_by_side_{task}_seed100000.mp4 (IK reached" in run.stdout


def test_benchmark_passes_its_settings_to_every_rollout() -> None:
    """benchmarks/evaluate.py builds each policy's vla-rollout command line: the ensembling weight reaches it."""
    import importlib.util

    from evaluation.cli import parse_args

    spec = importlib.util.spec_from_file_location("benchmarks_evaluate", Path(__file__).parents[1] / "benchmarks" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    default = evaluate.benchmark_args(["--vla", "v", "--world-model", "w"])
    assert parse_args(evaluate.rollout_argv(default, "v", "vla", "both")).ensemble_decay == ChunkExecution.decay
    tuned = evaluate.benchmark_args(["--vla", "v", "--world-model", "w", "--ensemble-decay", "-0.5", "--episodes", "3"])
    for env in ("real", "dream", "both"):
        rollout_args = parse_args(evaluate.rollout_argv(tuned, "v", "vla", env))
        assert (rollout_args.ensemble_decay, rollout_args.episodes, rollout_args.env) == (-0.5, 3, env)
