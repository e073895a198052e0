"""`vla-pipeline`: generate → preprocess → train (world, VLA, MLP) → dream + real evaluation → cards/export.

Each stage is one command line run in its own process (the console scripts via `python -m`-style
invocation of this interpreter), so a crash in one stage cannot leave state behind in another and
every stage can also be run by hand. A stage is *done* when its marker file
`<workdir>/.stages/<name>.json` exists; the marker is written atomically only after the command
exited 0 and its declared outputs exist, so re-running the pipeline skips finished stages, re-runs
failed ones, and restarts a half-finished training stage with `--resume`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from data_prep.errors import UserError, run_cli

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("runs/pipeline")
DEFAULT_TASKS = ("lift", "can", "square")
DEFAULT_ORG = "local"  # hub namespace of the exported repos: local/dreaming-vla-world-model, ...


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]
    outputs: tuple[Path, ...]  # must all exist after a successful run; shown in the final summary
    resume_dir: Path | None = None  # a training output dir: present but unfinished → rerun with --resume

    def marker(self, workdir: Path) -> Path:
        return workdir / ".stages" / f"{self.name}.json"


@dataclass
class StageReport:
    name: str
    status: str  # "done" (ran now), "skipped" (done before), "failed"
    seconds: float
    outputs: tuple[Path, ...]


Runner = Callable[[Sequence[str]], int]


def run_subprocess(command: Sequence[str]) -> int:
    """Run one stage with its output streamed to ours; returns the exit status."""
    return subprocess.run(list(command), cwd=REPO_ROOT, check=False).returncode


def stage_is_done(stage: Stage, workdir: Path) -> bool:
    return stage.marker(workdir).is_file() and all(path.exists() for path in stage.outputs)


def stage_command(stage: Stage) -> list[str]:
    """The command to run now: with --resume when a training stage was interrupted after it started."""
    command = list(stage.command)
    if stage.resume_dir is not None and stage.resume_dir.is_dir() and any(stage.resume_dir.iterdir()):
        command.append("--resume")
    return command


def write_marker(stage: Stage, workdir: Path, command: Sequence[str], seconds: float) -> None:
    marker = stage.marker(workdir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage.name,
        "command": list(command),
        "seconds": round(seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "outputs": [str(path) for path in stage.outputs],
    }
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, marker)


def run_stages(
    stages: Sequence[Stage], workdir: Path, runner: Runner = run_subprocess, echo: Callable[[str], None] = print
) -> list[StageReport]:
    """Run the stages in order, skipping finished ones; stops at the first failure (UserError)."""
    reports: list[StageReport] = []
    for index, stage in enumerate(stages, start=1):
        prefix = f"[{index}/{len(stages)}] {stage.name}"
        if stage_is_done(stage, workdir):
            echo(f"{prefix}: already done, skipping ({stage.marker(workdir)})")
            reports.append(StageReport(stage.name, "skipped", 0.0, stage.outputs))
            continue
        command = stage_command(stage)
        echo(f"{prefix}: running {' '.join(command)}")
        start = time.monotonic()
        returncode = runner(command)
        seconds = time.monotonic() - start
        missing = [str(path) for path in stage.outputs if not path.exists()]
        if returncode != 0 or missing:
            reason = f"exit status {returncode}" if returncode != 0 else f"missing outputs {missing}"
            echo(f"{prefix}: FAILED after {seconds:.0f}s ({reason}); fix it and re-run to resume from here")
            reports.append(StageReport(stage.name, "failed", seconds, stage.outputs))
            raise UserError(f"pipeline stage {stage.name!r} failed ({reason}); command: {' '.join(command)}")
        write_marker(stage, workdir, command, seconds)
        echo(f"{prefix}: done in {seconds:.0f}s")
        reports.append(StageReport(stage.name, "done", seconds, stage.outputs))
    return reports


# ----------------------------------------------------------------------------------------------
# The concrete pipeline


@dataclass(frozen=True)
class PipelineSize:
    """How big each stage is. `quick` fits 2 CPU cores in 30 minutes; `full` gives the reported results."""

    episodes_per_task: int
    world_steps: int
    policy_steps: int
    mlp_steps: int
    eval_episodes: int
    workers: int = 2


SIZES = {
    "quick": PipelineSize(episodes_per_task=10, world_steps=300, policy_steps=150, mlp_steps=300, eval_episodes=2),
    "full": PipelineSize(episodes_per_task=100, world_steps=20000, policy_steps=5000, mlp_steps=10000, eval_episodes=20),
}


@dataclass(frozen=True)
class PipelinePaths:
    """Where every stage writes under the work dir; the Space reads its defaults from here too."""

    workdir: Path = DEFAULT_WORKDIR
    org: str = DEFAULT_ORG

    @property
    def raw(self) -> Path:
        return self.workdir / "raw"

    @property
    def dataset(self) -> Path:
        return self.workdir / "dataset"

    def train_dir(self, model: str) -> Path:
        return self.workdir / f"train_{model}"

    def best(self, model: str) -> Path:
        return self.train_dir(model) / "best"

    def eval_dir(self, policy: str) -> Path:
        return self.workdir / f"eval_{policy}"

    def export_dir(self, name: str) -> Path:
        return self.workdir / "export" / name

    def repo_id(self, name: str) -> str:
        return f"{self.org}/dreaming-vla-{name}"


CONFIGS = {"world": "configs/world_model.yaml", "policy": "configs/vla_policy.yaml", "mlp": "configs/mlp_policy.yaml"}
STEPS_KEY = "max_steps"  # the trainer's --set key for the number of optimisation steps
EXPORT_NAMES = {"world": "world-model", "policy": "vla-policy", "mlp": "mlp-policy"}


def console(script: str, *args: str | Path) -> tuple[str, ...]:
    """Run a console script of this environment (next to our interpreter), so the venv is always used."""
    return (str(Path(sys.executable).with_name(script)), *map(str, args))


def build_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int = 0) -> list[Stage]:
    steps = {"world": size.world_steps, "policy": size.policy_steps, "mlp": size.mlp_steps}
    stages = [
        Stage(
            "generate",
            console("vla-generate", "--tasks", *tasks, "--episodes", str(size.episodes_per_task), "--out", paths.raw,
                    "--workers", str(size.workers), "--seed", str(seed)),
            (paths.raw,),
        ),
        Stage(
            "preprocess",
            console("vla-preprocess", "--inputs", paths.raw, "--out", paths.dataset),
            (paths.dataset / "normalization.json",),
        ),
    ]
    for model in ("world", "policy", "mlp"):
        stages.append(
            Stage(
                f"train_{model}",
                console("vla-train", "--model", model, "--config", CONFIGS[model], "--dataset", paths.dataset,
                        "--output-dir", paths.train_dir(model), "--set", f"{STEPS_KEY}={steps[model]}",
                        "--set", f"seed={seed}"),
                (paths.best(model) / "config.json", paths.train_dir(model) / "train_summary.json"),
                resume_dir=paths.train_dir(model),
            )
        )
    for policy in ("policy", "mlp"):
        stages.append(
            Stage(
                f"evaluate_{policy}",
                console("vla-rollout", "--policy", paths.best(policy), "--world-model", paths.best("world"),
                        "--tasks", *tasks, "--episodes", str(size.eval_episodes), "--env", "both",
                        "--out", paths.eval_dir(policy)),
                (paths.eval_dir(policy) / "summary.json",),
            )
        )
    for model, name in EXPORT_NAMES.items():
        results = [paths.train_dir(model) / "train_summary.json"]
        if model != "world":
            results.append(paths.eval_dir(model) / "summary.json")
        stages.append(
            Stage(
                f"export_{model}",
                console("vla-export", "--model-dir", paths.best(model), "--repo-id", paths.repo_id(name),
                        "--card-results", *results, "--dataset-repo-id", paths.repo_id("dataset"),
                        "--out", paths.export_dir(name)),
                (paths.export_dir(name) / "README.md",),
            )
        )
    stages.append(
        Stage(
            "export_dataset",
            console("vla-export", "--dataset-dir", paths.dataset, "--repo-id", paths.repo_id("dataset"),
                    "--out", paths.export_dir("dataset")),
            (paths.export_dir("dataset") / "README.md",),
        )
    )
    return stages


def print_summary(reports: Sequence[StageReport], paths: PipelinePaths, total_seconds: float) -> None:
    print("\n== pipeline summary ==")
    for report in reports:
        print(f"  {report.name:<16} {report.status:<8} {report.seconds:7.0f}s  {', '.join(map(str, report.outputs))}")
    print(f"  total {total_seconds:.0f}s")
    print("results:")
    for policy in ("policy", "mlp"):
        print(f"  {policy:<6} evaluation: {paths.eval_dir(policy) / 'summary.md'}")
    print("model cards / hub repos:")
    for name in (*EXPORT_NAMES.values(), "dataset"):
        print(f"  {paths.repo_id(name):<36} {paths.export_dir(name) / 'README.md'}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vla-pipeline", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="size", action="store_const", const="quick", help="small run, ~30 min on 2 CPU cores (default)")
    mode.add_argument("--full", dest="size", action="store_const", const="full", help="the real-results size")
    parser.set_defaults(size="quick")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--org", default=DEFAULT_ORG, help="namespace of the exported hub repos (local cache only unless pushed)")
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None = None) -> list[StageReport]:
    args = parse_args(argv)
    from data_prep.tasks import get_task

    for task in args.tasks:
        get_task(task)
    paths = PipelinePaths(args.workdir.resolve(), args.org)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    stages = build_stages(paths, SIZES[args.size], args.tasks, args.seed)
    print(f"vla-pipeline --{args.size}: {len(stages)} stages in {paths.workdir}")
    start = time.monotonic()
    reports = run_stages(stages, paths.workdir)
    print_summary(reports, paths, time.monotonic() - start)
    return reports


def main() -> None:
    run_cli(_main)


if __name__ == "__main__":
    main()
