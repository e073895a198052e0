"""How often the dream videos can draw the arm: inverse kinematics on every dreamed state of a results folder.

    PYTHONPATH=. .venv/bin/python benchmarks/dream_ik.py results/ [--policy NAME] [--json FILE]

Reads a `vla-rollout` results folder (its dreams, any --env) and poses every dreamed state, frame after frame as
`evaluation.dream_video` draws them (each IK warm-started from the previous frame, in a robosuite env reset with the
episode's seed). A frame counts as reached within 1 cm and 10 degrees (`evaluation.arm_ik`); elsewhere a dream
video shows the marker. Per task: dreams, frames, the share reached, and the 50th / 95th / max position and
orientation errors. Needs no OpenGL (nothing is rendered).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from evaluation.dream_video import DreamScene, finite_states
from evaluation.records import EpisodeRecord, read_episodes, select


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a vla-rollout results folder with dreams")
    p.add_argument("--policy", help="policy name in the folder (default: every policy)")
    p.add_argument("--json", type=Path, help="also write the table's numbers to this JSON file")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def ik_errors(dream: EpisodeRecord) -> np.ndarray:
    """[frames, 4]: position error (m), orientation error (degrees), reached (0/1), from a random restart (0/1) of
    each posed dreamed state."""
    scene = DreamScene(dream.task, dream.seed)
    try:
        results = [scene.pose(state).ik for state in finite_states(dream)]
    finally:
        scene.close()
    return np.array([(r.position_error, r.orientation_error, r.ok, r.random_start) for r in results],
                    dtype=np.float64).reshape(-1, 4)


def summarize(task: str, dreams: int, errors: np.ndarray) -> dict:
    position, orientation, reached, random_start = errors.T
    return {
        "task": task, "dreams": dreams, "frames": len(errors), "reached": int(reached.sum()),
        "reached_by_random_restart": int((reached * random_start).sum()),  # a local minimum of the warm starts
        "rate": float(reached.mean()) if len(errors) else float("nan"),
        "position_cm": [float(np.percentile(position, q) * 100) for q in (50, 95, 100)],
        "orientation_deg": [float(np.percentile(orientation, q)) for q in (50, 95, 100)],
    }


def table(rows: list[dict]) -> list[str]:
    lines = ["| task | dreams | frames | IK reached | of which by a random restart | missed by every start | "
             "position error cm (50 / 95 / max) | orientation error deg (50 / 95 / max) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        pos = " / ".join(f"{v:.2f}" for v in row["position_cm"])
        rot = " / ".join(f"{v:.1f}" for v in row["orientation_deg"])
        lines.append(f"| {row['task']} | {row['dreams']} | {row['frames']} | {row['reached']} ({100 * row['rate']:.1f} %) "
                     f"| {row['reached_by_random_restart']} | {row['frames'] - row['reached']} | {pos} | {rot} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run() -> None:
        records = select(read_episodes(args.results), env="dream")
        if args.policy:
            records = select(records, policy=args.policy)
        if not records:
            raise UserError(f"{args.results}: no dreamed episodes{' of policy ' + repr(args.policy) if args.policy else ''} "
                            "(expected a vla-rollout --env dream or both folder)")
        rows, start = [], time.perf_counter()
        for task in dict.fromkeys(r.task for r in records):
            dreams = select(records, task=task)
            rows.append(summarize(task, len(dreams), np.concatenate([ik_errors(d) for d in dreams])))
        print("\n".join(table(rows)))
        print(f"{sum(r['frames'] for r in rows)} frames posed in {time.perf_counter() - start:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    run_cli(run)


if __name__ == "__main__":
    main()
