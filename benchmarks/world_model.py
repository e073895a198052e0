"""World-model benchmark: the MLP-Mixer ensemble vs a plain-MLP ensemble vs "nothing moves", on held-out episodes.

    python benchmarks/world_model.py --dataset data/hf_dataset --mixer runs/world_model/best \
        --mlp runs/world_model_mlp/best --out runs/benchmarks/world_model [--results-md docs/RESULTS.md]

Accuracy on the dataset's validation split (episodes never trained on, held-out instruction paraphrases):
* one-step error: predict s_{t+1} from the recorded (s_t, a_t) for every validation row;
* open-loop error after k = 1..25 steps: from every start t whose 25 recorded actions stay inside the
  episode, feed the model its own predictions (the ensemble mean, as dreams do) and the recorded actions;
* success head: p_success > 0.5 on the one-step predictions vs the recorded success label.
Errors are squared, in units of the dataset's normalization.json state std (train split; std < 1e-6 -> 1, as
in the models), averaged over every real (state_mask = 1) state entry. "identity" predicts s_{t+k} = s_t;
"linear" and "linear + velocity" are least-squares fits on the train split (a yardstick: how much of the
dynamics is linear, and what the velocity input s_t - s_{t-1} alone is worth).

Speed: imagined steps/s of `WorldModel.step` on 1024 parallel dreams (own predictions fed back, --threads torch
threads) vs steps/s of one robosuite env (`data_prep.sim.make_env`, zero actions, one process), same run.

Writes <out>/results.json, <out>/open_loop_error.png and <out>/world_model.md (folder swapped in atomically);
with --results-md, replaces (or appends) that file's "## World model" section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError, run_cli
from data_prep.tasks import STATE_LAYOUT, STATE_SLICES, rot6_to_matrix
from evaluation.report import publish_benchmark

SECTION = "## World model"
REPORT_HORIZONS = (1, 5, 10, 25)
ARCHITECTURES = {"mixer": "mixer", "mlp": "mlp"}  # benchmark name -> WorldModelConfig.architecture
TRAIN_CONFIGS = {"mixer": "configs/world_model.yaml", "mlp": "configs/world_model_mlp.yaml"}
# Goals of issue 3: the original MLP-Mixer world model reports a one-step MSE of 0.0029.
GOAL_ONE_STEP_MSE = 0.002
GOAL_OPEN_LOOP_RATIO = 2.0
MIN_STD = 1e-6  # as modeling_vla.MIN_STD: constant dims are divided by 1


# --------------------------------------------------------------------------------------------------
# Data: the validation split and the error scale
# --------------------------------------------------------------------------------------------------


@dataclass
class Validation:
    """The held-out split as flat arrays (train_accelerate.EpisodeTable) plus the per-dim error scale."""

    table: Any  # train_accelerate.EpisodeTable, rows sorted by (episode, step)
    scale: np.ndarray  # [D] state std of the train split
    mean: np.ndarray  # [D] state mean of the train split
    train: Any  # the train split's EpisodeTable (fits the linear baselines)

    @property
    def episodes(self) -> int:
        return int(len(np.unique(self.table.episode_end)))


def load_validation(dataset: Path) -> Validation:
    from data_prep.preprocess import load_normalization, load_vla_dataset
    from train_accelerate import EpisodeTable

    if not Path(dataset).is_dir():
        raise UserError(f"--dataset {dataset}: folder not found (expected a vla-preprocess output folder)")
    norm = load_normalization(dataset)
    splits = load_vla_dataset(dataset)
    table = EpisodeTable.from_split(splits["validation"], f"{dataset} validation split")
    if len(table) == 0:
        raise UserError(f"--dataset {dataset}: the validation split is empty")
    std = np.asarray(norm.state.std, np.float32)
    return Validation(table=table, scale=np.where(std < MIN_STD, 1.0, std).astype(np.float32),
                      mean=np.asarray(norm.state.mean, np.float32),
                      train=EpisodeTable.from_split(splits["train"], f"{dataset} train split"))


def open_loop_starts(table: Any, horizon: int, max_starts: int | None) -> np.ndarray:
    """Rows t whose next `horizon` steps stay in t's episode; evenly spaced subsample down to max_starts."""
    rows = np.arange(len(table))
    starts = rows[rows + horizon <= table.episode_end]
    if max_starts is not None and len(starts) > max_starts:
        starts = starts[np.linspace(0, len(starts) - 1, max_starts).round().astype(np.int64)]
    return starts


@dataclass
class SquaredError:
    """Per-row sums of squared normalised errors over real dims and the number of real dims."""

    total: np.ndarray  # [N]
    count: np.ndarray  # [N]

    def mean(self, rows: np.ndarray | None = None) -> float:
        total, count = (self.total, self.count) if rows is None else (self.total[rows], self.count[rows])
        return float(total.sum() / max(count.sum(), 1.0))


def squared_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> SquaredError:
    diff = (pred - target) / scale * mask
    return SquaredError(total=(diff.astype(np.float64) ** 2).sum(-1), count=mask.sum(-1).astype(np.float64))




def error_by_group(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """Mean squared normalised error per state block, and each block's share of the total squared error.

    Shows where a one-step error comes from (e.g. one badly predicted rotation block) instead of one averaged number.
    """
    squared = ((pred - target) / scale * mask).astype(np.float64) ** 2
    total = squared.sum()
    groups = {}
    for name, cols in STATE_SLICES.items():
        real = mask[:, cols].sum()
        if real > 0:
            groups[name] = {"mse": float(squared[:, cols].sum() / real),
                            "share": float(squared[:, cols].sum() / total) if total > 0 else 0.0}
    return groups


# Physical units for the open-loop breakdown: positions in cm, orientations as the angle between rotations in degrees.
PHYSICAL_BLOCKS = {"eef pos (cm)": "eef pos", "eef rot (deg)": "eef rot", "object pos (cm)": "object pos",
                   "object rot (deg)": "object rot"}


def physical_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """Mean position error (cm) and rotation angle (degrees) per block, over rows where the block is real.

    The normalised MSE weighs every dim by 1 / its std, so a near-constant dim (the gripper's tilt varies by ~1
    degree in the data) counts as much as the arm's whole travel; these numbers say what the errors are in the world.
    """
    result: dict[str, float | None] = {}
    for label, block in PHYSICAL_BLOCKS.items():
        cols = STATE_SLICES[block]
        rows = mask[:, cols].min(axis=1) > 0
        if not rows.any():
            result[label] = None
        elif label.endswith("(cm)"):
            result[label] = float(100 * np.linalg.norm(pred[rows, cols] - target[rows, cols], axis=-1).mean())
        else:
            relative = np.swapaxes(rot6_to_matrix(pred[rows, cols]), -1, -2) @ rot6_to_matrix(target[rows, cols])
            cosine = np.clip((np.trace(relative, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
            result[label] = float(np.degrees(np.arccos(cosine)).mean())
    return result


def by_task(table: Any, rows: np.ndarray, value: Callable[[np.ndarray], float]) -> dict[str, float]:
    """value(positions) per task, where positions index `rows`."""
    tasks = table.task[rows]
    return {task: value(np.flatnonzero(tasks == task)) for task in sorted(set(tasks.tolist()))}


# --------------------------------------------------------------------------------------------------
# Dynamics: a world model (or the identity baseline) behind one call
# --------------------------------------------------------------------------------------------------


class Dynamics:
    """s_t, a_t, s_{t-1} (raw, [N, D] / [N, A] / [N, D]) of dataset rows -> (s_{t+1} [N, D], p_success [N] or None)."""

    name: str

    def __call__(self, state: np.ndarray, action: np.ndarray, rows: np.ndarray,
                 prev_state: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class IdentityDynamics(Dynamics):
    """The "next state = current state" baseline: its open-loop error is the data's own drift."""

    name = "identity"

    def __call__(self, state: np.ndarray, action: np.ndarray, rows: np.ndarray,
                 prev_state: np.ndarray) -> tuple[np.ndarray, None]:
        return state.copy(), None


class LinearDynamics(Dynamics):
    """Least squares on the train split: [s_t, a_t, task one-hot, 1] (+ s_t - s_{t-1}) -> s_{t+1} - s_t, normalised."""

    def __init__(self, data: Validation, velocity: bool) -> None:
        self.name = "linear + velocity" if velocity else "linear"
        self.data, self.velocity = data, velocity
        self.tasks = sorted(set(data.train.task.tolist()))
        t = data.train
        change = (t.next_state - t.state) / data.scale * t.state_mask
        features = self.features(t.state, t.action, t.prev_state, t.task, t.state_mask)
        self.weight = np.linalg.lstsq(features, change.astype(np.float64), rcond=None)[0]

    @property
    def parameters(self) -> int:
        return int(self.weight.size)

    def features(self, state: np.ndarray, action: np.ndarray, prev_state: np.ndarray, task: np.ndarray,
                 mask: np.ndarray) -> np.ndarray:
        columns = [(state - self.data.mean) / self.data.scale * mask, action,
                   np.stack([task == name for name in self.tasks], 1), np.ones((len(state), 1))]
        if self.velocity:
            columns.append((state - prev_state) / self.data.scale * mask)
        return np.concatenate(columns, 1, dtype=np.float64)

    def __call__(self, state: np.ndarray, action: np.ndarray, rows: np.ndarray,
                 prev_state: np.ndarray) -> tuple[np.ndarray, None]:
        t = self.data.table
        mask = t.state_mask[rows]
        change = self.features(state, action, prev_state, t.task[rows], mask) @ self.weight
        return (state + change * self.data.scale * mask).astype(np.float32), None


class WorldModelDynamics(Dynamics):
    """Anything with WorldModel's `embed_instructions` and `step(state, action, text_emb=, state_mask=)`.

    Instructions are embedded once per unique string; each row uses its episode's state_mask.
    """

    def __init__(self, name: str, model: Any, table: Any) -> None:
        import torch

        self.name, self.model, self.table = name, model, table
        unique, inverse = np.unique(table.instruction.astype(str), return_inverse=True)
        with torch.no_grad():
            embeddings = model.embed_instructions(unique.tolist())
        self.text = torch.as_tensor(embeddings, dtype=torch.float32)[torch.as_tensor(inverse.reshape(-1))]
        self.mask = torch.as_tensor(table.state_mask, dtype=torch.float32)

    def __call__(self, state: np.ndarray, action: np.ndarray, rows: np.ndarray,
                 prev_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        index = torch.as_tensor(rows)
        with torch.no_grad():
            mean, _, p_success, _ = self.model.step(
                torch.as_tensor(state, dtype=torch.float32), torch.as_tensor(action, dtype=torch.float32),
                text_emb=self.text[index], state_mask=self.mask[index],
                prev_state=torch.as_tensor(prev_state, dtype=torch.float32),
            )
        return mean.numpy().astype(np.float32), p_success.numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def classification(predicted: np.ndarray, label: np.ndarray) -> dict[str, float | None]:
    """Accuracy with the positive rate it must beat, balanced accuracy and F1 (None where undefined)."""
    predicted, label = predicted.astype(bool), label.astype(bool)
    tp, tn = int((predicted & label).sum()), int((~predicted & ~label).sum())
    fp, fn = int((predicted & ~label).sum()), int((~predicted & label).sum())
    positives, negatives = tp + fn, tn + fp
    recall = tp / positives if positives else None
    specificity = tn / negatives if negatives else None
    return {
        "accuracy": (tp + tn) / max(len(label), 1),
        "positive_rate": positives / max(len(label), 1),
        "predicted_positive_rate": (tp + fp) / max(len(label), 1),
        "recall": recall,
        "specificity": specificity,
        "balanced_accuracy": (recall + specificity) / 2 if recall is not None and specificity is not None else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def one_step_metrics(dynamics: Dynamics, data: Validation, chunk: int = 8192) -> dict[str, Any]:
    """Teacher-forced one-step error on every validation row, and the success head on the same predictions."""
    t = data.table
    preds, probs = [], []
    for start in range(0, len(t), chunk):
        rows = np.arange(start, min(start + chunk, len(t)))
        pred, p_success = dynamics(t.state[rows], t.action[rows], rows, t.prev_state[rows])
        preds.append(pred)
        probs.append(p_success)
    predicted = np.concatenate(preds)
    error = squared_error(predicted, t.next_state, t.state_mask, data.scale)
    all_rows = np.arange(len(t))
    result: dict[str, Any] = {
        "one_step_mse": error.mean(),
        "one_step_mse_per_task": by_task(t, all_rows, error.mean),
        "one_step_by_state_group": error_by_group(predicted, t.next_state, t.state_mask, data.scale),
        "success": None,
    }
    if probs[0] is not None:
        predicted_success = np.concatenate(probs) > 0.5
        result["success"] = classification(predicted_success, t.success > 0.5)
        # per task: a scene's goals share their states, so only the instruction tells them apart (issue 46)
        result["success_per_task"] = by_task(t, all_rows, lambda at: classification(predicted_success[at],
                                                                                  t.success[at] > 0.5))
    return result


def open_loop_curve(dynamics: Dynamics, data: Validation, starts: np.ndarray, horizon: int) -> dict[str, Any]:
    """Roll from s_t with the recorded a_t..a_{t+k-1}; error vs the recorded s_{t+k} for k = 1..horizon."""
    from tqdm.auto import tqdm

    t = data.table
    state, prev = t.state[starts].copy(), t.prev_state[starts]
    curve, per_task = [], []
    for k in tqdm(range(horizon), desc=f"open loop {dynamics.name}", leave=False):
        rows = starts + k
        state, prev = dynamics(state, t.action[rows], rows, prev)[0], state
        error = squared_error(state, t.next_state[rows], t.state_mask[rows], data.scale)
        curve.append(error.mean())
        per_task.append(by_task(t, starts, error.mean))
    last = starts + horizon - 1
    return {
        "open_loop_curve": curve,  # index k-1 = error after k steps
        "open_loop": {str(h): curve[h - 1] for h in REPORT_HORIZONS if h <= horizon},
        "open_loop_per_task": {str(h): per_task[h - 1] for h in REPORT_HORIZONS if h <= horizon},
        # where the error after the full horizon sits: compounding shows up in other blocks than one-step error
        "open_loop_final_by_state_group": error_by_group(state, t.next_state[last], t.state_mask[last], data.scale),
        "open_loop_final_physical": physical_error(state, t.next_state[last], t.state_mask[last]),
    }


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------


def dream_steps_per_second(dynamics: WorldModelDynamics, data: Validation, batch: int, warmup: int = 3,
                           min_seconds: float = 2.0, min_calls: int = 5) -> dict[str, float]:
    """`batch` parallel dreams from validation states, own predictions fed back, recorded actions."""
    t = data.table
    rows = np.resize(np.arange(len(t)), batch)  # repeats rows when the split is smaller than the batch
    state, prev, action = t.state[rows].copy(), t.prev_state[rows], t.action[rows]
    for _ in range(warmup):
        state, prev = dynamics(state, action, rows, prev)[0], state
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        state, prev = dynamics(state, action, rows, prev)[0], state
        calls += 1
    seconds = time.perf_counter() - started
    return {"batch": batch, "calls": calls, "seconds": seconds, "steps_per_s": batch * calls / seconds,
            "ms_per_call": 1000 * seconds / calls}


def robosuite_steps_per_second(task: str, steps: int, seed: int = 0, warmup: int = 10) -> dict[str, Any]:
    """One robosuite env (make_env), zero actions, timed env.step after a short warm-up."""
    from data_prep.sim import make_env

    sim = make_env(task, seed)
    try:
        sim.reset(seed)
        action = np.zeros(sim.env.action_dim)
        for _ in range(warmup):
            sim.env.step(action)
        started = time.perf_counter()
        for _ in range(steps):
            sim.env.step(action)
        seconds = time.perf_counter() - started
    finally:
        sim.env.close()
    return {"task": task, "action": "zero", "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def load_world_model(folder: Path, flag: str, architecture: str, layout: str) -> Any:
    """A saved WorldModel (AutoModel + trust_remote_code) of the expected architecture and state layout."""
    from common.saved_models import check_model_config, load_model, read_model_config
    from model_kinds import model_types

    config = read_model_config(folder, flag)
    check_model_config(config, folder, flag, model_types("world"), [], STATE_LAYOUT)
    found = config.get("architecture", "mixer")  # folders saved before the switch are mixers
    if found != architecture:
        raise UserError(f"{flag} {folder}/config.json: architecture {found!r}, expected {architecture!r}")
    if config.get("state_layout") != layout:
        raise UserError(f"{flag} {folder}/config.json: state_layout differs from the dataset's {layout!r}")
    return load_model(folder, flag, "cpu")


def parameter_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def overrides_against(train_config: str, used: dict[str, Any]) -> list[str]:
    """The `--set key=value` items that turn the YAML's settings into the ones a run recorded (its summary's config).

    Without them the report's training command would silently describe a different run than the one measured.
    """
    from train_accelerate import load_config  # the trainer's own reading of the YAML, defaults included

    if not used or not Path(train_config).is_file():
        return []
    base = asdict(load_config(train_config))
    items = []
    for key, value in used.items():
        if key in ("model", "dataset", "output_dir", "model_config") or base.get(key) == value:
            continue
        items.append(f"{key}={as_set_value(value)}")
    for key, value in (used.get("model_config") or {}).items():
        if base["model_config"].get(key) != value:
            items.append(f"model_config.{key}={as_set_value(value)}")
    return sorted(items)


def as_set_value(value: Any) -> str:
    """How --set reads a value back: text as typed for strings (JSON quotes would stay in), YAML/JSON otherwise."""
    return value if isinstance(value, str) else json.dumps(value)


def training_record(folder: Path, train_config: str) -> dict[str, Any]:
    """What train_summary.json (next to best/ and final/) says about the run, and its training command."""
    summary_path = folder.parent / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = summary.get("config", {})
    command = (f"vla-train --model world --config {train_config} --dataset {config.get('dataset', '<dataset>')} "
               f"--output-dir {config.get('output_dir', folder.parent)}")
    overrides = overrides_against(train_config, config)
    if overrides:
        command += " --set " + " ".join(shlex.quote(item) for item in overrides)
    keys = ("steps", "wall_time_s", "best_val_loss", "train_windows", "validation_windows")
    return {"command": command, "summary": str(summary_path) if summary else None, **{k: summary.get(k) for k in keys}}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def goals(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, None where a model needed for the comparison was not evaluated."""
    mixer, mlp = models.get("mixer"), models.get("mlp")
    one_step = mixer["one_step_mse"] if mixer else None
    ratio = None
    if mixer and mlp and "25" in mixer["open_loop"]:
        ratio = mlp["open_loop"]["25"] / mixer["open_loop"]["25"] if mixer["open_loop"]["25"] > 0 else float("inf")
    return {
        "one_step_mse_target": GOAL_ONE_STEP_MSE,
        "one_step_mse_met": None if one_step is None else one_step <= GOAL_ONE_STEP_MSE,
        "open_loop_25_ratio_mlp_over_mixer": ratio,
        "open_loop_25_ratio_target": GOAL_OPEN_LOOP_RATIO,
        "open_loop_25_ratio_met": None if ratio is None else ratio >= GOAL_OPEN_LOOP_RATIO,
    }


def plot_open_loop(models: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in models.items():
        curve = np.asarray(result["open_loop_curve"], dtype=np.float64)
        steps = np.arange(1, len(curve) + 1)
        ax.plot(steps, np.where(curve > 0, curve, np.nan), marker="o", markevery=[h - 1 for h in REPORT_HORIZONS
                if h <= len(curve)], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("open-loop steps k (recorded actions)")
    ax.set_ylabel("MSE vs recorded state (normalised)")
    ax.set_title("World model: open-loop error on validation episodes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def block_table(models: dict[str, dict[str, Any]], key: str, title: str) -> list[str]:
    """Markdown lines: each model's error per state block (its error_by_group result under `key`)."""
    groups = list(STATE_SLICES)
    lines = ["", f"{title} (share of the model's total squared error):", "",
             "| model | " + " | ".join(groups) + " |", "| --- | " + " | ".join("---:" for _ in groups) + " |"]
    for name, m in models.items():
        cells = [m[key].get(g) for g in groups]
        lines.append(f"| {name} | " + " | ".join(
            "n/a" if c is None else f"{fmt(c['mse'])} ({c['share']:.0%})" for c in cells) + " |")
    return lines


def markdown_section(results: dict[str, Any]) -> str:
    models, v, speed = results["models"], results["validation"], results["robosuite"]
    g = results["goals"]
    horizons = [str(h) for h in REPORT_HORIZONS if h <= v["horizon"]]
    lines = [
        SECTION, "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']} (torch threads: {results['threads']})", "",
    ]
    trained = [(name, m["training"]) for name, m in models.items() if "training" in m]
    if trained:
        lines += ["Training (commands; numbers from each run's train_summary.json):", "", "```"]
        lines += [t["command"] for _, t in trained] + ["```", ""]
        for name, t in trained:
            if t["summary"]:
                wall = t["wall_time_s"] / 60 if t["wall_time_s"] is not None else None
                lines.append(f"* {name}: {t['steps']} steps, {fmt(wall, '.1f')} min, best validation loss "
                             f"{fmt(t['best_val_loss'])}, {t['train_windows']} training windows")
        lines.append("")
    lines += [
        f"Held-out data: `{results['dataset']}` validation split, {v['episodes']} episodes, {v['rows']} rows "
        f"(one-step metrics); open loop from {v['starts']} starts"
        + (f" (evenly spaced subsample of {v['eligible_starts']})" if v["starts"] < v["eligible_starts"] else "")
        + f" whose next {v['horizon']} recorded actions stay in the episode. Errors: squared, in units of the "
        "train-split state std (normalization.json), mean over real (unpadded) state entries.", "",
        "| model | parameters | one-step MSE | " + " | ".join(f"open loop {h}" for h in horizons)
        + " | success acc. (pos. rate) | success bal. acc. | success F1 | dream steps/s (batch "
        + f"{results['speed_batch']}) |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in horizons) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, m in models.items():
        s = m["success"]
        speed_cell = fmt(m["speed"]["steps_per_s"], ",.0f") if m.get("speed") else "n/a"
        lines.append(
            f"| {name} | {m['parameters']:,} | {fmt(m['one_step_mse'])} | "
            + " | ".join(fmt(m["open_loop"][h]) for h in horizons)
            + (f" | {s['accuracy']:.3f} ({s['positive_rate']:.3f}) | {fmt(s['balanced_accuracy'], '.3f')} | "
               f"{fmt(s['f1'], '.3f')}" if s else " | n/a | n/a | n/a")
            + f" | {speed_cell} |"
        )
    tasks = sorted({task for m in models.values() for task in m["one_step_mse_per_task"]})
    lines += ["", "One-step MSE per task:", "",
              "| model | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["one_step_mse_per_task"].get(t)) for t in tasks) + " |")
    if any(m.get("success_per_task") for m in models.values()):
        lines += ["", "Success head per task, balanced accuracy (positive rate):", "",
                  "| model | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
        for name, m in models.items():
            cells = [(m.get("success_per_task") or {}).get(t) for t in tasks]
            lines.append(f"| {name} | " + " | ".join(
                "n/a" if c is None else f"{fmt(c['balanced_accuracy'], '.3f')} ({c['positive_rate']:.3f})"
                for c in cells) + " |")
    lines += block_table(models, "one_step_by_state_group", "One-step MSE per state block")
    lines += block_table(models, "open_loop_final_by_state_group", f"Open-loop MSE after {v['horizon']} steps per state block")
    physical = list(PHYSICAL_BLOCKS)
    lines += ["", f"Open-loop error after {v['horizon']} steps in physical units (mean over the starts; rotations: angle "
              "between the predicted and the recorded orientation):", "",
              "| model | " + " | ".join(physical) + " |", "| --- | " + " | ".join("---:" for _ in physical) + " |"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(fmt(m["open_loop_final_physical"][p], ".2f") for p in physical) + " |")
    lines += ["", f"Robosuite ({speed['task']}, {speed['action']} actions, one process, {speed['steps']} steps): "
              f"{speed['steps_per_s']:,.0f} steps/s."]
    for name, m in models.items():
        if m.get("speed"):
            lines.append(f"{name}: {m['speed']['steps_per_s'] / speed['steps_per_s']:,.1f}x robosuite "
                         f"({m['speed']['ms_per_call']:.1f} ms per step of {results['speed_batch']} dreams).")
    lines += ["", "Goals:", ""]
    lines.append(f"* one-step MSE <= {GOAL_ONE_STEP_MSE} (the original MLP-Mixer reports 0.0029): "
                 + ("not evaluated (no --mixer)" if g["one_step_mse_met"] is None else
                    f"{'met' if g['one_step_mse_met'] else 'NOT met'} ({fmt(models['mixer']['one_step_mse'])})"))
    lines.append(f"* 25-step open-loop error at least {GOAL_OPEN_LOOP_RATIO:g}x lower than the plain MLP: "
                 + ("not evaluated (needs --mixer, --mlp and 25-step windows)" if g["open_loop_25_ratio_met"] is None
                    else f"{'met' if g['open_loop_25_ratio_met'] else 'NOT met'} "
                    f"(MLP / mixer = {g['open_loop_25_ratio_mlp_over_mixer']:.2f})"))
    lines += ["", f"Files: `{results['out']}/results.json`, `{results['out']}/open_loop_error.png`."]
    return "\n".join(lines) + "\n\n"


def machine() -> str:
    import torch

    # The load average says how much other work shared the cores while the speeds were measured.
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU used, "
            f"{platform.system()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"1-min load average {os.getloadavg()[0]:.1f} at the start")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="vla-preprocess folder (its validation split is used)")
    p.add_argument("--mixer", type=Path, help="saved MLP-Mixer WorldModel folder (e.g. runs/world_model/best)")
    p.add_argument("--mlp", type=Path, help="saved plain-MLP WorldModel folder (e.g. runs/world_model_mlp/best)")
    for name, default in TRAIN_CONFIGS.items():
        p.add_argument(f"--{name}-config", default=default, help=f"YAML the --{name} model was trained with (for the "
                       "report's training command)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/world_model"), help="results folder (replaced)")
    p.add_argument("--results-md", type=Path, help=f"markdown file whose {SECTION!r} section is replaced")
    p.add_argument("--threads", type=int, default=2, help="torch threads for everything (default 2)")
    p.add_argument("--horizon", type=int, default=max(REPORT_HORIZONS), help="open-loop steps (default 25)")
    p.add_argument("--max-starts", type=int, help="evenly spaced subsample of open-loop starts (default: all)")
    p.add_argument("--speed-batch", type=int, default=1024, help="parallel dreams in the speed test")
    p.add_argument("--speed-seconds", type=float, default=3.0, help="minimum timed seconds per model")
    p.add_argument("--sim-task", default="lift", help="robosuite task timed for comparison")
    p.add_argument("--sim-steps", type=int, default=300, help="timed robosuite steps (200+ for the report)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.mixer is None and args.mlp is None:
        raise UserError("nothing to evaluate: pass --mixer and/or --mlp (saved WorldModel folders)")
    for flag in ("threads", "horizon", "speed_batch", "sim_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_starts is not None and args.max_starts < 1:
        raise UserError(f"--max-starts must be >= 1, got {args.max_starts}")
    if args.speed_seconds <= 0:
        raise UserError(f"--speed-seconds must be > 0, got {args.speed_seconds}")


def evaluate_dynamics(dynamics: Dynamics, data: Validation, starts: np.ndarray, horizon: int) -> dict[str, Any]:
    return {**one_step_metrics(dynamics, data), **open_loop_curve(dynamics, data, starts, horizon)}


def benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from data_prep.tasks import get_task

    check_args(args)
    get_task(args.sim_task)
    torch.set_num_threads(args.threads)
    data = load_validation(args.dataset)
    folders = {name: folder for name, folder in (("mixer", args.mixer), ("mlp", args.mlp)) if folder is not None}
    loaded = {name: load_world_model(folder, f"--{name}", ARCHITECTURES[name], STATE_LAYOUT)
              for name, folder in folders.items()}
    starts = open_loop_starts(data.table, args.horizon, args.max_starts)
    if len(starts) == 0:
        raise UserError(f"--dataset {args.dataset}: no validation episode is longer than --horizon {args.horizon} steps")

    models: dict[str, dict[str, Any]] = {}
    for name, model in loaded.items():
        dynamics = WorldModelDynamics(name, model, data.table)
        models[name] = {
            "folder": str(folders[name]),
            "parameters": parameter_count(model),
            "architecture": getattr(model.config, "architecture", "mixer"),
            "training": training_record(folders[name], getattr(args, f"{name}_config")),
            **evaluate_dynamics(dynamics, data, starts, args.horizon),
            "speed": dream_steps_per_second(dynamics, data, args.speed_batch, min_seconds=args.speed_seconds),
        }
        print(f"{name}: {models[name]['parameters']:,} parameters, one-step MSE {models[name]['one_step_mse']:.4g}, "
              f"{models[name]['speed']['steps_per_s']:,.0f} dream steps/s")
    for velocity in (False, True):
        linear = LinearDynamics(data, velocity)
        models[linear.name] = {"parameters": linear.parameters,
                               **evaluate_dynamics(linear, data, starts, args.horizon), "speed": None}
    models["identity"] = {"parameters": 0, **evaluate_dynamics(IdentityDynamics(), data, starts, args.horizon),
                          "speed": None}
    sim = robosuite_steps_per_second(args.sim_task, args.sim_steps)
    print(f"robosuite {args.sim_task}: {sim['steps_per_s']:,.0f} steps/s")

    results = {
        "command": "python benchmarks/world_model.py " + " ".join(shlex.quote(str(a)) for a in argv),
        "date": date.today().isoformat(),
        "machine": machine(),
        "threads": args.threads,
        "dataset": str(args.dataset),
        "out": str(args.out),
        "validation": {"episodes": data.episodes, "rows": len(data.table), "horizon": args.horizon,
                       "starts": len(starts), "eligible_starts": len(open_loop_starts(data.table, args.horizon, None))},
        "speed_batch": args.speed_batch,
        "models": models,
        "robosuite": sim,
        "goals": goals(models),
    }
    section = markdown_section(results)

    publish_benchmark(args.out, results, section, {"open_loop_error.png": lambda path: plot_open_loop(models, path)},
                      "world_model.md", args.results_md, SECTION)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return run_cli(lambda: benchmark(args, argv))


if __name__ == "__main__":
    main()
