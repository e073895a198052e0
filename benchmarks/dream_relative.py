"""How far a dream's object-to-eef block is from what its own poses imply, and what it shows the policy at the grasp.

    PYTHONPATH=. .venv/bin/python benchmarks/dream_relative.py results/benchmark_mlp_bc9k --policy mlp

Reads a `vla-rollout --env both` results folder. For every task it reports the mean and 90th percentile distance
(cm) between each dreamed state's object-to-eef position and robosuite's formula applied to the dreamed eef and
object poses (`data_prep.tasks.relative_pose_from_poses`; real states satisfy it to 1e-6, `tests/test_tasks.py`).
A dream run with `--dream-relative poses` (the default) shows 0 here by construction; one with `--dream-relative
model` shows how inconsistent the world model's own block is.

Then, for each real success that was dreamed as a failure ("real only"), at the step where the real policy first
commanded the gripper to close: the object-to-eef position in reality, in the dream's state, and by the formula on
the dream's poses. A dream whose block disagrees with reality at that step shows the policy a misalignment that
the real robot did not have.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data_prep.errors import run_cli
from data_prep.tasks import STATE_SLICES, relative_pose_from_poses
from evaluation.records import EpisodeRecord, read_episodes, select

RELATIVE_POS = STATE_SLICES["object-eef pos"]
GRIPPER_ACTION = 6  # > 0 closes the gripper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a vla-rollout --env both results folder")
    p.add_argument("--policy", help="policy name in the folder (default: every policy)")
    return p.parse_args(argv)


def formula_gap_cm(record: EpisodeRecord) -> np.ndarray:
    """Per step after the start: |stored object-to-eef position - formula on the same record's poses| in cm."""
    states = record.states
    previous = np.concatenate([states[:1], states[:-1]])
    derived = relative_pose_from_poses(states, previous, record.task)
    return 100 * np.linalg.norm(derived[1:, RELATIVE_POS] - states[1:, RELATIVE_POS], axis=-1)


def first_close(record: EpisodeRecord) -> int | None:
    steps = np.flatnonzero(record.actions[:, GRIPPER_ACTION] > 0)
    return int(steps[0]) if len(steps) else None


def at_grasp(real: EpisodeRecord, dream: EpisodeRecord) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """(step, real block, dream block, dream formula) in cm where the real policy first closed the gripper."""
    step = first_close(real)
    if step is None or step >= len(dream.states):
        return None
    previous = dream.states[max(step - 1, 0)]
    derived = relative_pose_from_poses(dream.states[step], previous, dream.task)
    return step, 100 * real.states[step, RELATIVE_POS], 100 * dream.states[step, RELATIVE_POS], 100 * derived[RELATIVE_POS]


def report(records: list[EpisodeRecord]) -> list[str]:
    lines = []
    for policy in sorted({r.policy for r in records}):
        for task in sorted({r.task for r in records if r.policy == policy}):
            dreams = {r.seed: r for r in select(records, policy=policy, task=task, env="dream")}
            reals = {r.seed: r for r in select(records, policy=policy, task=task, env="real")}
            if not dreams:
                continue
            gaps = np.concatenate([formula_gap_cm(r) for r in dreams.values()])
            lines.append(f"{policy} {task}: dream block vs formula on its poses: mean {gaps.mean():.2f} cm, "
                         f"p90 {np.percentile(gaps, 90):.2f} cm over {len(gaps)} dreamed steps")
            real_only = [s for s in sorted(reals) if s in dreams and reals[s].success and not dreams[s].success]
            heights = []
            for seed in real_only:
                found = at_grasp(reals[seed], dreams[seed])
                if found is None:
                    continue
                step, real, dream, derived = found
                heights.append((dream[2], derived[2]))
                lines.append(f"  real only, seed {seed}, real closes at step {step}: object-to-eef (cm) real "
                             f"{np.round(real, 1)}, dream's block {np.round(dream, 1)}, formula on the dream's poses "
                             f"{np.round(derived, 1)}")
            if heights:
                block_z, derived_z = np.abs(np.array(heights)).mean(axis=0)
                lines.append(f"  real only: {len(real_only)}; mean |height| at the real grasp: dream's block "
                             f"{block_z:.1f} cm, formula on the dream's poses {derived_z:.1f} cm")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run() -> None:
        records = read_episodes(args.results)
        if args.policy:
            records = select(records, policy=args.policy)
        print("\n".join(report(records)))

    run_cli(run)


if __name__ == "__main__":
    main()
