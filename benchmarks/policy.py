"""Policy benchmark: the VLA and the MLP baseline on held-out validation episodes, CPU latency and training speed.

    python benchmarks/policy.py --dataset data/hf_dataset --vla runs/vla_minilm/best --mlp runs/mlp_bc/best \
        --out runs/benchmarks/policy [--results-md docs/RESULTS.md]

Measures, for each policy folder given:
* validation action loss (L1 and MSE in the dataset's normalised action space, over the action chunk, steps past
  the episode end masked out), per task and overall, on the trainer's own windows of the validation split
  (`train_accelerate.load_training_data` / `make_loader`). Validation episodes carry held-out instruction
  paraphrases; the same loss with every window given its task's canonical (training) instruction shows what the
  unseen wording costs;
* inference latency per control step on CPU: `predict_actions` on one state + instruction (batch 1), for each
  `--threads` setting, median and p90 over `--latency-calls` calls after `--warmup` calls;
* training samples/s, steps and wall time from `<folder>/../train_summary.json`, parameters (total / trainable).

Writes <out>/results.json, <out>/val_loss.png, <out>/policy.md (atomically, as one folder) and with
--results-md replaces (or appends) the "## Policies" section of that file, keeping the other sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import train_accelerate as ta  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from data_prep.tasks import STATE_LAYOUT, load_instructions  # noqa: E402
from evaluation.report import publish_benchmark  # noqa: E402
from model_kinds import ModelKind, kinds  # noqa: E402

SECTION = "## Policies"
MIN_STD = 1e-6  # as modeling_vla: constant action dims are divided by 1




# ----------------------------------------------------------------------------- validation loss


@dataclasses.dataclass
class LossSums:
    """Sums over valid (window, step, action dim) entries, so a task's loss weights every entry like the training loss."""

    abs_error: float = 0.0
    squared_error: float = 0.0
    entries: float = 0.0
    windows: int = 0

    def add(self, abs_error: float, squared_error: float, entries: float, windows: int) -> None:
        self.abs_error += abs_error
        self.squared_error += squared_error
        self.entries += entries
        self.windows += windows

    def result(self, action_dim: int) -> dict[str, float]:
        n = max(self.entries, 1.0)
        return {
            "l1": self.abs_error / n,
            "mse": self.squared_error / n,
            "windows": self.windows,
            "valid_steps": int(round(self.entries / action_dim)),
        }


def canonical_instructions(dataset: Path) -> dict[str, str]:
    """task -> canonical instruction, from the dataset's own instructions.json copy when it has one."""
    path = dataset / "instructions.json"
    if not path.is_file():
        return {task: entry["canonical"] for task, entry in load_instructions().items()}
    try:
        data = json.loads(path.read_text())
        return {task: entry["canonical"] for task, entry in data.items() if not task.startswith("_")}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: expected {{task: {{'canonical': str, ...}}}} ({type(err).__name__}: {err})") from None


def with_canonical_instructions(table: ta.EpisodeTable, canonical: dict[str, str], source: str) -> ta.EpisodeTable:
    missing = sorted(set(table.task.tolist()) - set(canonical))
    if missing:
        raise UserError(f"{source}: no canonical instruction for tasks {missing}")
    instruction = np.array([canonical[t] for t in table.task.tolist()], dtype=object)
    return dataclasses.replace(table, instruction=instruction)


@torch.no_grad()
def action_losses(
    model: Any, table: ta.EpisodeTable, horizon: int, action_mean: np.ndarray, action_std: np.ndarray, batch_size: int
) -> dict[str, dict[str, float]]:
    """Per-task and overall L1 / MSE of the model's action chunks on every window of `table`.

    Windows and step masks come from the trainer (a window stops at its episode's end); the model's
    prediction is taken from `model(**batch).prediction` exactly as in training, brought back to raw units
    with the model's statistics and normalised with the dataset's (`action_mean/std`) so every policy is
    scored in the same space.
    """
    from tqdm.auto import tqdm

    from modeling_vla import valid_steps

    chunk = int(model.config.chunk_size)
    mean = torch.as_tensor(action_mean, dtype=torch.float32)
    std = torch.as_tensor(action_std, dtype=torch.float32)
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    loader = ta.make_loader(table, horizon, ta.TrainConfig(model="policy", batch_size=batch_size), shuffle=False)
    sums: dict[str, LossSums] = {}
    model.eval()
    for batch in tqdm(loader, desc=f"val loss {type(model).__name__}", leave=False):
        prediction = model(**batch).prediction.float()  # [B, H, A], the model's normalisation
        predicted = (model.denormalize_action(prediction) - mean) / std
        target = (batch["actions"][:, :chunk] - mean) / std
        weight = valid_steps(batch["step_mask"][:, :chunk]).unsqueeze(-1).expand_as(target)
        error = predicted - target
        per_row = (
            (error.abs() * weight).sum((1, 2)).double(),
            (error.square() * weight).sum((1, 2)).double(),
            weight.sum((1, 2)).double(),
        )
        for task in dict.fromkeys(batch["task"]):
            rows = torch.tensor([t == task for t in batch["task"]])
            sums.setdefault(task, LossSums()).add(*(float(v[rows].sum()) for v in per_row), int(rows.sum()))
    overall = LossSums()
    for task_sums in sums.values():
        overall.add(task_sums.abs_error, task_sums.squared_error, task_sums.entries, task_sums.windows)
    action_dim = int(model.config.action_dim)
    return {**{t: sums[t].result(action_dim) for t in sorted(sums)}, "overall": overall.result(action_dim)}


# ----------------------------------------------------------------------------- latency


@torch.no_grad()
def measure_latency(model: Any, state: torch.Tensor, instruction: str, threads: int, calls: int, warmup: int) -> dict:
    """Wall time of one `predict_actions` call (batch 1) with `threads` torch threads, after `warmup` calls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            model.predict_actions(state, instruction)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model.predict_actions(state, instruction)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "calls": calls,
        "warmup": warmup,
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(np.mean(times)),
    }


# ----------------------------------------------------------------------------- training


def read_train_summary(folder: Path) -> dict | None:
    """The trainer writes train_summary.json next to best/ and final/."""
    path = folder.resolve().parent / "train_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def set_arguments(config: dict[str, Any], base: ta.TrainConfig) -> list[str]:
    """`--set key=value` for every field where the run's config differs from its YAML (model, paths excluded)."""

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    base_values = dataclasses.asdict(base)
    changed = []
    for key, value in config.items():
        if key in ("model", "dataset", "output_dir", "model_config") or key not in base_values:
            continue
        if value != base_values[key]:
            changed.append(f"{key}={text(value)}")
    run_model, yaml_model = config.get("model_config") or {}, base.model_config
    for key in sorted(set(run_model) | set(yaml_model)):
        if run_model.get(key) != yaml_model.get(key):
            changed.append(f"model_config.{key}={text(run_model.get(key))}")
    return changed


def training_command(kind: ModelKind, folder: Path, summary: dict | None, config_path: Path) -> tuple[str, str | None]:
    """The vla-train command that produced `folder` (from its train_summary.json) and a note if it is uncertain."""
    config = (summary or {}).get("config") or {}
    dataset = config.get("dataset", "DATASET")
    output_dir = config.get("output_dir", str(folder.parent))
    parts = ["vla-train", "--model", kind.name, "--config", str(config_path), "--dataset", dataset,
             "--output-dir", output_dir]
    note = None
    if not config:
        note = f"{folder.parent}/train_summary.json not found: the training settings are not recorded"
    elif not config_path.is_file():
        note = f"{config_path} not found: cannot tell which settings differed from it"
    else:
        base = ta.load_config(config_path, model=kind.name, dataset=dataset, output_dir=output_dir)
        overrides = set_arguments(config, base)
        parts += ["--set", *overrides] if overrides else []
    if summary and int(summary.get("processes") or 1) > 1:
        note = f"trained with {summary['processes']} processes (accelerate launch)"
    return " ".join(shlex.quote(p) for p in parts), note


def training_stats(summary: dict | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    keys = ("train_samples_per_s", "steps", "epochs", "wall_time_s", "best_val_loss", "horizon", "processes",
            "params_total", "params_trainable")
    stats = {k: summary.get(k) for k in keys}
    stats["batch_size"] = (summary.get("config") or {}).get("batch_size")
    return stats


# ----------------------------------------------------------------------------- one policy


def load_policy(kind: ModelKind, folder: Path, tasks: list[str]) -> Any:
    from common.saved_models import check_model_config, load_model, read_model_config

    flag = f"--{kind.label}"
    config = read_model_config(folder, flag)
    check_model_config(config, folder, flag, (kind.model_type,), [], STATE_LAYOUT)
    trained = config.get("tasks") or []
    unknown = [t for t in tasks if trained and t not in trained]
    if unknown:
        raise UserError(f"{flag} {folder}/config.json: trained on tasks {trained}, the validation split also has {unknown}")
    return load_model(folder, flag, "cpu")


def policy_name(kind: ModelKind, model: Any) -> str:
    backbone = getattr(model.config, "backbone", None)
    return f"{kind.title} ({Path(backbone).name})" if backbone else kind.title


def benchmark_policy(kind: ModelKind, folder: Path, data: ta.TrainingData, canonical_table: ta.EpisodeTable,
                     args: argparse.Namespace) -> dict[str, Any]:
    model = load_policy(kind, folder, sorted(set(data.validation.task.tolist())))
    summary = read_train_summary(folder)
    horizon = int((summary or {}).get("horizon") or model.config.chunk_size)
    action = data.normalization.action
    notes = []
    if not (np.allclose(model.config.action_mean, action.mean, atol=1e-5)
            and np.allclose(model.config.action_std, action.std, atol=1e-5)):
        notes.append(f"{folder}: action statistics differ from {args.dataset}/normalization.json (trained on other data?)")
    loss = {}
    for name, table in (("paraphrase", data.validation), ("canonical", canonical_table)):
        loss[name] = action_losses(model, table, horizon, action.mean, action.std, args.batch_size)
    state = torch.as_tensor(data.validation.state[:1])
    instruction = str(data.validation.instruction[0])
    latency = [measure_latency(model, state, instruction, n, args.latency_calls, args.warmup) for n in args.threads]
    total, trainable = ta.count_parameters(model)
    if summary and summary.get("params_total") is not None:  # the trainer counted before saving (requires_grad intact)
        total, trainable = summary["params_total"], summary["params_trainable"]
    config_path = getattr(args, f"{kind.label}_config")
    command, note = training_command(kind, folder, summary, config_path)
    notes += [note] if note else []
    return {
        "name": policy_name(kind, model),
        "folder": str(folder),
        "model_class": type(model).__name__,
        "backbone": getattr(model.config, "backbone", None),
        "chunk_size": int(model.config.chunk_size),
        "window_horizon": horizon,
        "training_loss": getattr(model.config, "loss", None),
        "params_total": int(total),
        "params_trainable": int(trainable),
        "val_loss": loss,
        "latency": latency,
        "latency_state": "first validation state",
        "latency_instruction": instruction,
        "training": training_stats(summary),
        "training_command": command,
        "notes": notes,
    }


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_cores": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": load[0] if load else None,
    }


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Grouped bars per task (+ overall): each policy's L1 and MSE, unseen paraphrases solid, canonical hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = results["policies"]
    groups = list(next(iter(policies.values()))["val_loss"]["paraphrase"])
    colors = {"vla": "tab:blue", "mlp": "tab:orange"}
    bars = [(key, variant) for key in policies for variant in ("paraphrase", "canonical")]
    width = 0.8 / len(bars)
    x = np.arange(len(groups))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric in zip(axes, ("l1", "mse"), strict=True):
        for i, (key, variant) in enumerate(bars):
            values = [policies[key]["val_loss"][variant][g][metric] for g in groups]
            label = f"{policies[key]['name']}, {'unseen paraphrase' if variant == 'paraphrase' else 'canonical'}"
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label, color=colors.get(key),
                   alpha=1.0 if variant == "paraphrase" else 0.45, hatch=None if variant == "paraphrase" else "//")
        ax.set_xticks(x, groups)
        ax.set_title(f"validation action {metric.upper()} (normalised)", fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def latency_verdict(policy: dict[str, Any], goal_ms: float) -> str:
    parts = [f"{'met' if m['median_ms'] <= goal_ms else 'not met'} with {m['threads']} thread"
             f"{'s' if m['threads'] > 1 else ''} (median {m['median_ms']:.1f} ms)" for m in policy["latency"]]
    return "; ".join(parts)


def markdown_section(results: dict[str, Any]) -> str:
    policies, data, host = results["policies"], results["dataset"], results["machine"]
    goal = results["latency_goal_ms"]
    lines = [
        SECTION,
        "",
        "Behaviour-cloning quality of the policies on the held-out validation episodes, CPU inference latency",
        "and training speed (`benchmarks/policy.py`).",
        "",
        "Commands:",
        "",
        "```",
        *[p["training_command"] for p in policies.values()],
        results["command"],
        "```",
        "",
        f"Date: {results['date']}  ",
        f"Machine: {host['cpu_cores']} CPU cores ({host['processor']}, {host['system']}), no GPU, shared with other "
        f"jobs (1-min load average {fmt(host['load_average_1min'], 2)} at the start, "
        f"{fmt(results['load_average_1min_end'], 2)} at the end); Python {host['python']}, "
        f"torch {host['torch']}",
        "",
        f"### Validation action loss (`{data['path']}`)",
        "",
        f"{data['validation_episodes']} validation episodes ({data['validation_windows']} windows, one per step; "
        f"tasks {', '.join(data['tasks'])}). Their instructions ({len(data['validation_instructions'])} phrasings) "
        f"include {data['validation_instructions_seen_in_training']} that occur in the training split. "
        "Loss = mean over the action chunk's valid steps (steps past the episode end masked, as in training) and the "
        "7 action dims, in the dataset's normalised action space (train-split mean/std). \"canonical\": the same "
        "windows with each task's canonical training instruction instead.",
        "",
        "| task | policy | L1 unseen paraphrase | L1 canonical | MSE unseen paraphrase | MSE canonical |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    groups = list(next(iter(policies.values()))["val_loss"]["paraphrase"])
    for group in groups:
        for policy in policies.values():
            para, canon = policy["val_loss"]["paraphrase"][group], policy["val_loss"]["canonical"][group]
            name = f"**{group}**" if group == "overall" else group
            lines.append(f"| {name} | {policy['name']} | {fmt(para['l1'])} | {fmt(canon['l1'])} | "
                         f"{fmt(para['mse'])} | {fmt(canon['mse'])} |")
    lines += [
        "",
        f"### Inference latency per control step (CPU, batch 1, goal <= {goal:g} ms for the VLA)",
        "",
        "`predict_actions` on one state + instruction (one call per control step with temporal ensembling), "
        f"after {results['settings']['warmup']} warm-up calls; tokens / text embeddings are cached per instruction "
        "string, as in a rollout.",
        "",
        "| policy | torch threads | calls | median ms | p90 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for policy in policies.values():
        for m in policy["latency"]:
            lines.append(f"| {policy['name']} | {m['threads']} | {m['calls']} | {m['median_ms']:.2f} | {m['p90_ms']:.2f} |")
    if "vla" in policies:
        lines += ["", f"Latency goal (VLA median <= {goal:g} ms): {latency_verdict(policies['vla'], goal)}."]
    lines += [
        "",
        "### Training",
        "",
        "| policy | parameters (total / trainable) | batch | steps | train samples/s | wall time | trainer's best val loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy in policies.values():
        t = policy["training"] or {}
        wall = duration(t.get("wall_time_s"))
        lines.append(
            f"| {policy['name']} | {policy['params_total']:,} / {policy['params_trainable']:,} | "
            f"{t.get('batch_size') or 'n/a'} | {t.get('steps') or 'n/a'} | {fmt(t.get('train_samples_per_s'), 1)} | "
            f"{wall} | {fmt(t.get('best_val_loss'))} ({policy['training_loss'] or '?'}) |"
        )
    lines += [
        "",
        "Train samples/s excludes evaluation and checkpoint pauses (`train_summary.json`). The trainer's validation "
        "loss is its own training loss, on at most `max_eval_batches` batches; the table above scores every "
        "validation window.",
        "",
        f"Figure: `{results['out']}/val_loss.png`.",
    ]
    notes = [n for p in policies.values() for n in p["notes"]]
    lines += ["", *[f"* {n}" for n in notes]] if notes else []
    return "\n".join(lines) + "\n\n"


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/policy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="vla-preprocess dataset folder (validation split used)")
    for kind in kinds("policy"):  # --vla, --mlp: one flag per registered policy kind
        p.add_argument(f"--{kind.label}", type=Path, help=f"saved {kind.model_class.__name__} folder (e.g. runs/x/best)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/policy"))
    p.add_argument("--results-md", type=Path, help=f"markdown file whose '{SECTION}' section is replaced")
    p.add_argument("--batch-size", type=int, default=128, help="windows per forward pass for the validation loss")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts for the latency")
    p.add_argument("--latency-calls", type=int, default=200, help="timed predict_actions calls per thread count")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before timing")
    p.add_argument("--latency-goal-ms", type=float, default=20.0)
    for kind in kinds("policy"):
        p.add_argument(f"--{kind.label}-config", type=Path, default=Path(kind.config),
                       help=f"YAML the {kind.title} was trained with (for the recorded training command)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "latency_calls"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.warmup < 0 or min(args.threads) < 1:
        raise UserError("--warmup must be >= 0 and every --threads value >= 1")
    if all(getattr(args, kind.label) is None for kind in kinds("policy")):
        raise UserError(f"nothing to benchmark: pass {' and/or '.join(f'--{kind.label}' for kind in kinds('policy'))}")
    return args


def benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:

    host = machine()  # the load average before our own work
    data = ta.load_training_data(args.dataset)
    canonical = canonical_instructions(args.dataset)
    canonical_table = with_canonical_instructions(data.validation, canonical, str(args.dataset))
    validation_instructions = sorted(set(data.validation.instruction.tolist()))
    seen = set(data.train.instruction.tolist())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(args.threads))
    try:
        policies = {kind.label: benchmark_policy(kind, getattr(args, kind.label), data, canonical_table, args)
                    for kind in kinds("policy") if getattr(args, kind.label) is not None}
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "date": date.today().isoformat(),
        "command": command,
        "machine": host,
        "out": str(args.out),
        "latency_goal_ms": args.latency_goal_ms,
        "settings": {"batch_size": args.batch_size, "threads": args.threads, "latency_calls": args.latency_calls,
                     "warmup": args.warmup},
        "dataset": {
            "path": str(args.dataset),
            "tasks": sorted(set(data.validation.task.tolist())),
            "validation_episodes": int(len(np.unique(data.validation.episode_end))),
            "validation_windows": len(data.validation),
            "validation_instructions": validation_instructions,
            "validation_instructions_seen_in_training": sum(i in seen for i in validation_instructions),
            "canonical_instructions": canonical,
        },
        "policies": policies,
    }
    results["load_average_1min_end"] = machine()["load_average_1min"]
    if "vla" in policies:
        results["latency_goal_met"] = {str(m["threads"]): m["median_ms"] <= args.latency_goal_ms
                                       for m in policies["vla"]["latency"]}
    section = markdown_section(results)

    publish_benchmark(args.out, results, section, {"val_loss.png": lambda path: plot_losses(results, path)},
                      "policy.md", args.results_md, SECTION)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/policy.py " + " ".join(shlex.quote(a) for a in raw)
    return run_cli(lambda: benchmark(parse_args(raw), command))


if __name__ == "__main__":
    main()
