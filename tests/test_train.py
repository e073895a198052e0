"""The trainer end to end on a tiny synthetic dataset repo: every model kind, checkpoints, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_accelerate as ta
from common.errors import UserError
from data_prep.preprocess import FEATURES
from data_prep.tasks import ACTION_DIM, STATE_DIM, STATE_LAYOUT

torch.set_num_threads(1)  # the machine's 2 cores are shared: 2 threads per process thrash (5-10x slower)

TASKS = {"lift": "Lift the red cube", "can": "Pick up the coke can"}


def synthetic_rows(episodes: int, steps: int, seed: int, first_episode: int, state_dim: int) -> dict[str, list]:
    """Linear dynamics s' = s + 0.5 B a with a state-feedback expert a = tanh(K s): learnable in a few steps.

    The executed action is the expert's label plus a little noise, as in vla-generate's files."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(123).normal(0, 1, (state_dim, ACTION_DIM)).astype(np.float32)
    gain = np.random.default_rng(321).normal(0, 0.5, (ACTION_DIM, state_dim)).astype(np.float32)
    rows: dict[str, list] = {k: [] for k in FEATURES}  # the vla-preprocess schema, column for column
    for e in range(episodes):
        task = list(TASKS)[e % len(TASKS)]
        state = rng.normal(0, 1, state_dim).astype(np.float32)
        length = steps + e % 3  # unequal lengths: windows must stop at episode ends
        for t in range(length):
            label = np.tanh(gain @ state).astype(np.float32)
            action = np.clip(label + rng.normal(0, 0.05, ACTION_DIM), -1, 1).astype(np.float32)
            next_state = (state + 0.5 * mixing @ action).astype(np.float32)
            last = t == length - 1
            rows["task"].append(task)
            rows["instruction"].append(TASKS[task])
            rows["episode"].append(first_episode + e)
            rows["step"].append(t)
            rows["state"].append(state)
            rows["state_mask"].append(np.ones(state_dim, np.float32))
            rows["action"].append(action)
            rows["expert_action"].append(label)
            rows["next_state"].append(next_state)
            rows["reward"].append(float(last))
            rows["done"].append(last)
            rows["success"].append(last)
            rows["source"].append("synthetic.hdf5")
            state = next_state
    return rows


def write_rows_parquet(rows: dict[str, list], path: Path) -> None:
    """Rows -> one Parquet shard through `datasets`, with a fingerprint given: without one `datasets` dill-hashes the
    whole table, which fails on some images (PicklingError on pyarrow's MonthDayNano, docs/SCALING.md)."""
    import pyarrow as pa
    from datasets import Dataset

    Dataset(pa.Table.from_pydict(rows), fingerprint=f"test-{path.name}").to_parquet(str(path))


def write_dataset(root: Path, state_dim: int = STATE_DIM, train_episodes: int = 12, steps: int = 10) -> Path:
    """A dataset repo in the docs/DESIGN.md layout, written with `datasets` like vla-preprocess does."""
    (root / "data").mkdir(parents=True)
    train = synthetic_rows(train_episodes, steps, seed=0, first_episode=0, state_dim=state_dim)
    validation = synthetic_rows(4, steps, seed=1, first_episode=1000, state_dim=state_dim)
    for name, rows in (("train", train), ("validation", validation)):
        write_rows_parquet(rows, root / "data" / f"{name}-00000-of-00001.parquet")
    states, actions = np.stack(train["state"]), np.stack(train["action"])

    def stats(x: np.ndarray) -> dict[str, list[float]]:
        return {
            "mean": x.mean(0).tolist(),
            "std": (x.std(0) + 1e-6).tolist(),
            "min": x.min(0).tolist(),
            "max": x.max(0).tolist(),
        }

    normalization = {"state_layout": STATE_LAYOUT, "state": stats(states), "action": stats(actions)}
    (root / "normalization.json").write_text(json.dumps(normalization))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds") / "repo")


TINY_MODELS = {
    "world": {
        "hidden_dim": 32,
        "token_mlp_dim": 16,
        "channel_mlp_dim": 32,
        "num_layers": 1,
        "num_ensemble": 2,
        "multi_step": 3,
        "velocity_input": True,  # as configs/world_model_velocity.yaml
    },
    "mlp": {"hidden_dim": 32, "num_layers": 2, "chunk_size": 4},
    "policy": {
        "lora_r": 4,
        "lora_alpha": 8.0,
        "chunk_size": 4,
        "num_state_tokens": 1,
        "state_hidden_dim": 32,
        "head_hidden_dim": 32,
        "max_instruction_tokens": 16,
    },
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama saved as a local backbone folder (with MiniLM's tokenizer: any tokenizer will do)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from configuration_vla import MINILM_NAME
    from modeling_vla import resolve_pretrained_path

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_path(MINILM_NAME))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(dataset: Path, out: Path, model: str = "world", **overrides) -> ta.TrainConfig:
    values = dict(
        model=model,
        dataset=str(dataset),
        output_dir=str(out),
        model_config=dict(TINY_MODELS[model]),
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        max_steps=10,
        eval_every=5,
        save_every=5,
        log_every=2,
        seed=0,
    )
    values.update(overrides)
    cfg = ta.TrainConfig(**values)
    cfg.validate("test")
    return cfg


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- data


def test_windows_stop_at_episode_ends(dataset: Path) -> None:
    data = ta.load_training_data(dataset)
    horizon = 4
    windows = ta.WindowDataset(data.train, horizon)
    last_row_of_first_episode = 9  # episode 0 has 10 steps
    batch = ta.collate_windows(windows.__getitems__([0, last_row_of_first_episode - 1]))
    assert batch["actions"].shape == (2, horizon, ACTION_DIM)
    assert batch["next_states"].shape == (2, horizon, STATE_DIM)
    assert batch["state"].shape == (2, STATE_DIM)
    assert batch["step_mask"][0].tolist() == [1, 1, 1, 1]
    assert batch["step_mask"][1].tolist() == [1, 1, 0, 0]  # rows 8, 9 then the next episode starts
    assert batch["done"][1].tolist()[:2] == [0, 1]
    # the window is the episode itself: next_states[k] is the state of step t+k+1
    torch.testing.assert_close(batch["next_states"][0, 0], torch.as_tensor(data.train.state[1]))
    assert batch["instruction"] == ["Lift the red cube"] * 2
    assert data.tasks == ["can", "lift"]
    # s_{t-1}: an episode's first row is at rest (its own state), later rows see the row before
    torch.testing.assert_close(batch["prev_state"][0], torch.as_tensor(data.train.state[0]))
    torch.testing.assert_close(batch["prev_state"][1], torch.as_tensor(data.train.state[last_row_of_first_episode - 2]))
    second_episode = ta.collate_windows(windows.__getitems__([last_row_of_first_episode + 1]))
    torch.testing.assert_close(second_episode["prev_state"][0], second_episode["state"][0])


def test_policies_learn_the_expert_labels_and_world_models_the_executed_actions(dataset: Path) -> None:
    data = ta.load_training_data(dataset)
    assert not np.allclose(data.train.action, data.train.expert_action)
    rows = [0, 5, 17]
    for model, column in (("world", data.train.action), ("policy", data.train.expert_action),
                          ("mlp", data.train.expert_action)):
        loader = ta.make_loader(data.train, 1, ta.TrainConfig(model=model, batch_size=4), shuffle=False)
        batch = ta.collate_windows(loader.dataset.__getitems__(rows))
        np.testing.assert_array_equal(batch["actions"][:, 0].numpy(), column[rows])


def test_datasets_without_expert_labels_use_the_executed_actions(tmp_path: Path) -> None:
    from datasets import load_dataset

    repo = write_dataset(tmp_path / "old")
    for path in (repo / "data").glob("*.parquet"):  # a dataset made before the expert_action column existed
        load_dataset("parquet", data_files=str(path), split="train").remove_columns("expert_action").to_parquet(str(path))
    table = ta.load_training_data(repo).train
    np.testing.assert_array_equal(table.expert_action, table.action)


def test_same_named_dataset_folders_do_not_share_a_cache(tmp_path: Path, make_robomimic_file) -> None:
    """The shared datasets cache keys vla-preprocess repos by folder name and card: repo A came back as B."""
    from data_prep.preprocess import preprocess

    rows = []
    for folder, episodes in (("a", 4), ("b", 7)):
        raw = make_robomimic_file("lift", episodes=episodes, steps=8, seed=episodes)
        out = preprocess([raw], tmp_path / folder / "ds", valid_fraction=0.3)
        rows.append((out.rows["train"], out.rows["validation"]))
    loaded = [ta.load_training_data(tmp_path / folder / "ds") for folder in ("a", "b")]
    assert [(len(d.train), len(d.validation)) for d in loaded] == rows
    assert rows[0] != rows[1]


# ----------------------------------------------------------------------------- config


def test_yaml_and_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: world\nlr: 1e-4\nbatch_size: 8\nmodel_config:\n  hidden_dim: 16\n")
    cfg = ta.load_config(
        path,
        [
            "max_steps=7",
            "model_config.multi_step=2",
            "dataset=123",
            "early_stopping_patience=null",
            "mixed_precision=no",
        ],
    )
    assert cfg.mixed_precision == "no"  # not YAML's False
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.dataset) == (1e-4, 8, 7, "123")
    assert cfg.model_config == {"hidden_dim": 16, "multi_step": 2}
    assert cfg.early_stopping_patience is None


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("lr: 0.1\nbatch_sise: 4\n", [], "unknown key 'batch_sise'"),
        ("lr: [1\n", [], "not valid YAML"),
        ("lr: -0.1\n", [], "lr=-0.1, expected a positive number"),
        ("batch_size: 4\n", ["batch_size=-2"], "batch_size=-2, expected a positive number"),
        ("batch_size: 4\n", ["batch_size=four"], "--set batch_size: batch_size='four' is not a valid int"),
        ("model: diffusion\n", [], "model='diffusion'"),
        ("best_checkpoint: lowest\n", [], "best_checkpoint='lowest', expected one of ['val_loss', 'last']"),
        # issue 40, case 2: non-finite values trained to NaN weights
        ("lr: 0.1\n", ["lr=.inf"], "--set lr: lr=inf, expected a finite number"),
        ("lr: .nan\n", [], "lr=nan, expected a finite number"),
        ("batch_size: 4\n", ["max_grad_norm=.inf"], "max_grad_norm=inf, expected a finite number"),
        ("batch_size: 4\n", ["weight_decay=.nan"], "weight_decay=nan, expected a finite number"),
        ("batch_size: 4\n", ["model_config.input_noise=.nan"], "--set model_config.input_noise: nan, expected finite numbers"),
        ("model_config:\n  input_noise: .inf\n", [], "model_config.input_noise=inf, expected finite numbers"),
        ("batch_size: 4\n", ["model_config.state_token_groups=[3, .inf]"], "model_config.state_token_groups"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path: Path, capsys, text: str, overrides: list[str], message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = ["--config", str(path)] + (["--set", *overrides] if overrides else [])
    with pytest.raises(SystemExit) as exit_info:
        ta.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if "unknown key" in message:
        assert str(path) in err


@pytest.mark.parametrize("path", sorted(Path(ta.__file__).parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_real_model_fields(path: Path) -> None:
    from model_kinds import get_kind

    cfg = ta.load_config(path)
    config_class = get_kind(cfg.model).config_class
    config = config_class(**cfg.model_config)  # validates the values; the VLA backbone is not loaded here
    assert set(cfg.model_config) <= set(config.to_dict())


def test_missing_dataset_is_one_line_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"dataset: {tmp_path / 'nowhere'}\n")
    with pytest.raises(SystemExit):
        ta.main(["--model", "world", "--config", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere does not exist" in err, err


def test_state_width_mismatch_is_refused(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, tmp_path / "out")
    cfg.model_config["state_dim"] = 20
    with pytest.raises(UserError, match=rf"^dataset {dataset} has state width {STATE_DIM} but model config state_dim=20$"):
        ta.train(cfg)


def test_unknown_model_config_field_is_refused(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, tmp_path / "out")
    cfg.model_config["hiden_dim"] = 8
    with pytest.raises(UserError, match="model_config.hiden_dim is not a WorldModelConfig field"):
        ta.train(cfg)


# ----------------------------------------------------------------------------- training


def test_world_model_trains_checkpoints_and_saves_best(dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    out = tmp_path / "world"
    summary = ta.train(tiny_config(dataset, out, max_steps=20, eval_every=10, save_every=5))
    assert summary["steps"] == 20
    assert [p.name for p in ta.list_checkpoints(out)] == ["step_15", "step_20"]  # keeps the last 2
    assert not list(out.rglob(".tmp-*"))
    assert summary["best_val_loss"] is not None and summary["params_trainable"] == summary["params_total"] > 0
    written = json.loads((out / "train_summary.json").read_text())
    assert written["steps"] == 20 and written["config"]["max_steps"] == 20
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # learning: training loss falls and the second validation is better than the first
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    train_loss = [e.value for e in events.Scalars("train/loss")]
    val_loss = [e.value for e in events.Scalars("val/loss")]
    assert train_loss[-1] < 0.8 * train_loss[0] and val_loss[1] < val_loss[0], (train_loss, val_loss)
    assert summary["best_val_loss"] == pytest.approx(min(val_loss))
    assert {"train/one_step_mse", "train/lr", "train/samples_per_s", "val/one_step_mse"} <= set(
        events.Tags()["scalars"]
    )
    best = AutoModel.from_pretrained(out / "best", trust_remote_code=True)
    assert type(best).__name__ == "WorldModel"
    assert best.config.tasks == ["can", "lift"] and best.config.state_layout == STATE_LAYOUT
    # velocity_scale: the train split's std of one-step changes per dim, in normalised units
    train = ta.load_training_data(dataset).train
    std = np.asarray(best.config.state_std)
    for dim in (0, 5, STATE_DIM - 1):
        rows = train.state_mask[:, dim] > 0
        change = (train.next_state[rows, dim] - train.state[rows, dim]) / std[dim]
        expected = change.std() if rows.any() and change.std() > 1e-6 else 1.0
        assert best.config.velocity_scale[dim] == pytest.approx(expected, rel=1e-4), dim


@pytest.mark.parametrize(("best_checkpoint", "best_is_final"), [("val_loss", False), ("last", True)])
def test_best_checkpoint_keeps_the_lowest_validation_loss_or_the_latest_model(
    dataset: Path, tmp_path: Path, monkeypatch, best_checkpoint: str, best_is_final: bool
) -> None:
    real_evaluate = ta.evaluate
    evaluations = iter(range(100))

    def rising_validation_loss(*args, **kwargs) -> dict[str, float]:
        # a validation loss that only gets worse, as an overfitting policy's can while it still improves in closed loop
        return {**real_evaluate(*args, **kwargs), "loss": 1.0 + next(evaluations)}

    monkeypatch.setattr(ta, "evaluate", rising_validation_loss)
    out = tmp_path / best_checkpoint
    summary = ta.train(tiny_config(dataset, out, model="mlp", best_checkpoint=best_checkpoint))
    assert summary["best_val_loss"] == 1.0  # the summary reports the lowest validation loss either way
    best, final = state_dict_of(out / "best"), state_dict_of(out / "final")
    same = all(torch.equal(best[name], final[name]) for name in final)
    assert same is best_is_final


def test_a_nan_validation_loss_is_never_the_best(dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 40, case 2: a NaN validation loss was accepted as best (and best/ saved from it)."""
    real_evaluate = ta.evaluate
    losses = iter([float("nan"), 2.0, float("nan"), 1.0, float("nan")])

    def evaluate(*args, **kwargs) -> dict[str, float]:
        return {**real_evaluate(*args, **kwargs), "loss": next(losses)}

    monkeypatch.setattr(ta, "evaluate", evaluate)
    out = tmp_path / "run"
    saved = []
    real_save = ta.save_model
    monkeypatch.setattr(ta, "save_model", lambda acc, model, out_dir, name: saved.append(name) or real_save(acc, model, out_dir, name))
    summary = ta.train(tiny_config(dataset, out, model="mlp", max_steps=10, eval_every=2, save_every=100))
    assert summary["best_val_loss"] == 1.0
    assert saved == ["best", "best", "final"]  # at the evaluations with losses 2 and 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and all("validation loss is nan" in w for w in warnings), warnings


def test_a_non_finite_training_loss_stops_the_run_and_saves_nothing(dataset: Path, tmp_path: Path, capsys) -> None:
    """Issue 40, case 2: lr=1e30 trained to NaN weights and saved best/ and final/ from them."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        ta.main(["--model", "mlp", "--config", str(write_config(tmp_path, dataset, out, "mlp")),
                 "--set", "lr=1e30", "eval_every=100", "save_every=100"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert re.search(r"step \d+: training loss is (nan|inf)", errors[0]), errors[0]
    assert not (out / "best").exists() and not (out / "final").exists()


def test_non_finite_weights_are_never_saved(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 40, case 2: best/ and final/ are never written from NaN weights, whatever the loss said."""
    real_evaluate = ta.evaluate

    def evaluate_then_weights_break(accelerator, model, loader, max_batches):
        result = real_evaluate(accelerator, model, loader, max_batches)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return result

    monkeypatch.setattr(ta, "evaluate", evaluate_then_weights_break)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^step 5: the weights hold NaN or inf values \(mlp\.0\.weight\); not saving best/"):
        ta.train(tiny_config(dataset, out, model="mlp"))
    assert not (out / "best").exists() and not (out / "final").exists()


def test_non_finite_training_data_is_refused(tmp_path: Path) -> None:
    """Issue 40, case 2: nothing non-finite passes silently, also from a dataset not made by vla-preprocess."""
    import pyarrow.parquet as pq

    dataset = write_dataset(tmp_path / "ds")
    shard = dataset / "data" / "validation-00000-of-00001.parquet"
    rows = pq.read_table(shard).to_pydict()
    rows["next_state"][7][3] = float("inf")
    write_rows_parquet(rows, shard)
    with pytest.raises(UserError, match=r"validation split: next_state holds NaN or inf \(row 7\)"):
        ta.train(tiny_config(dataset, tmp_path / "run"))


def test_a_fresh_run_replaces_only_a_best_it_wrote(dataset: Path, tmp_path: Path) -> None:
    """Issue 40, case 1 (where it applies to the trainer): best/ and final/ are replaced, so they must be its own."""
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "keep.txt").write_text("mine")
    cfg = tiny_config(dataset, out, model="mlp", max_steps=2, eval_every=2, save_every=100)
    with pytest.raises(UserError, match="best/ was not written by vla-train"):
        ta.train(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["best"] and (out / "best" / "keep.txt").is_file()
    shutil.rmtree(out / "best")
    ta.train(cfg)
    ta.train(cfg)  # its own best/ and final/ (no checkpoints: nothing to --resume)
    assert (out / "best" / "model.safetensors").is_file()


def test_an_unwritable_output_dir_is_one_line(dataset: Path, unwritable_folder: Path) -> None:
    """Issue 40, case 6: a read-only output folder gave a PermissionError traceback."""
    with pytest.raises(UserError, match="cannot write there"):
        ta.train(tiny_config(dataset, unwritable_folder / "vla-test-run", model="mlp"))


def write_config(tmp_path: Path, dataset: Path, out: Path, model: str) -> Path:
    """A YAML file of tiny_config's values, for the command-line tests."""
    import yaml

    cfg = dataclasses.asdict(tiny_config(dataset, out, model=model))
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def crafted_pickle(path: Path, marker: Path) -> None:
    """A torch.save file whose unpickling would create `marker`: what a crafted checkpoint runs on load."""

    class Crafted:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state": Crafted()}, path)


def two_checkpoints(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A world-model run with checkpoints step_2 and step_4; returns (run, newest checkpoint)."""
    run = tmp_path / "run"
    ta.train(tiny_config(dataset, run, max_steps=4, save_every=2, eval_every=2))
    return run, ta.list_checkpoints(run)[-1]


# What a checkpoint holds; the last is accelerate's pickled scheduler, which only runs made before issue 40 have.
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json",
                    "custom_checkpoint_0.pkl"]


def test_checkpoints_keep_the_lr_schedule_as_json(dataset: Path, tmp_path: Path) -> None:
    _, newest = two_checkpoints(dataset, tmp_path)
    assert sorted(p.name for p in newest.iterdir()) == sorted(CHECKPOINT_FILES[:-1])
    schedule = json.loads((newest / ta.TRAINER_STATE).read_text())["lr_schedule"]
    assert schedule["last_epoch"] == 4 and schedule["base_lrs"] == [3e-3]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_runs_no_pickled_code_from_any_checkpoint_file(dataset: Path, tmp_path: Path, capsys, name: str) -> None:
    """Issue 40, case 3: accelerate loaded the scheduler's custom_checkpoint_0.pkl with weights_only=False."""
    run, newest = two_checkpoints(dataset, tmp_path)
    marker = tmp_path / "code_ran"
    crafted_pickle(newest / name, marker)
    try:
        summary, error = ta.train(tiny_config(dataset, run, max_steps=5, save_every=2, eval_every=2), resume=True), None
    except Exception as err:  # noqa: BLE001 - checked below, after the marker
        error = err
    assert not marker.exists(), "the crafted pickle ran code on --resume"
    if error is not None:
        assert isinstance(error, UserError) and name in str(error), repr(error)
    else:
        assert summary["steps"] == 5
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and name in warnings[0] and "step_2" in warnings[0], warnings


@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", "truncate"), ("optimizer.bin", "truncate"),
                                              ("trainer_state.json", "break"), ("random_states_0.pkl", "truncate")])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    dataset: Path, tmp_path: Path, capsys, name: str, damage: str
) -> None:
    """Issue 40, case 4: a truncated or broken checkpoint file gave a traceback without the file's name."""
    run, newest = two_checkpoints(dataset, tmp_path)
    path = newest / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text('{"step": 4, "epoch"')
    summary = ta.train(tiny_config(dataset, run, max_steps=5, save_every=2, eval_every=2), resume=True)
    assert summary["steps"] == 5
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "step_2" in warnings[0], warnings
    assert "resumed from" in out.out and "step_2" in out.out


def test_a_corrupt_only_checkpoint_is_one_line_naming_the_file(dataset: Path, tmp_path: Path, capsys) -> None:
    """Issue 40, case 4: with no earlier checkpoint to fall back on, stop with one line naming the file."""
    run, newest = two_checkpoints(dataset, tmp_path)
    shutil.rmtree(ta.list_checkpoints(run)[0])
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit) as exit_info:
        ta.main(["--model", "world", "--config", str(write_config(tmp_path, dataset, run, "world")), "--resume"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(errors) == 1 and str(newest / "model.safetensors") in errors[0], errors


@pytest.mark.parametrize("setting", [{"input_noise": 0.3}, {"loss_units": "step"}])
def test_input_noise_and_step_loss_read_the_data_step_sizes_without_velocity_input(
    dataset: Path, tmp_path: Path, setting: dict
) -> None:
    from transformers import AutoModel

    poses_only = {**TINY_MODELS["world"], "velocity_input": False}
    for extra, out in (({}, tmp_path / "plain"), (setting, tmp_path / "scaled")):
        ta.train(tiny_config(dataset, out, max_steps=2, eval_every=2, save_every=2,
                             model_config={**poses_only, **extra}))
    plain = AutoModel.from_pretrained(tmp_path / "plain" / "best", trust_remote_code=True)
    scaled = AutoModel.from_pretrained(tmp_path / "scaled" / "best", trust_remote_code=True)
    assert plain.config.velocity_scale == [1.0] * STATE_DIM
    # noise and the step-unit loss are sized by each dim's one-step change
    assert scaled.config.velocity_scale != [1.0] * STATE_DIM


def test_derive_relative_pose_gets_each_tasks_frame_from_the_data(dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    ta.train(tiny_config(dataset, tmp_path / "w", max_steps=2, eval_every=2, save_every=2,
                         model_config={**TINY_MODELS["world"], "derive_relative_pose": True}))
    model = AutoModel.from_pretrained(tmp_path / "w" / "best", trust_remote_code=True)
    assert model.config.derive_relative_pose
    assert model.config.relative_pose_frames == {"lift": "world", "can": "eef_lagged"}  # the data's two tasks


def test_existing_checkpoints_need_resume(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, tmp_path / "w", max_steps=3, save_every=3, eval_every=3)
    ta.train(cfg)
    with pytest.raises(UserError, match="pass --resume"):
        ta.train(cfg)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    dataset: Path, tmp_path: Path, monkeypatch, accumulation: int
) -> None:
    """Crash right after the step-6 checkpoint, resume, and land on the same weights as a straight 10-step run.

    132 windows // 16 = 8 batches per epoch: step 6 is mid-epoch (resume must skip the seen batches) and the
    run crosses an epoch boundary after resuming; the world model draws random ensemble masks (RNG restored).
    """
    straight = ta.train(tiny_config(dataset, tmp_path / "straight", save_every=3, grad_accum_steps=accumulation))
    crashed_dir = tmp_path / "crashed"
    real_save = ta.save_checkpoint

    def save_then_crash(accelerator, output_dir, state, keep):
        path = real_save(accelerator, output_dir, state, keep)
        if state["step"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return path

    monkeypatch.setattr(ta, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ta.train(tiny_config(dataset, crashed_dir, save_every=3, grad_accum_steps=accumulation))
    monkeypatch.setattr(ta, "save_checkpoint", real_save)
    assert [p.name for p in ta.list_checkpoints(crashed_dir)] == ["step_3", "step_6"]
    assert not (crashed_dir / "final").exists()
    # The summary's wall time covers every process of the run: pretend the crashed one ran for 1000 s.
    crashed_state = crashed_dir / "checkpoints" / "step_6" / ta.TRAINER_STATE
    recorded = json.loads(crashed_state.read_text())
    assert recorded["wall_time_s"] > 0
    crashed_state.write_text(json.dumps({**recorded, "wall_time_s": 1000.0}))

    resumed = ta.train(tiny_config(dataset, crashed_dir, save_every=3, grad_accum_steps=accumulation), resume=True)
    assert resumed["steps"] == 10
    expected, got = state_dict_of(tmp_path / "straight" / "final"), state_dict_of(crashed_dir / "final")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    assert resumed["wall_time_s"] > 1000.0


@pytest.mark.parametrize(("kind", "velocity_input"), [("mlp", False), ("policy", False), ("mlp", True), ("policy", True)])
def test_policies_train_and_load_with_auto_model(
    kind: str, velocity_input: bool, dataset: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoModel

    cfg = tiny_config(dataset, tmp_path / kind, model=kind, max_steps=12, eval_every=6, save_every=6, lr=1e-2)
    if kind == "policy":
        cfg.model_config["backbone"] = str(tiny_llama)
    cfg.model_config["velocity_input"] = velocity_input
    summary = ta.train(cfg)
    assert summary["model_class"] == {"mlp": "MLPPolicy", "policy": "VLAPolicy"}[kind]
    assert summary["horizon"] == 4 and summary["steps"] == 12
    first, last = summary["first_train_loss"], summary["last_train_loss"]
    assert last < first, (first, last)
    if kind == "policy":  # LoRA: the backbone is frozen, only adapters + state encoder + head train
        assert 0 < summary["params_trainable"] < summary["params_total"]
    model = AutoModel.from_pretrained(tmp_path / kind / "best", trust_remote_code=True)
    assert type(model).__name__ == summary["model_class"]
    states = torch.as_tensor(ta.load_training_data(dataset).validation.state[:3])
    chunk = model.predict_actions(states, "Lift the red cube")
    assert chunk.shape == (3, 4, ACTION_DIM) and torch.isfinite(chunk).all()
    moved = model.predict_actions(states, "Lift the red cube", prev_state=states - 0.05)
    assert torch.equal(moved, chunk) != velocity_input  # s_{t-1} is read only with velocity_input
    # the trainer sizes the velocity input by the data's one-step changes (ones when the model does not read it)
    assert (model.config.velocity_scale != [1.0] * STATE_DIM) == velocity_input


@pytest.mark.parametrize("kind", ["mlp", "policy", "world"])
def test_init_from_starts_at_the_saved_weights(kind: str, dataset: Path, tiny_llama: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, tmp_path / "first", model=kind, max_steps=6, eval_every=3, save_every=3)
    if kind == "policy":
        cfg.model_config["backbone"] = str(tiny_llama)
    ta.train(cfg)
    saved = state_dict_of(tmp_path / "first" / "best")
    # lr ~0 and no weight decay: a fine-tune must end where it started, on the saved weights (fresh ones differ)
    tune = tiny_config(
        dataset, tmp_path / "tune", model=kind, model_config={}, init_from=str(tmp_path / "first" / "best"),
        lr=1e-12, weight_decay=0.0, max_steps=2, eval_every=1, save_every=2, seed=1,
    )
    summary = ta.train(tune)
    tuned = state_dict_of(tmp_path / "tune" / "final")
    assert tuned.keys() == saved.keys()
    for name, weight in saved.items():
        torch.testing.assert_close(tuned[name], weight, atol=1e-6, rtol=0, msg=name)
    if kind == "policy":  # still LoRA: the loaded backbone stays frozen
        assert 0 < summary["params_trainable"] < summary["params_total"]
    assert summary["config"]["init_from"] == str(tmp_path / "first" / "best")


def test_init_from_can_start_reading_yaw_features_through_zero_weights(dataset: Path, tmp_path: Path) -> None:
    ta.train(tiny_config(dataset, tmp_path / "first", model="mlp", max_steps=2, eval_every=2, save_every=2))
    first = tmp_path / "first" / "best"
    tune = tiny_config(
        dataset, tmp_path / "tune", model="mlp", model_config={"relative_yaw_harmonics": [4]}, init_from=str(first),
        lr=1e-12, weight_decay=0.0, max_steps=2, eval_every=1, save_every=2,
    )
    ta.train(tune)
    saved, tuned = state_dict_of(first)["mlp.0.weight"], state_dict_of(tmp_path / "tune" / "final")["mlp.0.weight"]
    assert tuned.shape[1] == saved.shape[1] + 2  # cos, sin of 4 d, between the state and the instruction
    torch.testing.assert_close(torch.cat([tuned[:, :STATE_DIM], tuned[:, STATE_DIM + 2 :]], 1), saved, atol=1e-6, rtol=0)
    assert tuned[:, STATE_DIM : STATE_DIM + 2].abs().max() < 1e-6
    assert json.loads((tmp_path / "tune" / "final" / "config.json").read_text())["relative_yaw_harmonics"] == [4]
    again = tiny_config(
        dataset, tmp_path / "again", model="mlp", model_config={"relative_yaw_harmonics": [1]},
        init_from=str(tmp_path / "tune" / "final"),
    )
    with pytest.raises(UserError, match=re.escape("model_config.relative_yaw_harmonics=[1], but the saved model has [4]")):
        ta.train(again)
    saw = tiny_config(
        dataset, tmp_path / "saw", model="mlp", model_config={"relative_yaw_harmonics": [4], "relative_yaw_sawtooth": True},
        init_from=str(tmp_path / "tune" / "final"), lr=1e-12, weight_decay=0.0, max_steps=2, eval_every=1, save_every=2,
    )
    ta.train(saw)
    sawed = state_dict_of(tmp_path / "saw" / "final")["mlp.0.weight"]
    assert sawed.shape[1] == tuned.shape[1] + 1  # wrap(4 d) / pi, after cos and sin
    yaw_end = STATE_DIM + 2
    torch.testing.assert_close(torch.cat([sawed[:, :yaw_end], sawed[:, yaw_end + 1 :]], 1), tuned, atol=1e-6, rtol=0)
    assert sawed[:, yaw_end].abs().max() < 1e-6


def dropped_weight(folder: Path, copy: Path) -> Path:
    """A copy of a saved model folder without the last of its weights."""
    from safetensors.torch import save_file

    shutil.copytree(folder, copy)
    weights = state_dict_of(copy)
    del weights[sorted(weights)[-1]]
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_init_from_refuses_what_it_cannot_fine_tune(dataset: Path, tmp_path: Path) -> None:
    ta.train(tiny_config(dataset, tmp_path / "mlp", model="mlp", max_steps=2, eval_every=2, save_every=2))
    saved = tmp_path / "mlp" / "best"
    cases = [
        ("world", {}, saved, f"init_from {saved}: holds a MLPPolicy, but --model world trains a WorldModel"),
        ("mlp", {"chunk_size": 8}, saved, f"init_from {saved}: model_config.chunk_size=8, but the saved model has 4"),
        ("mlp", {}, tmp_path / "nowhere", "no config.json there"),
        ("mlp", {}, dropped_weight(saved, tmp_path / "dropped"), "1 weights missing (mlp.8.weight)"),  # issue 40, case 4
    ]
    for n, (kind, model_config, folder, message) in enumerate(cases):
        cfg = tiny_config(dataset, tmp_path / f"out{n}", model=kind, model_config=model_config, init_from=str(folder))
        with pytest.raises(UserError, match=re.escape(message)):
            ta.train(cfg)


def test_fixed_instruction_trains_the_language_blind_control(dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """fixed_instruction (issue 46's chance line): every batch of both splits carries the one string, nothing else."""
    seen: list[str] = []
    original = ta.WindowDataset.__getitems__

    def spy(self, indices):
        batch = original(self, indices)
        seen.extend(batch["instruction"])
        return batch

    monkeypatch.setattr(ta.WindowDataset, "__getitems__", spy)
    ta.train(tiny_config(dataset, tmp_path / "blind", model="mlp", max_steps=2, eval_every=2, save_every=2,
                         fixed_instruction="Do the task."))
    assert seen and set(seen) == {"Do the task."}
    with pytest.raises(UserError, match="fixed_instruction=' ', expected a non-empty string or null"):
        tiny_config(dataset, tmp_path / "bad", fixed_instruction=" ").validate("cfg")
