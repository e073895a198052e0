"""Where the roll-ins of DAgger sets hand over to the expert, and which phases of the task their recorded steps
cover: for two or more `vla-generate dagger` files of one task made from the same seeds by different drivers.

    .venv/bin/python benchmarks/dagger_handover.py data/raw_dagger_mlp1/square/low_dim_generated.hdf5 \
        data/raw_dagger_sqdrv/square/low_dim_generated.hdf5

Reads the files only (no simulator). Only seeds that every file kept are compared, so the handover steps are the
same in each (they are drawn from the attempt seed). The object position is the first three dims of the object
observation (cube, can or nut); "lifted" means at least `LIFT_MARGIN` above its resting height (a low percentile of
its height over the file), "at the goal" within `GOAL_RADIUS` in x-y of where the kept episodes end (every kept
DAgger episode ends solved).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from data_prep.robomimic_io import read_robomimic_hdf5
from data_prep.tasks import OBJECT_KEY

LIFT_MARGIN = 0.02  # m above rest: clearly off the table, not a nudge
GOAL_RADIUS = 0.05  # m in x-y around the goal: the last few centimetres of a placement or insertion
LATE_HANDOVER = 80  # policy steps: the roll-ins long enough to have grasped and carried the object


@dataclass
class DaggerSet:
    path: Path
    task: str
    object_pos: dict[int, np.ndarray]  # seed -> [T, 3] object position over the recorded (expert) steps
    handover: dict[int, int]  # seed -> policy steps before the expert took over


def load(path: Path) -> DaggerSet:
    f = read_robomimic_hdf5(path)
    if "handovers" not in f.attrs:
        raise UserError(f"{path}: data.attrs has no 'handovers' (expected a DAgger file from vla-generate dagger)")
    seeds, handovers = (json.loads(v) if isinstance(v, str) else v for v in (f.attrs[k] for k in ("demo_seeds", "handovers")))
    if len(seeds) != len(f) or len(handovers) != len(f):
        raise UserError(f"{path}: {len(f)} episodes but {len(seeds)} demo_seeds and {len(handovers)} handovers")
    object_pos = {seed: f.episode(name).obs[OBJECT_KEY][:, :3] for seed, name in zip(seeds, f.demo_names, strict=True)}
    return DaggerSet(path, f.task, object_pos, dict(zip(seeds, handovers, strict=True)))


def describe(s: DaggerSet, seeds: list[int]) -> dict[str, str]:
    every_step = np.concatenate([s.object_pos[k] for k in seeds])
    rest = np.percentile(every_step[:, 2], 2)
    goal = np.median([s.object_pos[k][-1, :2] for k in seeds], axis=0)
    lifted = every_step[:, 2] > rest + LIFT_MARGIN
    at_goal = np.linalg.norm(every_step[:, :2] - goal, axis=1) < GOAL_RADIUS
    lifted_at_handover = [k for k in seeds if s.object_pos[k][0, 2] > rest + LIFT_MARGIN]
    late = [k for k in seeds if s.handover[k] >= LATE_HANDOVER]
    late_steps = f"{np.mean([len(s.object_pos[k]) for k in late]):.1f}" if late else "-"
    return {
        "file": str(s.path),
        "lifted at handover": f"{len(lifted_at_handover)} / {len(seeds)}",
        "steps: lifted": f"{lifted.mean():.0%}",
        "steps: lifted at the goal": f"{(lifted & at_goal).mean():.0%}",
        f"handover >= {LATE_HANDOVER}: lifted": f"{len(set(late) & set(lifted_at_handover))} / {len(late)}",
        f"handover >= {LATE_HANDOVER}: expert steps": late_steps,
        "expert steps": f"{np.mean([len(s.object_pos[k]) for k in seeds]):.1f}",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+", help="DAgger HDF5 files of one task (vla-generate dagger)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sets = [load(path) for path in args.files]
    if len({s.task for s in sets}) > 1:
        raise UserError(f"files hold different tasks ({', '.join(s.task for s in sets)}); expected one task")
    seeds = sorted(set.intersection(*(set(s.handover) for s in sets)))
    if not seeds:
        raise UserError("the files share no kept seeds: nothing to compare (made from different --seed?)")
    rows = [describe(s, seeds) for s in sets]
    print(f"{sets[0].task}: {len(seeds)} seeds kept in every file")
    print("| " + " | ".join(rows[0]) + " |")
    print("| --- |" + " ---: |" * (len(rows[0]) - 1))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    run_cli(main)
