"""The whole evaluation in one command: the scripted expert in real robosuite (sanity upper bound),
then the VLA and the MLP baseline both in dreams and in reality from the same initial states.

    .venv/bin/python benchmarks/evaluate.py --vla runs/vla --mlp runs/mlp --world-model runs/world \
        --tasks lift can square --episodes 50 --workers 2 --out results/benchmark --results-md docs/RESULTS.md

Writes one results folder (episodes.jsonl, summary.json/md, figures/, videos/ with --video) and
replaces the "## Evaluation" section of --results-md (other sections are kept).
Every policy and world-model folder is checked before the first rollout.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

from common.errors import UserError, run_cli
from common.policies import ChunkExecution
from data_prep.tasks import default_tasks
from evaluation.cli import parse_args
from evaluation.envs import DREAM_RELATIVE, DREAM_SUCCESS
from evaluation.plan import make_plan, play, settings_of, write_results
from evaluation.records import write_episodes
from evaluation.report import replace_markdown_section, write_summary
from model_kinds import kinds

SECTION = "## Evaluation"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for kind in kinds("policy"):  # --vla, --mlp: one flag per registered policy kind
        p.add_argument(f"--{kind.label}", type=Path, help=f"saved {kind.model_class.__name__} folder")
    p.add_argument("--world-model", type=Path, nargs="+",
                   help="saved WorldModel folder(s) (needed with a policy); several: the spread over them is reported")
    p.add_argument("--tasks", nargs="+", default=default_tasks())
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=100_000, help="first simulator seed; disjoint from vla-generate's")
    p.add_argument("--horizon", type=int, help="max steps per episode (default: each task's horizon)")
    p.add_argument("--no-expert", action="store_true", help="skip the scripted-expert upper bound")
    p.add_argument("--dream-success", choices=DREAM_SUCCESS, default=DREAM_SUCCESS[0],
                   help="dream success from the world model's head (default) or robosuite's rule on the dreamed state")
    p.add_argument("--dream-relative", choices=DREAM_RELATIVE, default=DREAM_RELATIVE[0],
                   help="the dream's object-to-eef pose: derived from the imagined poses or the world model's own")
    p.add_argument("--video", action="store_true", help="film 2 episodes per task and policy: real, dream, side by side")
    p.add_argument("--ensemble-decay", type=float, default=ChunkExecution.decay,
                   help="temporal ensembling weight exp(-m * i) of the i-th oldest chunk, both policies (vla-rollout's)")
    p.add_argument("--out", type=Path, default=Path("results/benchmark"))
    p.add_argument("--results-md", type=Path, help="markdown file whose '## Evaluation' section is replaced")
    return p


def benchmark_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def rollout_argv(args: argparse.Namespace, policy: str, name: str, env: str) -> list[str]:
    """The vla-rollout command line of one policy (so the benchmark and the CLI share every default)."""
    argv = ["--policy", policy, "--name", name, "--env", env, "--tasks", *args.tasks, "--episodes", str(args.episodes),
            "--workers", str(args.workers), "--seed", str(args.seed), "--out", str(args.out), "--no-progress",
            "--ensemble-decay", str(args.ensemble_decay)]
    if env != "real":
        argv += ["--world-model", *map(str, args.world_model or []), "--dream-success", args.dream_success,
                 "--dream-relative", args.dream_relative]
    if args.horizon:
        argv += ["--horizon", str(args.horizon)]
    if args.video:
        argv += ["--video"]
    return argv


def machine() -> str:
    import robosuite
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, robosuite {robosuite.__version__}")


def dream_rule(args: argparse.Namespace) -> str:
    success = ("the world model's success head above 0.5" if args.dream_success == "head"
               else "robosuite's success rule applied to the dreamed state")
    relative = ("derived from the dreamed eef and object poses with robosuite's formula" if args.dream_relative == "poses"
                else "the world model's own prediction")
    return f"{success} (dream; the dream's object-to-eef pose is {relative})"


def section_text(command: str, markdown: str, timings: dict[str, float], messages: list[str], out: Path,
                 dream: str) -> str:
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Date: {date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        "Wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()),
        "",
        "Real episode i starts from the simulator reset with seed `seed + i`; each dream starts from its real",
        f"twin's initial state. Success = the env's `_check_success()` (real) or {dream}.",
        "Errors (crashed simulators) are excluded from rates and counted separately.",
        "",
        markdown.rstrip("\n"),
        "",
        f"Figures in `{out}/figures/`: " + ", ".join(f"`{f}`" for f in figures),
    ]
    lines += ["", *[f"* {m}" for m in messages]] if messages else []
    return "\n".join(lines) + "\n\n"


def benchmark(args: argparse.Namespace) -> None:
    runs = [] if args.no_expert else [("expert", "expert", "real")]
    runs += [(str(getattr(args, kind.label)), kind.label, "both") for kind in kinds("policy") if getattr(args, kind.label)]
    if not runs:
        flags = " and/or ".join(f"--{kind.label}" for kind in kinds("policy"))
        raise UserError(f"nothing to evaluate: pass {flags} (or drop --no-expert)")
    plans = []
    for policy, name, env in runs:  # every check before the first rollout
        rollout_args = parse_args(rollout_argv(args, policy, name, env))
        plans.append((rollout_args, make_plan(rollout_args)))
    timings: dict[str, float] = {}
    messages: list[str] = []

    def produce(tmp: Path) -> str:
        records = []
        for rollout_args, plan in plans:
            start = time.perf_counter()
            played, notes = play(rollout_args, plan, tmp)
            timings[plan.policy_name] = time.perf_counter() - start
            records += played
            messages.extend(notes)
        write_episodes(records, tmp)
        settings = {plan.policy_name: settings_of(a, plan) for a, plan in plans}
        return write_summary(records, tmp, settings, messages)

    out, markdown = write_results(args.out, produce, "benchmarks/evaluate.py", overwrite=True)  # its own earlier results only
    print(markdown)
    print("\n".join(messages))
    if args.results_md:
        command = "python benchmarks/evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        replace_markdown_section(args.results_md, SECTION, section_text(command, markdown, timings, messages, out, dream_rule(args)))
        print(f"updated {args.results_md} ({SECTION})")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    args = benchmark_args(argv)
    run_cli(lambda: benchmark(args))


if __name__ == "__main__":
    main()
