"""What one episode's simulator set-up costs (build the env, reset it to its seed), with and without
compiling each MJCF once per process (`data_prep.sim.CompiledModels`).

    .venv/bin/python benchmarks/sim_setup.py --tasks lift can square --episodes 10

Every real episode of `vla-rollout` and every attempt of `vla-generate` pays this once. Each
setting runs in its own process, so the cache of one cannot help the other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from data_prep.tasks import default_tasks


def measure(task: str, episodes: int, cached: bool) -> float:
    """Seconds per (make_env + reset) for `episodes` seeds, after one warm-up episode."""
    import data_prep.sim as sim

    if not cached:
        sim.compile_models_once = lambda: None
    sim.make_env(task, 0).reset(0)  # imports and, when cached, the first compile
    start = time.perf_counter()
    for seed in range(1, episodes + 1):
        sim.make_env(task, seed).reset(seed).clear()
    return (time.perf_counter() - start) / episodes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=default_tasks())
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--child", nargs=2, metavar=("TASK", "CACHED"), help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        print(measure(args.child[0], args.episodes, args.child[1] == "1"))
        return
    print("| task | compile every time, s/episode | compile once, s/episode | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for task in args.tasks:
        seconds = [
            float(subprocess.run([sys.executable, __file__, "--episodes", str(args.episodes), "--child", task, flag],
                                 check=True, capture_output=True, text=True).stdout.split()[-1])
            for flag in ("0", "1")
        ]
        print(f"| {task} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[0] / seconds[1]:.1f}x |")


if __name__ == "__main__":
    main()
