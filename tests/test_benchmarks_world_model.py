"""benchmarks/world_model.py on a tiny synthetic dataset repo, and the plain-MLP world-model architecture.

The metric tests compare against numbers computed independently from the raw rows; the end-to-end test runs the
CLI with two tiny saved models (mixer + MLP) and a short robosuite timing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_models import outputs_in_fresh_process, synthetic_batch, tiny_world_config, train_losses
from test_train import write_rows_parquet

import train_accelerate as ta
from configuration_vla import WorldModelConfig
from data_prep.tasks import ACTION_DIM, STATE_DIM, STATE_LAYOUT
from modeling_vla import WorldModel

REPO = Path(__file__).resolve().parents[1]


def load_benchmark_module():
    """benchmarks/ is a folder of scripts, not a package: load the file by path."""
    spec = importlib.util.spec_from_file_location("world_model_benchmark", REPO / "benchmarks" / "world_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


wmb = load_benchmark_module()

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """wmb.main sets torch's thread count (--threads, default 2) for the whole process; bit-identical comparisons
    with a fresh 1-thread process need it back at 1, whichever test ran before."""
    torch.set_num_threads(1)

INSTRUCTIONS = {"lift": "Lift the red cube", "can": "Pick up the coke can"}
PADDED = 4  # lift-like episodes: the last 4 state dims are padding (mask 0, value 0)


def synthetic_rows(episodes: int, steps: int, seed: int, first_episode: int) -> dict[str, list]:
    """Random walks with a per-dim drift; next_state[t] is exactly state[t+1]; success on the last 3 steps."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("task", "instruction", "episode", "step", "state", "state_mask", "action",
                                             "next_state", "reward", "done", "success", "source")}
    for e in range(episodes):
        task = ("lift", "can")[e % 2]
        mask = np.ones(STATE_DIM, np.float32)
        if task == "lift":
            mask[-PADDED:] = 0.0
        length = steps + e % 3  # unequal lengths: starts must stop at each episode's end
        drift = rng.normal(0, 0.05, STATE_DIM)
        walk = np.cumsum(rng.normal(0, 0.02, (length + 1, STATE_DIM)) + drift, axis=0) + rng.normal(0, 1, STATE_DIM)
        walk = (walk * mask).astype(np.float32)
        for t in range(length):
            rows["task"].append(task)
            rows["instruction"].append(INSTRUCTIONS[task])
            rows["episode"].append(first_episode + e)
            rows["step"].append(t)
            rows["state"].append(walk[t])
            rows["state_mask"].append(mask)
            rows["action"].append(rng.uniform(-1, 1, ACTION_DIM).astype(np.float32))
            rows["next_state"].append(walk[t + 1])
            rows["reward"].append(float(t >= length - 3))
            rows["done"].append(t == length - 1)
            rows["success"].append(t >= length - 3)
            rows["source"].append("synthetic.hdf5")
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset repo in the docs/DESIGN.md layout (as tests/test_train.py writes one)."""
    root = tmp_path_factory.mktemp("wm_bench") / "repo"
    (root / "data").mkdir(parents=True)
    train = synthetic_rows(6, 30, seed=0, first_episode=0)
    validation = synthetic_rows(4, 30, seed=1, first_episode=100)
    for name, rows in (("train", train), ("validation", validation)):
        write_rows_parquet(rows, root / "data" / f"{name}-00000-of-00001.parquet")
    stats = {}
    for part, values in (("state", np.stack(train["state"])), ("action", np.stack(train["action"]))):
        stats[part] = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                       "min": values.min(0).tolist(), "max": values.max(0).tolist()}
    (root / "normalization.json").write_text(json.dumps({"state_layout": STATE_LAYOUT, **stats}))
    return root


def raw_validation(dataset: Path) -> list[dict[str, np.ndarray]]:
    """The validation episodes straight from the parquet file (not via the benchmark's loader)."""
    import pyarrow.parquet as pq

    table = pq.read_table(dataset / "data" / "validation-00000-of-00001.parquet").to_pydict()
    episodes = []
    for episode in sorted(set(table["episode"])):
        rows = [i for i, e in enumerate(table["episode"]) if e == episode]
        episodes.append({k: np.asarray([table[k][i] for i in rows], np.float32)
                         for k in ("state", "state_mask", "next_state", "success")})
    return episodes


def error_scale(dataset: Path) -> np.ndarray:
    std = np.asarray(json.loads((dataset / "normalization.json").read_text())["state"]["std"])
    return np.where(std < 1e-6, 1.0, std)


class OracleWorldModel:
    """WorldModel's inference API, answering with the recorded next state and success of the matching row."""

    def __init__(self, dataset: Path):
        data = wmb.load_validation(dataset)
        t = data.table
        self.lookup = {(s.tobytes(), a.tobytes()): (n, float(ok), p)
                       for s, a, n, ok, p in zip(t.state, t.action, t.next_state, t.success, t.prev_state, strict=True)}

    def embed_instructions(self, instructions: list[str]) -> torch.Tensor:
        return torch.zeros(len(instructions), 8)

    def step(self, state, action, text_emb=None, state_mask=None, prev_state=None):
        answers = [self.lookup[(s.numpy().tobytes(), a.numpy().tobytes())] for s, a in zip(state, action, strict=True)]
        # the benchmark must hand over each row's recorded s_{t-1} (the velocity input)
        np.testing.assert_array_equal(prev_state.numpy(), np.stack([p for _, _, p in answers]))
        mean = torch.as_tensor(np.stack([n for n, _, _ in answers]))
        p_success = torch.tensor([ok for _, ok, _ in answers])
        return mean, torch.zeros_like(mean), p_success, torch.zeros_like(p_success)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_identity_open_loop_error_is_the_data_drift(dataset):
    horizon = 25
    data = wmb.load_validation(dataset)
    starts = wmb.open_loop_starts(data.table, horizon, None)
    result = wmb.open_loop_curve(wmb.IdentityDynamics(), data, starts, horizon)

    scale = error_scale(dataset)
    episodes = raw_validation(dataset)
    assert len(starts) == sum(len(e["state"]) - horizon + 1 for e in episodes)
    for k in (1, 5, 25):
        total = count = 0.0
        for e in episodes:
            for t in range(len(e["state"]) - horizon + 1):
                drift = (e["next_state"][t + k - 1] - e["state"][t]) / scale
                total += float((drift[e["state_mask"][t] > 0] ** 2).sum())
                count += float(e["state_mask"][t].sum())
        assert result["open_loop"][str(k)] == pytest.approx(total / count, rel=1e-5)
    assert result["open_loop"]["1"] > 0  # the data moves: an identity model is not free
    curve = np.asarray(result["open_loop_curve"])
    assert np.all(np.diff(curve) > 0)  # drift makes "nothing moves" worse with every step


def test_physical_error_reports_centimetres_and_the_rotation_angle():
    from data_prep.tasks import quat_to_rot6

    rows = 4
    target = np.zeros((rows, STATE_DIM), np.float32)
    target[:, 3:9] = target[:, 14:20] = quat_to_rot6(np.array([0.0, 0.0, 0.0, 1.0]))  # identity orientations
    pred = target.copy()
    pred[:, 0] += 0.03  # eef 3 cm off
    half = np.radians(10.0) / 2  # eef turned 10 degrees about z, its rot6 scaled (not a rotation until projected)
    pred[:, 3:9] = 1.7 * quat_to_rot6(np.array([0.0, 0.0, np.sin(half), np.cos(half)]))
    pred[:, 11:14] += np.array([0.0, 0.06, 0.08])  # object 10 cm off
    mask = np.ones((rows, STATE_DIM), np.float32)
    mask[2:, 11:20] = 0.0  # object block absent in half the rows: averaged over the others only
    pred[2:, 11:14] += 5.0
    errors = wmb.physical_error(pred, target, mask)
    assert errors["eef pos (cm)"] == pytest.approx(3.0, rel=1e-4)
    assert errors["eef rot (deg)"] == pytest.approx(10.0, rel=1e-3)
    assert errors["object pos (cm)"] == pytest.approx(10.0, rel=1e-4)
    assert errors["object rot (deg)"] == pytest.approx(0.0, abs=1e-2)
    mask[:, 11:20] = 0.0
    assert wmb.physical_error(pred, target, mask)["object pos (cm)"] is None


def test_oracle_model_has_zero_error_and_perfect_success_head(dataset):
    data = wmb.load_validation(dataset)
    dynamics = wmb.WorldModelDynamics("oracle", OracleWorldModel(dataset), data.table)
    starts = wmb.open_loop_starts(data.table, 25, None)
    result = wmb.evaluate_dynamics(dynamics, data, starts, 25)
    assert result["one_step_mse"] == 0.0
    assert result["open_loop_curve"] == [0.0] * 25
    success = result["success"]
    assert success["accuracy"] == success["balanced_accuracy"] == success["f1"] == 1.0
    positives = np.mean(np.concatenate([e["success"] for e in raw_validation(dataset)]))
    assert success["positive_rate"] == pytest.approx(positives)


def test_linear_baselines_fit_linear_dynamics_and_read_the_velocity(dataset):
    """On rows rewritten to follow s' = s + 0.5 (s - s_prev) + 0.01 a M, only the velocity fit is exact."""
    data = wmb.load_validation(dataset)
    mix = np.random.default_rng(0).normal(size=(ACTION_DIM, STATE_DIM))
    mix[:, -PADDED:] = 0.0  # padding dims stay 0 in lift rows; can rows must follow the same law there
    for table in (data.train, data.table):
        change = 0.5 * (table.state - table.prev_state) + 0.01 * table.action @ mix
        table.next_state = ((table.state + change) * table.state_mask).astype(np.float32)
    with_velocity = wmb.one_step_metrics(wmb.LinearDynamics(data, velocity=True), data)["one_step_mse"]
    without = wmb.one_step_metrics(wmb.LinearDynamics(data, velocity=False), data)["one_step_mse"]
    assert with_velocity < 1e-8 < 1e-3 < without, (with_velocity, without)


def test_one_step_error_counts_only_real_dims(dataset):
    """A model off by 0.1 std in dim 0 (and anything in padding): error = 0.01 * rows / (real dims over all rows)."""
    data = wmb.load_validation(dataset)
    oracle = wmb.WorldModelDynamics("oracle", OracleWorldModel(dataset), data.table)

    class OffByOne(wmb.Dynamics):
        name = "off"

        def __call__(self, state, action, rows, prev_state):
            pred, p = oracle(state, action, rows, prev_state)
            pred = pred.copy()
            pred[:, 0] += 0.1 * data.scale[0]
            pred += 5.0 * (1 - data.table.state_mask[rows])  # garbage in padding dims must not count
            return pred, p

    result = wmb.one_step_metrics(OffByOne(), data)
    mask = np.concatenate([e["state_mask"] for e in raw_validation(dataset)])
    assert result["one_step_mse"] == pytest.approx(0.01 * len(mask) / mask.sum(), rel=1e-4)
    assert mask.sum() < mask.size  # the padded (lift) dims really are excluded
    groups = result["one_step_by_state_group"]
    assert groups["eef pos"]["share"] == pytest.approx(1.0)  # dim 0 is the end effector's x
    assert groups["eef pos"]["mse"] == pytest.approx(0.01 / 3, rel=1e-4)
    assert groups["object-eef rot"]["mse"] == 0.0  # padding garbage is not counted anywhere


def test_classification_metrics_on_a_known_confusion_matrix():
    predicted = np.array([1, 1, 0, 0, 0, 0, 0, 1], bool)
    label = np.array([1, 0, 1, 0, 0, 0, 0, 0], bool)  # tp 1, fp 2, fn 1, tn 4
    m = wmb.classification(predicted, label)
    assert m["accuracy"] == 5 / 8 and m["positive_rate"] == 2 / 8
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 4 / 6) / 2)
    assert m["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert wmb.classification(np.zeros(4, bool), np.zeros(4, bool))["balanced_accuracy"] is None


def test_reported_training_command_reproduces_the_runs_settings(tmp_path):
    """The report's command = YAML + the --set items the run used; read back by the trainer it is the same config."""
    yaml_path = REPO / "configs" / "world_model_velocity.yaml"
    used = ta.load_config(yaml_path, ["model_config.multi_step=3", "horizon=3", "seed=2", "lr=3e-4"])
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({"config": dataclasses.asdict(used)}))
    command = wmb.training_record(run / "best", str(yaml_path))["command"]
    overrides = command.partition(" --set ")[2].split()
    assert sorted(overrides) == ["horizon=3", "lr=0.0003", "model_config.multi_step=3", "seed=2"]
    assert ta.load_config(yaml_path, overrides) == used
    assert wmb.overrides_against(str(yaml_path), dataclasses.asdict(ta.load_config(yaml_path))) == []


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def save_tiny_world_model(dataset: Path, folder: Path, **fields) -> Path:
    data = ta.load_training_data(dataset)
    config = WorldModelConfig(num_ensemble=2, multi_step=2, **fields)
    config.set_normalization(ta.normalization_mapping(data.normalization))
    torch.manual_seed(0)
    WorldModel(config).save_pretrained(folder)
    return folder


def test_benchmark_end_to_end_writes_json_png_and_markdown(dataset, tmp_path):
    mixer = save_tiny_world_model(dataset, tmp_path / "mixer", hidden_dim=16, token_mlp_dim=8, channel_mlp_dim=16,
                                  num_layers=1)
    mlp = save_tiny_world_model(dataset, tmp_path / "mlp", architecture="mlp", hidden_dim=16, num_layers=2)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## Expert demonstrations\n\nkept\n\n## World model\n\nold numbers\n\n"
                          "## Evaluation\n\nalso kept\n")
    out = tmp_path / "bench"
    argv = ["--dataset", str(dataset), "--mixer", str(mixer), "--mlp", str(mlp), "--out", str(out),
            "--results-md", str(results_md), "--threads", "1", "--speed-batch", "64", "--speed-seconds", "0.05",
            "--sim-steps", "20"]
    results = wmb.main(argv)

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]) == {"mixer", "mlp", "linear", "linear + velocity", "identity"}
    assert saved["models"]["linear + velocity"]["parameters"] == (2 * STATE_DIM + ACTION_DIM + 2 + 1) * STATE_DIM
    assert saved["models"]["mlp"]["architecture"] == "mlp"
    for name in ("mixer", "mlp"):
        model = saved["models"][name]
        assert model["parameters"] == sum(p.numel() for p in WorldModel.from_pretrained(tmp_path / name).parameters())
        assert len(model["open_loop_curve"]) == 25 and set(model["open_loop"]) == {"1", "5", "10", "25"}
        assert model["speed"]["steps_per_s"] > 0 and 0 <= model["success"]["accuracy"] <= 1
    assert saved["models"]["identity"]["success"] is None
    assert saved["robosuite"]["steps"] == 20 and saved["robosuite"]["steps_per_s"] > 0
    # untrained models (tiny residuals) are close to the identity baseline, but not equal to it
    identity, mixer_curve = saved["models"]["identity"]["open_loop_curve"], saved["models"]["mixer"]["open_loop_curve"]
    assert mixer_curve != identity and mixer_curve[0] == pytest.approx(identity[0], rel=0.5)
    assert results["goals"]["one_step_mse_met"] is False  # an untrained model is far from 0.002
    assert (out / "open_loop_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = results_md.read_text()
    assert "old numbers" not in text and "kept" in text and "also kept" in text
    assert text.count("## World model") == 1 and text.index("## World model") < text.index("## Evaluation")
    assert "python benchmarks/world_model.py --dataset" in text and "| identity | 0 |" in text
    assert "Open-loop MSE after 25 steps per state block" in text and "| eef pos (cm) | eef rot (deg) |" in text
    assert (out / "world_model.md").read_text() in text

    wmb.main(argv)  # a second run replaces its own section instead of adding one
    assert results_md.read_text().count("## World model") == 1


def test_benchmark_refuses_a_swapped_model_folder(dataset, tmp_path, capsys):
    mlp = save_tiny_world_model(dataset, tmp_path / "mlp", architecture="mlp", hidden_dim=16, num_layers=1)
    with pytest.raises(SystemExit) as exit_info:
        wmb.main(["--dataset", str(dataset), "--mixer", str(mlp), "--out", str(tmp_path / "bench")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--mixer" in err and "architecture 'mlp', expected 'mixer'" in err
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------------------------
# the plain-MLP architecture
# ---------------------------------------------------------------------------------------------


def test_mlp_world_model_learns_and_round_trips_with_remote_code(tmp_path):
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config(architecture="mlp", hidden_dim=48, num_layers=2))
    assert not any(name.startswith(("blocks", "state_tokens")) for name, _ in model.named_parameters())
    losses = train_losses(model, synthetic_batch())
    assert losses[-1] < 0.5 * losses[0], losses

    model.save_pretrained(tmp_path / "wm_mlp")
    assert json.loads((tmp_path / "wm_mlp" / "config.json").read_text())["architecture"] == "mlp"
    inputs = {"state": torch.randn(5, STATE_DIM), "action": torch.rand(5, ACTION_DIM)}
    instruction = [list(INSTRUCTIONS.values())[i % 2] for i in range(5)]
    expected = dict(zip(("mean", "std", "p_success", "p_done"), model.step(inputs["state"], inputs["action"], instruction),
                        strict=True))
    loaded = outputs_in_fresh_process(tmp_path / "wm_mlp", inputs, instruction, tmp_path)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_world_model_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture"):
        WorldModelConfig(architecture="transformer")


def test_mlp_config_has_the_mixer_config_parameter_count_within_20_percent():
    counts = {}
    for name, path in wmb.TRAIN_CONFIGS.items():
        cfg = ta.load_config(REPO / path)
        config = WorldModelConfig(**cfg.model_config)
        assert config.architecture == name
        counts[name] = sum(p.numel() for p in WorldModel(config).parameters())
    assert 0.8 <= counts["mlp"] / counts["mixer"] <= 1.2, counts
