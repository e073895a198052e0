"""The README's main command from a fresh clone, timed: set-up + `vla-pipeline` (the default size), then its success
table, written to the "## The main job" section of docs/RESULTS.md.

    python benchmarks/main_job.py --seeds 0 1 --results-md docs/RESULTS.md

Each seed: `git clone` of this repository's HEAD into a fresh folder (committed files only, as a user gets them),
`bash scripts/setup.sh && .venv/bin/vla-pipeline --seed S` there, timed as one wall-clock span (the clone excluded),
then the evaluations' summary.json read back. Run it with nothing else on the machine: the time is the measurement.
The fresh venv reuses pip's cache of this machine (as a second install by the same user would).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from common.errors import UserError, run_cli  # noqa: E402
from evaluation.report import replace_markdown_section  # noqa: E402

SECTION = "## The main job"
MAIN_COMMAND = "bash scripts/setup.sh && .venv/bin/vla-pipeline"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one fresh run each")
    p.add_argument("--work", type=Path, default=Path("/tmp/vla-main-job"), help="where the fresh clones go")
    p.add_argument("--results-md", type=Path, help="markdown file whose '## The main job' section is replaced")
    p.add_argument("--out", type=Path, default=Path("results/main_job.json"), help="JSON of every run")
    p.add_argument("--eval-seed", type=int, help="vla-pipeline --eval-seed (a tuning run: 200000+; default: the pipeline's)")
    p.add_argument("--add", action="store_true",
                   help="keep the other seeds' runs already in --out (one seed per invocation, the section shows all)")
    return p


def run_seed(seed: int, work: Path, eval_seed: int | None = None) -> dict:
    clone = work / f"seed{seed}"
    if clone.exists():
        raise UserError(f"{clone} already exists; remove it or pass another --work")
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    log = work / f"seed{seed}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "OMP_", "MKL_"))}
    started = time.monotonic()
    with open(log, "w") as out:
        extra = f" --eval-seed {eval_seed}" if eval_seed is not None else ""
        code = subprocess.run(["bash", "-c", f"{MAIN_COMMAND} --seed {seed}{extra}"], cwd=clone, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    if code != 0:
        raise UserError(f"seed {seed}: the main command exited {code}; see {log}")
    workdir = clone / "runs" / "pipeline"
    evaluations = {
        label: json.loads((workdir / f"eval_{name}" / "summary.json").read_text())
        for name, label in (("policy", "vla"), ("mlp", "mlp"))
    }
    stages = [json.loads(p.read_text()) for p in sorted((workdir / ".stages").glob("*.done.json"))]
    return {"seed": seed, "commit": head, "wall_seconds": seconds, "log": str(log),
            "stages": {s["stage"]: s["seconds"] for s in stages}, "evaluations": evaluations}


def rows(run: dict) -> list[tuple[str, str, int, int, float | None, float | None]]:
    """(policy, task, successes, episodes, dream success rate, dream - real) per real evaluation row."""
    found = []
    for label, summary in run["evaluations"].items():
        dream = {a["task"]: a for a in summary.get("agreement", []) if not a.get("world_model")}
        for row in summary["results"]:
            if row["env"] == "real":
                pair = dream.get(row["task"], {})
                found.append((label, row["task"], row["successes"], row["episodes"],
                              pair.get("dream_success_rate"), pair.get("success_gap")))
    return found


def section(runs: list[dict], command: str) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f} %"

    minutes = ", ".join(f"seed {r['seed']}: {r['wall_seconds'] / 60:.1f} min" for r in runs)
    lines = [
        SECTION, "",
        f"The README's main command, `{MAIN_COMMAND}` (the default size, `--standard`), from a fresh clone, set-up "
        f"included, one run per training seed; 50 real episodes per task on the evaluation starts (seeds "
        f"100000-100049), each dreamed by the run's world-model pool from the same start. Machine: "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), nothing else running. Date: {date.today().isoformat()}.",
        "", "```", command, "```", "",
        f"Wall time: {minutes} (target: 30 min).", "",
        "| seed | policy | task | real success | dream | dream - real |", "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for run in runs:
        for label, task, successes, episodes, dream, gap in rows(run):
            lines.append(f"| {run['seed']} | {label} | {task} | {successes}/{episodes} = {pct(successes / episodes)} "
                         f"| {pct(dream)} | {'n/a' if gap is None else f'{100 * gap:+.0f} pp'} |")
    slowest = sorted(runs[0]["stages"].items(), key=lambda kv: -(kv[1] or 0))[:5]
    lines += ["", "Slowest stages (seed " + str(runs[0]["seed"]) + "): "
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in slowest) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        if shutil.which("git") is None:
            raise UserError("git is needed to clone the repository")
        runs = [run_seed(seed, args.work, args.eval_seed) for seed in args.seeds]
        if args.add and args.out.is_file():
            kept = [run for run in json.loads(args.out.read_text()) if run["seed"] not in args.seeds]
            runs = sorted(kept + runs, key=lambda run: run["seed"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=2) + "\n")
        command = " ".join(["python benchmarks/main_job.py", *(argv if argv is not None else sys.argv[1:])])
        text = section(runs, command)
        print(text)
        if args.results_md:
            replace_markdown_section(args.results_md, SECTION, text)
            print(f"updated {args.results_md} ({SECTION})")

    run_cli(run)


if __name__ == "__main__":
    main()
