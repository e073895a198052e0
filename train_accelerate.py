"""The one trainer for every model: world model, VLA policy and MLP baseline.

    vla-train --model world --config configs/world_model.yaml [--set lr=3e-4 model_config.hidden_dim=128]
    accelerate launch train_accelerate.py --model policy --config configs/vla_minilm_cpu.yaml --resume

Reads a `vla-preprocess` dataset repo, cuts it into windows of H steps (docs/DESIGN.md "Training batches"),
and trains with Accelerate (mixed precision, gradient accumulation, multi-GPU), logging to TensorBoard.
Output folder:

    <output_dir>/checkpoints/step_<N>/   accelerator.save_state + trainer_state.json (last `keep_checkpoints`); the
                                         LR schedule's state is JSON in trainer_state.json, so no file of a checkpoint
                                         is unpickled with code (torch.load runs with weights_only=True); an
                                         unreadable newest checkpoint falls back to the one before, with a warning
    <output_dir>/best/                   save_pretrained of the lowest validation loss (best_checkpoint: val_loss)
                                         or of the latest evaluation (best_checkpoint: last)
    <output_dir>/final/                  save_pretrained at the end
    <output_dir>/logs/                   TensorBoard
    <output_dir>/train_summary.json

Nothing non-finite passes: config values, the dataset's numbers, the training loss (the run stops with one line) and
the weights before any save; a NaN validation loss is never the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.atomic import mark, replace_dir, written_by
from common.errors import UserError, first_line, run_cli
from model_kinds import get_kind, kind_names

BEST_CHECKPOINTS = ("val_loss", "last")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
LEGACY_SCHEDULER = "custom_checkpoint_0.pkl"  # checkpoints made before the schedule moved into trainer_state.json
COMMAND = "vla-train"  # the name in the marker of best/ and final/


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML files in configs/ hold exactly these keys."""

    model: str = "world"  # a model kind (model_kinds.py): world | policy | mlp
    dataset: str = "data/hf_dataset"  # a vla-preprocess output folder
    output_dir: str = "runs/world_model"
    model_config: dict[str, Any] = field(default_factory=dict)  # kwargs for the model's PretrainedConfig
    batch_size: int = 256  # per device, per micro-batch
    grad_accum_steps: int = 1  # effective batch = batch_size x grad_accum_steps x processes
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000  # optimizer steps
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None  # no | fp16 | bf16; None: from `accelerate launch`/env (else no)
    seed: int = 0
    eval_every: int = 200
    max_eval_batches: int | None = None  # None: the whole validation split
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    num_workers: int = 0
    horizon: int | None = None  # window length H; None: the model config's multi_step / chunk_size
    early_stopping_patience: int | None = None  # evaluations without a new best before stopping
    # What best/ holds: the lowest validation loss (val_loss), or the model at the latest evaluation (last). A policy's
    # validation loss can bottom out early while its closed-loop success still rises (the MLP-BC's: docs/experiments/036).
    best_checkpoint: str = "val_loss"
    # A saved model folder (a run's best/ or final/) to start from instead of fresh weights: a fine-tune, e.g. a
    # DAgger round on more data. The model keeps its own config, normalisation and tasks (its weights expect
    # them); model_config may only repeat its values (so the run's YAML can be reused). The optimizer, schedule
    # and step count start afresh.
    init_from: str | None = None
    # The language-blind control (issue 46): every instruction of both splits replaced by this one string, so the
    # model learns from the same data without the words; evaluate it with the same string (benchmarks/language.py).
    fixed_instruction: str | None = None

    def validate(self, source: str) -> None:
        """Refuse values that would fail later with a worse message (or silently train nonsense)."""
        if self.model not in kind_names():
            raise UserError(f"{source}: model={self.model!r}, expected one of {kind_names()}")
        if self.best_checkpoint not in BEST_CHECKPOINTS:
            raise UserError(
                f"{source}: best_checkpoint={self.best_checkpoint!r}, expected one of {list(BEST_CHECKPOINTS)}"
            )
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"{source}: mixed_precision={self.mixed_precision!r}, expected one of {list(MIXED_PRECISION)}"
            )
        for item in dataclasses.fields(self):  # before the range checks: nan > 0 is False, inf > 0 is True
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{source}: {item.name}={value!r}, expected a finite number")
        for key, value in self.model_config.items():
            if not all_finite(value):
                raise UserError(f"{source}: model_config.{key}={value!r}, expected finite numbers")
        positive = (
            "batch_size",
            "grad_accum_steps",
            "lr",
            "max_steps",
            "eval_every",
            "save_every",
            "log_every",
            "keep_checkpoints",
            "max_grad_norm",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{source}: {name}={getattr(self, name)!r}, expected a positive number")
        for name in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"{source}: {name}={getattr(self, name)!r}, expected >= 0")
        for name in ("horizon", "early_stopping_patience", "max_eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{source}: {name}={value!r}, expected a positive integer or null")
        if self.fixed_instruction is not None and not (isinstance(self.fixed_instruction, str)
                                                       and self.fixed_instruction.strip()):
            raise UserError(f"{source}: fixed_instruction={self.fixed_instruction!r}, expected a non-empty string or null")


def all_finite(value: Any) -> bool:
    """No NaN or inf anywhere in a config value (numbers, lists and dicts of them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    return True


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _allowed_types(name: str) -> tuple[Any, ...]:
    expected = _field_types()[name]
    return typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the type of TrainConfig.<name>; one-line error if it cannot be."""
    allowed = _allowed_types(name)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            try:  # PyYAML reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                continue
        if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            return dict(value)
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    hint = " (quote it: YAML reads no/yes/on/off as booleans)" if isinstance(value, bool) and str in allowed else ""
    raise UserError(f"{source}: {name}={value!r} is not a valid {names}{hint}")


def load_config(path: str | Path | None, overrides: Sequence[str] = (), **explicit: Any) -> TrainConfig:
    """YAML file -> TrainConfig, then `key=value` overrides (dotted keys reach into model_config).

    `explicit` holds values from dedicated CLI flags (model, dataset, output_dir); None means "not given".
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(
                f"{path}: expected a mapping of TrainConfig keys at the top level, got {type(loaded).__name__}"
            )
        values = dict(loaded)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            raise UserError(f"{source}: unknown key {key!r} (expected one of {sorted(known)})")
    values = {key: _coerce(key, value, source) for key, value in values.items()}
    values.setdefault("model_config", {})
    values["model_config"] = dict(values["model_config"] or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value")
        value = yaml.safe_load(raw) if raw else ""
        if key.startswith("model_config."):
            if not all_finite(value):
                raise UserError(f"--set {key}: {value!r}, expected finite numbers")
            values["model_config"][key.removeprefix("model_config.")] = value
        elif key in known:
            # String fields keep the text as typed (YAML would turn `mixed_precision=no` into False).
            as_text = str in _allowed_types(key) and value is not None
            values[key] = _coerce(key, raw if as_text else value, f"--set {key}")
            if not all_finite(values[key]):  # named here: validate() would name the YAML file
                raise UserError(f"--set {key}: {key}={values[key]!r}, expected a finite number")
        else:
            raise UserError(f"--set {key}: unknown key (expected one of {sorted(known)} or model_config.<field>)")
    for key, value in explicit.items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    config = TrainConfig(**values)
    config.validate(source)
    return config


# ----------------------------------------------------------------------------- data


@dataclass
class EpisodeTable:
    """One split as flat numpy arrays, rows sorted by (episode, step), plus where each row's episode ends."""

    state: np.ndarray  # [N, D]
    prev_state: np.ndarray  # [N, D] the row before in the same episode; an episode's first row repeats its state
    state_mask: np.ndarray  # [N, D]
    action: np.ndarray  # [N, A] executed
    expert_action: np.ndarray  # [N, A] the expert's label (what policies learn)
    next_state: np.ndarray  # [N, D]
    success: np.ndarray  # [N] float32
    done: np.ndarray  # [N] float32
    instruction: np.ndarray  # [N] object (str)
    task: np.ndarray  # [N] object (str)
    episode_end: np.ndarray  # [N] int64, one past the episode's last row

    def __len__(self) -> int:
        return len(self.state)

    @classmethod
    def from_split(cls, split, name: str) -> EpisodeTable:
        columns = (
            "episode",
            "step",
            "state",
            "state_mask",
            "action",
            "expert_action",
            "next_state",
            "success",
            "done",
            "instruction",
            "task",
        )
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise UserError(f"{name}: missing columns {missing} (expected the docs/DESIGN.md dataset layout)")
        arrays = split.with_format("numpy")[:] if len(split) else {c: np.zeros(0) for c in columns}
        episode = np.asarray(arrays["episode"], dtype=np.int64)
        step = np.asarray(arrays["step"], dtype=np.int64)
        order = np.lexsort((step, episode))  # the repo is sorted already; this makes the windows safe if not
        episode = episode[order]

        def take(col: str, dtype) -> np.ndarray:
            return np.asarray(arrays[col])[order].astype(dtype, copy=False)

        # Each row's window may not cross into the next episode: it ends where the episode id changes.
        change = np.flatnonzero(np.diff(episode)) + 1
        bounds = np.concatenate([change, [len(episode)]])
        episode_end = (
            np.repeat(bounds, np.diff(np.concatenate([[0], bounds]))) if len(episode) else np.zeros(0, np.int64)
        )
        numbers = {column: take(column, np.float32)
                   for column in ("state", "state_mask", "action", "expert_action", "next_state")}
        for column, values in numbers.items():  # a dataset not made by vla-preprocess (which refuses them) may hold some
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(1)
            if bad.any():
                raise UserError(f"{name}: {column} holds NaN or inf (row {int(np.flatnonzero(bad)[0])}); "
                                "expected finite numbers")
        state = numbers["state"]
        first = np.ones(len(episode), bool)
        first[1:] = episode[1:] != episode[:-1]
        prev_state = np.concatenate([state[:1], state[:-1]])
        prev_state[first] = state[first]
        return cls(
            state=state,
            prev_state=prev_state,
            state_mask=numbers["state_mask"],
            action=numbers["action"],
            expert_action=numbers["expert_action"],
            next_state=numbers["next_state"],
            success=take("success", np.float32),
            done=take("done", np.float32),
            instruction=take("instruction", object),
            task=take("task", object),
            episode_end=episode_end.astype(np.int64),
        )


class WindowDataset(torch.utils.data.Dataset):
    """Every row t is a window start; a batch is gathered with one fancy index per array, no per-row Python."""

    def __init__(self, table: EpisodeTable, horizon: int, action_column: str = "action"):
        if action_column not in ("action", "expert_action"):
            raise ValueError(f"action_column must be 'action' or 'expert_action', got {action_column!r}")
        self.table = table
        self.offsets = np.arange(horizon)
        self.actions = getattr(table, action_column)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """Called by DataLoader with a whole batch of start rows (torch's batched fetch)."""
        t = self.table
        rows = np.asarray(indices, dtype=np.int64)
        end = t.episode_end[rows, None]
        window = rows[:, None] + self.offsets  # [B, H]
        step_mask = window < end
        # Past the episode's end, repeat its last step (an absorbing state); step_mask marks those as padding.
        window = np.minimum(window, end - 1)
        return {
            "instruction": t.instruction[rows].tolist(),
            "task": t.task[rows].tolist(),
            "state": t.state[rows],
            "prev_state": t.prev_state[rows],
            "state_mask": t.state_mask[rows],
            "actions": self.actions[window],
            "next_states": t.next_state[window],
            "step_mask": step_mask.astype(np.float32),
            "success": t.success[window],
            "done": t.done[window],
        }


def collate_windows(batch: dict[str, Any]) -> dict[str, Any]:
    """The dataset already batched (see __getitems__); only numpy -> torch is left."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch): resuming at epoch e replays exactly the same order.

    Uses its own numpy generator, never torch's global RNG, so creating loaders cannot shift dropout noise.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())


@dataclass
class TrainingData:
    train: EpisodeTable
    validation: EpisodeTable
    normalization: Any  # data_prep.preprocess.Normalization (train-split statistics)
    tasks: list[str]
    state_dim: int


def load_training_data(dataset_dir: str | Path) -> TrainingData:
    from data_prep.preprocess import load_normalization, load_vla_dataset

    path = Path(dataset_dir)
    if not path.is_dir():
        raise UserError(f"dataset directory {path} does not exist (expected a vla-preprocess output folder)")
    # load_vla_dataset reads the shards into memory, bypassing datasets' name-keyed shared cache.
    splits = load_vla_dataset(path)
    train = EpisodeTable.from_split(splits["train"], f"{path} train split")
    validation = EpisodeTable.from_split(splits["validation"], f"{path} validation split")
    del splits
    if len(train) == 0 or len(validation) == 0:
        raise UserError(
            f"dataset {path}: train has {len(train)} rows and validation {len(validation)}; both must be non-empty"
        )
    return TrainingData(
        train=train,
        validation=validation,
        normalization=load_normalization(path),
        tasks=sorted(set(train.task.tolist())),
        state_dim=train.state.shape[1],
    )


def make_loader(table: EpisodeTable, horizon: int, cfg: TrainConfig, shuffle: bool) -> torch.utils.data.DataLoader:
    dataset = WindowDataset(table, horizon, get_kind(cfg.model).action_column)
    if shuffle:
        sampler = EpochShuffleSampler(len(dataset), cfg.seed)
    elif cfg.max_eval_batches is not None:
        # Rows are sorted by episode (so by task): the first N batches would score one task only.
        # An evenly strided subset covers every task and episode, and is the same at every evaluation.
        count = min(len(dataset), cfg.max_eval_batches * cfg.batch_size)
        sampler = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
    else:
        sampler = None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=shuffle,  # equal-sized training batches; validation sees every window
        collate_fn=collate_windows,
        num_workers=cfg.num_workers,
        # A private generator: creating an iterator would otherwise draw a seed from torch's global RNG,
        # so a resumed run (which creates one more iterator) would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# ----------------------------------------------------------------------------- model


def normalization_mapping(norm) -> dict[str, Any]:
    """data_prep.preprocess.Normalization -> the normalization.json shape that config.set_normalization reads."""
    return {
        "state_layout": norm.state_layout,
        **{
            part: {"mean": stats.mean.tolist(), "std": stats.std.tolist()}
            for part, stats in (("state", norm.state), ("action", norm.action))
        },
    }


def velocity_scale(table: EpisodeTable, state_std: np.ndarray) -> np.ndarray:
    """Per-dim std of the one-step change s_{t+1} - s_t in normalised units (1 where a dim never changes)."""
    change = (table.next_state - table.state) / np.where(state_std < 1e-6, 1.0, state_std) * table.state_mask
    counts = table.state_mask.sum(0)
    mean = change.sum(0) / np.maximum(counts, 1)
    std = np.sqrt(((change - mean) ** 2 * table.state_mask).sum(0) / np.maximum(counts, 1))
    return np.where(std < 1e-6, 1.0, std).astype(np.float32)


def build_model(cfg: TrainConfig, data: TrainingData, source: str):
    """Model config = YAML model_config + the dataset's statistics, layout and tasks; then the model."""
    if cfg.init_from:
        return load_initial_model(cfg, data)
    kind = get_kind(cfg.model)
    config_cls = kind.config_class
    known = set(config_cls().to_dict())
    for key in cfg.model_config:
        if key not in known:
            raise UserError(f"{source}: model_config.{key} is not a {config_cls.__name__} field")
    try:
        config = config_cls(**cfg.model_config)
    except (ValueError, TypeError) as err:
        raise UserError(f"{source}: model_config: {err}") from None
    if config.state_dim != data.state_dim:
        raise UserError(
            f"dataset {cfg.dataset} has state width {data.state_dim} but model config state_dim={config.state_dim}"
        )
    try:
        config.set_normalization(normalization_mapping(data.normalization), source=f"{cfg.dataset}/normalization.json")
    except ValueError as err:
        raise UserError(str(err)) from None
    config.tasks = data.tasks
    if getattr(config, "derive_relative_pose", False):
        from data_prep.tasks import get_task

        config.relative_pose_frames = {task: get_task(task).relative_pose_frame for task in data.tasks}
    if config.reads_velocity_scale:
        config.velocity_scale = velocity_scale(data.train, np.asarray(config.state_std, np.float32)).tolist()
    return kind.model_class(config), training_horizon(cfg, config, source)


def training_horizon(cfg: TrainConfig, config: Any, source: str) -> int:
    """Window length H: the config's, or a longer one from cfg.horizon (never shorter than the model needs)."""
    horizon_field = get_kind(cfg.model).horizon_field
    model_horizon = int(getattr(config, horizon_field))
    horizon = cfg.horizon or model_horizon
    if horizon < model_horizon:
        raise UserError(f"{source}: horizon={horizon} is shorter than model_config.{horizon_field}={model_horizon}")
    return horizon


def load_initial_model(cfg: TrainConfig, data: TrainingData):
    """The saved model in cfg.init_from, after checking that it can learn from this dataset."""
    kind = get_kind(cfg.model)
    model_name = kind.model_class.__name__
    folder = Path(cfg.init_from)
    source = f"init_from {folder}"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{source}: no config.json there; expected a saved model folder (a run's best/ or final/)")
    try:
        found = json.loads(config_file.read_text()).get("architectures") or ["?"]
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if found[0] != model_name:
        raise UserError(f"{source}: holds a {found[0]}, but --model {cfg.model} trains a {model_name}")
    config = kind.config_class.from_pretrained(folder)
    # The one kind of change a fine-tune may make: start reading relative-yaw features (the harmonics, their
    # sawtooth, or both), through zero weights.
    new_yaw = added_yaw_inputs(config, cfg.model_config)
    for key, value in cfg.model_config.items():
        if key in new_yaw:
            continue
        saved = getattr(config, key, None)
        if (list(saved) if isinstance(saved, tuple) else saved) != value:
            raise UserError(f"{source}: model_config.{key}={value!r}, but the saved model has {saved!r}")
    if config.state_layout != data.normalization.state_layout:
        raise UserError(f"{source}: state_layout {config.state_layout!r}, but dataset {cfg.dataset} has "
                        f"{data.normalization.state_layout!r}")
    if config.state_dim != data.state_dim:
        raise UserError(f"{source}: state width {config.state_dim}, but dataset {cfg.dataset} has {data.state_dim}")
    unknown = sorted(set(data.tasks) - set(config.tasks))
    if unknown:
        raise UserError(f"{source}: trained on tasks {config.tasks}; dataset {cfg.dataset} also has {unknown}")
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{source}: no model.safetensors there; expected a saved model folder (a run's best/ or final/)")
    from safetensors import SafetensorError

    try:
        model = kind.model_class.from_pretrained(folder, config=config)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # e.g. weights that do not fit the config
        raise UserError(f"{source}: cannot load the model ({type(err).__name__}: {first_line(err)})") from None
    if new_yaw:
        try:
            model.add_relative_yaw_input(
                new_yaw.get("relative_yaw_harmonics"), new_yaw.get("relative_yaw_sawtooth", False)
            )
        except ValueError as err:
            raise UserError(f"{source}: model_config: {err}") from None
    return model, training_horizon(cfg, config, source)


def added_yaw_inputs(saved: Any, requested: dict[str, Any]) -> dict[str, Any]:
    """The relative-yaw keys of model_config that a saved policy does not read yet (a fine-tune may add them)."""
    if not hasattr(saved, "relative_yaw_harmonics"):  # world models read no yaw features
        return {}
    added: dict[str, Any] = {}
    if not saved.relative_yaw_harmonics and requested.get("relative_yaw_harmonics"):
        added["relative_yaw_harmonics"] = requested["relative_yaw_harmonics"]
    if not saved.relative_yaw_sawtooth and requested.get("relative_yaw_sawtooth") is True:
        added["relative_yaw_sawtooth"] = True
    return added


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones only ever exist under a .tmp- name)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def save_checkpoint(accelerator, output_dir: Path, state: dict[str, Any], keep: int) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # save_state has no barrier of its own: without this, rank 0 could rename the folder before
    # the other ranks have written their RNG states into it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, allow_nan=False))
        replace_dir(tmp, final)
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def save_model(accelerator, model, output_dir: Path, name: str) -> None:
    """save_pretrained into <output_dir>/<name> through a temp folder (best/ and final/)."""
    from accelerate.utils import DistributedType

    # FSDP / DeepSpeed shard the weights: every rank takes part in gathering the full state dict.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    extra = {"state_dict": accelerator.get_state_dict(model)} if sharded else {}
    if accelerator.is_main_process:
        tmp = output_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, **extra)
        mark(tmp, COMMAND)
        replace_dir(tmp, output_dir / name)
    accelerator.wait_for_everyone()


def check_run_folder(output_dir: Path, resume: bool) -> None:
    """Refuse a best/ or final/ that this trainer did not write (it would be replaced): no vla-train marker, in a
    folder that is no training run (runs made before the marker have checkpoints or a train_summary.json)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-dir {output_dir}: cannot write there ({err.strerror or err})") from None
    earlier_run = resume or (output_dir / "train_summary.json").is_file() or bool(list_checkpoints(output_dir))
    for name in ("best", "final"):
        folder = output_dir / name
        if folder.exists() and written_by(folder) != COMMAND and not earlier_run:
            raise UserError(f"--output-dir {output_dir}: {name}/ was not written by {COMMAND} and would be replaced; "
                            "move it away or pick another --output-dir")


def require_finite_weights(accelerator, model, step: int, what: str) -> None:
    """Stop before `what` is saved from weights holding NaN or inf; each process checks its own (shard of the)
    trainable weights, and all stop together."""
    params = [(name, p) for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu() if params else torch.ones(0, dtype=torch.bool)
    bad = [name for (name, _), ok in zip(params, finite.tolist(), strict=True) if not ok]
    anywhere = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), reduction="sum")
    if anywhere.item() > 0:
        where = bad[0] if bad else "on another process"
        raise UserError(f"step {step}: the weights hold NaN or inf values ({where}); not saving {what} (lower lr?)")


class CheckpointError(Exception):
    """A checkpoint file that cannot be read back."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def read_checkpoint(folder: Path) -> TrainerState:
    """Every file of a checkpoint read as resuming reads it, none unpickled with code (torch.load with
    weights_only=True); raises CheckpointError naming the first unreadable file."""
    from accelerate.utils import load
    from safetensors import safe_open

    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as weights:
                    weights.keys()
            elif path.suffix in (".bin", ".pkl", ".pt"):
                load(path, map_location="cpu")  # weights_only: a crafted pickle is refused, not run
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - whatever a reader raises, the file is unusable
            raise CheckpointError(path, f"unreadable, truncated or corrupt? ({type(err).__name__}: {first_line(err)})") from None
    path = folder / TRAINER_STATE
    try:
        state = TrainerState(**json.loads(path.read_text()))
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"not a trainer state ({first_line(err)})") from None
    if state.lr_schedule is None and not (folder / LEGACY_SCHEDULER).is_file():
        raise CheckpointError(path, "holds no lr_schedule")
    return state


def resume_from(accelerator, checkpoints: list[Path], scheduler) -> tuple[TrainerState, Path]:
    """Load the newest readable checkpoint; an unreadable one is named in a warning and the one before it tried."""
    from accelerate.utils import load

    unreadable: list[CheckpointError] = []
    for folder in reversed(checkpoints):
        try:
            state = read_checkpoint(folder)
        except CheckpointError as err:
            unreadable.append(err)
            continue
        for err in unreadable:
            warn(accelerator, f"{err}; resuming from {folder} instead")
        try:
            accelerator.load_state(str(folder))
            schedule = state.lr_schedule
            if schedule is None:  # an older checkpoint: accelerate's pickle, now read with weights_only
                schedule = load(folder / LEGACY_SCHEDULER, map_location="cpu")
            scheduler.load_state_dict(schedule)
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise UserError(f"{folder}: cannot resume from it ({type(err).__name__}: {first_line(err)})") from None
        return state, folder
    raise UserError(f"{unreadable[0]}; no earlier complete checkpoint to resume from")


def warn(accelerator, message: str) -> None:
    """One line on stderr, above the progress bar."""
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        tqdm.write(f"warning: {message}", file=sys.stderr)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainerState:
    """What accelerate's save_state does not know: where we are in the data and the best validation loss."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_val_loss: float | None = None
    evals_since_best: int = 0
    first_train_loss: float | None = None  # mean over the first log window: the "before" of the summary
    last_train_loss: float | None = None
    # Wall time of all processes of this run up to this checkpoint, so a resumed run reports its whole cost
    # (the work redone after a kill, from the last checkpoint on, counts once).
    wall_time_s: float = 0.0
    # The LR schedule's state_dict (plain numbers): JSON here, not one of accelerate's pickled custom checkpoints.
    lr_schedule: dict[str, Any] | None = None


@dataclass
class LogWindow:
    """Running sums between two log lines: mean training loss/metrics and throughput.

    Time spent evaluating or checkpointing is excluded so samples/s measures training alone.
    """

    batches: int = 0
    samples: int = 0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    excluded_s: float = 0.0

    def add(self, loss: float, metrics: dict[str, float] | None, samples: int) -> None:
        self.batches, self.samples, self.loss = self.batches + 1, self.samples + samples, self.loss + loss
        for key, value in (metrics or {}).items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)

    def seconds(self) -> float:
        return max(time.time() - self.started - self.excluded_s, 1e-9)

    def logs(self) -> dict[str, float]:
        n = max(self.batches, 1)
        return {
            "train/loss": self.loss / n,
            **{f"train/{k}": v / n for k, v in self.metrics.items() if k != "loss"},
            "train/samples_per_s": self.samples / self.seconds(),
        }


def fresh_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # Accelerate keeps process-wide singletons; reset them so several trainings can run in one process
    # (vla-pipeline trains world model then policy; the tests train many tiny models).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with="tensorboard",
        project_dir=cfg.output_dir,
    )


@torch.no_grad()
def evaluate(accelerator, model, loader, max_batches: int | None) -> dict[str, float]:
    """Mean validation loss and metrics, weighted by batch size and summed over processes."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            out = model(**batch)
        n = float(len(batch["instruction"]))
        values = {"loss": out.loss, **(out.metrics or {})}
        for key, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).detach()
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=accelerator.device)) + value * n
        sums["_count"] = sums.get("_count", torch.zeros((), dtype=torch.float64, device=accelerator.device)) + n
    model.train()
    totals = {k: accelerator.reduce(v, reduction="sum").item() for k, v in sums.items()}
    count = totals.pop("_count", 0.0)
    return {k: v / count for k, v in totals.items()} if count else {}


def norm_value(norm) -> float:
    """clip_grad_norm_ gives a tensor, a DTensor under FSDP2, or None under DeepSpeed (which clips itself)."""
    if norm is None:
        return float("nan")
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def scalar_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard's hparams take scalars only: flatten model_config and stringify the rest."""
    flat: dict[str, Any] = {}
    for key, value in {
        **dataclasses.asdict(cfg),
        **{f"model_config.{k}": v for k, v in cfg.model_config.items()},
    }.items():
        if key == "model_config":
            continue
        flat[key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def train(cfg: TrainConfig, resume: bool = False, source: str = "config") -> dict[str, Any]:
    """Run (or continue) one training; returns the train_summary.json content."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    started = time.time()
    output_dir = Path(cfg.output_dir)
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not resume:
        raise UserError(
            f"{output_dir} already has checkpoints ({checkpoints[-1].name}); pass --resume to continue or use another --output-dir"
        )
    check_run_folder(output_dir, resume)

    data = load_training_data(cfg.dataset)
    if cfg.fixed_instruction is not None:
        for table in (data.train, data.validation):
            table.instruction = np.full(len(table.instruction), cfg.fixed_instruction, dtype=object)
    accelerator = fresh_accelerator(cfg)
    set_seed(cfg.seed)
    model, horizon = build_model(cfg, data, source)
    total_params, trainable_params = count_parameters(model)
    if len(data.train) < cfg.batch_size:
        raise UserError(
            f"{source}: batch_size={cfg.batch_size} is larger than the {len(data.train)} training windows in {cfg.dataset}"
        )

    train_loader = make_loader(data.train, horizon, cfg, shuffle=True)
    val_loader = make_loader(data.validation, horizon, cfg, shuffle=False)
    # Only trainable parameters: with LoRA the frozen backbone needs no optimizer state.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    # Stepped once per optimizer step by us (not prepared), so warmup/max_steps mean optimizer steps on any number of GPUs.
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # The scheduler is not registered with accelerate: its custom checkpoints are pickles loaded with
    # weights_only=False (code would run on --resume). Its state travels in trainer_state.json instead.

    state = TrainerState()
    if resume and checkpoints:
        state, folder = resume_from(accelerator, checkpoints, scheduler)
        accelerator.print(
            f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})"
        )
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {output_dir / 'checkpoints'}, starting from step 0")
    earlier_processes_s = state.wall_time_s
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for folder in (output_dir, output_dir / "checkpoints"):
            for stale in [*folder.glob(".tmp-*"), *folder.glob(".old-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-save
    accelerator.init_trackers("logs", config=scalar_hparams(cfg))
    accelerator.print(
        f"training {cfg.model}: {total_params:,} parameters ({trainable_params:,} trainable), "
        f"{len(data.train):,} train / {len(data.validation):,} validation windows of H={horizon}, tasks {data.tasks}"
    )

    batch_samples = cfg.batch_size * accelerator.num_processes
    progress = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        desc=f"train {cfg.model}",
        disable=not accelerator.is_local_main_process,
    )
    window, run = LogWindow(), LogWindow()  # since the last log line / since this process started
    last_val: dict[str, float] = {}
    stop = state.step >= cfg.max_steps
    model.train()

    def run_evaluation() -> None:
        nonlocal last_val
        last_val = evaluate(accelerator, model, val_loader, cfg.max_eval_batches)
        accelerator.log({f"val/{k}": v for k, v in last_val.items()}, step=state.step)
        finite = math.isfinite(last_val["loss"])  # a NaN is never the best, nor "the latest model" worth keeping
        if not finite:
            warn(accelerator, f"step {state.step}: validation loss is {last_val['loss']}; not taken as best/")
        improved = finite and (state.best_val_loss is None or last_val["loss"] < state.best_val_loss)
        if improved:
            state.best_val_loss, state.evals_since_best = last_val["loss"], 0
        else:
            state.evals_since_best += 1
        if improved or (finite and cfg.best_checkpoint == "last"):
            require_finite_weights(accelerator, model, state.step, "best/")
            save_model(accelerator, model, output_dir, "best")
        best = "-" if state.best_val_loss is None else f"{state.best_val_loss:.4g}"
        progress.set_postfix(val_loss=f"{last_val['loss']:.4g}", best=best)

    try:  # a stop (a UserError) must not leave the bar open: its line would end in the error's
        while not stop:
            train_loader.set_epoch(state.epoch)  # accelerate passes it on to EpochShuffleSampler
            epoch_loader = (
                accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
                if state.batches_in_epoch
                else train_loader
            )
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    out = model(**batch)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                loss = out.loss.detach().float().item()
                if not math.isfinite(loss):
                    raise UserError(f"step {state.step + 1}: training loss is {loss}; stopped, nothing saved from here on "
                                    "(lower lr, or check the data)")
                window.add(loss, out.metrics, batch_samples)
                run.add(loss, None, batch_samples)
                if not accelerator.sync_gradients:
                    continue

                state.step += 1
                scheduler.step()
                progress.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                    logs = {
                        **window.logs(),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": norm_value(grad_norm),
                    }
                    accelerator.log(logs, step=state.step)
                    if state.first_train_loss is None:
                        state.first_train_loss = logs["train/loss"]
                    state.last_train_loss = logs["train/loss"]
                    progress.set_postfix(loss=f"{logs['train/loss']:.4g}", lr=f"{logs['train/lr']:.2e}")
                    window = LogWindow()
                pause = time.time()
                if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
                    run_evaluation()
                if state.step % cfg.save_every == 0:
                    state.wall_time_s = earlier_processes_s + time.time() - started
                    state.lr_schedule = scheduler.state_dict()
                    require_finite_weights(accelerator, model, state.step, f"checkpoint {CHECKPOINT_PREFIX}{state.step}")
                    save_checkpoint(accelerator, output_dir, dataclasses.asdict(state), cfg.keep_checkpoints)
                window.excluded_s += time.time() - pause
                run.excluded_s += time.time() - pause
                patience_out = (
                    cfg.early_stopping_patience is not None and state.evals_since_best >= cfg.early_stopping_patience
                )
                if state.step >= cfg.max_steps or patience_out:
                    if patience_out:
                        accelerator.print(
                            f"early stopping at step {state.step}: no new best in {state.evals_since_best} evaluations"
                        )
                    stop = True
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    finally:
        progress.close()

    if not last_val:  # resumed at or past max_steps: still report a validation loss
        run_evaluation()
    require_finite_weights(accelerator, model, state.step, "final/")
    save_model(accelerator, model, output_dir, "final")
    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "model": cfg.model,
        "model_class": type(unwrapped).__name__,
        "steps": state.step,
        "epochs": state.epoch + state.batches_in_epoch / max(len(train_loader), 1),
        "first_train_loss": state.first_train_loss,
        "last_train_loss": state.last_train_loss,
        "best_val_loss": state.best_val_loss,
        "final_val": last_val,
        "train_samples_per_s": run.logs()["train/samples_per_s"] if run.batches else None,
        "params_total": total_params,
        "params_trainable": trainable_params,
        "wall_time_s": earlier_processes_s + time.time() - started,
        "horizon": horizon,
        "tasks": data.tasks,
        "train_windows": len(data.train),
        "validation_windows": len(data.validation),
        "processes": accelerator.num_processes,
        "config": dataclasses.asdict(cfg),
    }
    if accelerator.is_main_process:
        write_json_atomically(output_dir / "train_summary.json", summary)
    accelerator.end_training()
    accelerator.print(
        f"done: {state.step} steps, best val loss {state.best_val_loss}, models in {output_dir}/best and /final"
    )
    return summary


# ----------------------------------------------------------------------------- CLI


def build_parser(model: str | None = None) -> argparse.ArgumentParser:
    """`vla-train`'s parser; with `model` set (vla-train-world-model / -policy) there is no --model flag."""
    parser = argparse.ArgumentParser(prog="vla-train", description=__doc__.split("\n\n")[0])
    if model is None:
        parser.add_argument(
            "--model", choices=kind_names(), default=None, help="which model to train (default: the config's `model`)"
        )
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig keys (see configs/)")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys; model_config.<field>=... for the model",
    )
    parser.add_argument("--dataset", default=None, help="dataset repo folder (overrides the config)")
    parser.add_argument("--output-dir", default=None, help="output folder (overrides the config)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    return parser


def parse_args(argv: Sequence[str] | None, model: str | None) -> argparse.Namespace:
    args = build_parser(model).parse_args(argv)
    if model is not None:
        args.model = model
    return args


def main(argv: Sequence[str] | None = None, model: str | None = None) -> None:
    """Console entry point. Returns None: a console script's return value becomes the exit status."""

    def run() -> None:
        args = parse_args(argv, model)
        cfg = load_config(args.config, args.set, model=args.model, dataset=args.dataset, output_dir=args.output_dir)
        train(cfg, resume=args.resume, source=args.config)

    run_cli(run)


def main_world_model(argv: Sequence[str] | None = None) -> None:
    main(argv, model="world")


def main_policy(argv: Sequence[str] | None = None) -> None:
    main(argv, model="policy")


if __name__ == "__main__":
    main(sys.argv[1:])
