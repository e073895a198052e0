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

Last, every pair where dream and reality disagree (real only, dream only), phase by phase: the step where the policy
first closes the gripper, where the object is first lifted `LIFT_CM` above its resting height, where the gripper
opens again, and where the object ends, in reality and in the dream. The phase where the two part tells what the
world model got wrong: a grasp that never comes, a carry that ends elsewhere, a release that does not drop.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import run_cli
from data_prep.tasks import STATE_SLICES, relative_pose_from_poses
from evaluation.metrics import pair_by_seed
from evaluation.records import EpisodeRecord, read_episodes, select

RELATIVE_POS = STATE_SLICES["object-eef pos"]
GRIPPER_ACTION = 6  # > 0 closes the gripper
OBJECT_POS = STATE_SLICES["object pos"]
LIFT_CM = 3.0
SETTLE_STEPS = 10  # objects are placed a little above the table at reset and settle within these steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a vla-rollout --env both results folder")
    p.add_argument("--policy", help="policy name in the folder (default: every policy)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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


def twins(records: list[EpisodeRecord]) -> Iterator[tuple[str, str, list[EpisodeRecord], list[tuple[EpisodeRecord, EpisodeRecord]]]]:
    """(policy, task, its dreams, its (dream, real) pairs from the same start, by seed) for every policy and task."""
    for policy in sorted({r.policy for r in records}):
        for task in sorted({r.task for r in records if r.policy == policy}):
            dreams = select(records, policy=policy, task=task, env="dream")
            pairs = pair_by_seed(dreams, select(records, policy=policy, task=task, env="real"))
            yield policy, task, dreams, sorted(pairs, key=lambda pair: pair[0].seed)


def report(records: list[EpisodeRecord]) -> list[str]:
    lines = []
    for policy, task, dreams, pairs in twins(records):
        if not dreams:
            continue
        gaps = np.concatenate([formula_gap_cm(r) for r in dreams])
        lines.append(f"{policy} {task}: dream block vs formula on its poses: mean {gaps.mean():.2f} cm, "
                     f"p90 {np.percentile(gaps, 90):.2f} cm over {len(gaps)} dreamed steps")
        real_only = [(dream, real) for dream, real in pairs if real.success and not dream.success]
        heights = []
        for dream_record, real_record in real_only:
            found = at_grasp(real_record, dream_record)
            if found is None:
                continue
            step, real, dream, derived = found
            heights.append((dream[2], derived[2]))
            lines.append(f"  real only, seed {real_record.seed}, real closes at step {step}: object-to-eef (cm) real "
                         f"{np.round(real, 1)}, dream's block {np.round(dream, 1)}, formula on the dream's poses "
                         f"{np.round(derived, 1)}")
        if heights:
            block_z, derived_z = np.abs(np.array(heights)).mean(axis=0)
            lines.append(f"  real only: {len(real_only)}; mean |height| at the real grasp: dream's block "
                         f"{block_z:.1f} cm, formula on the dream's poses {derived_z:.1f} cm")
    return lines


@dataclass(frozen=True)
class Phases:
    close: int | None
    lift: int | None
    release: int | None
    end_object_cm: np.ndarray


def phases(record: EpisodeRecord) -> Phases:
    """When the policy closes, lifts and lets go, and where the object ends (cm)."""
    close = first_close(record)
    release = None
    if close is not None:
        opens = np.flatnonzero(record.actions[close:, GRIPPER_ACTION] < 0)
        release = int(opens[0]) + close if len(opens) else None
    height = record.states[:, OBJECT_POS][:, 2]
    resting = height[:SETTLE_STEPS].min()
    lifted = np.flatnonzero(height[SETTLE_STEPS:] > resting + LIFT_CM / 100)
    return Phases(close, int(lifted[0]) + SETTLE_STEPS if len(lifted) else None, release, 100 * record.states[-1, OBJECT_POS])


def disagreements(records: list[EpisodeRecord]) -> list[str]:
    """One line per disagreeing (real, dream) pair: each phase's step in reality / in the dream (- = never)."""
    def step(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = []
    for policy, task, _, pairs in twins(records):
        for dream_record, real_record in pairs:
            if dream_record.success == real_record.success:
                continue
            real, dream = phases(real_record), phases(dream_record)
            kind = "real only" if real_record.success else "dream only"
            lines.append(
                f"{policy} {task} {kind}, seed {real_record.seed} (real / dream): close {step(real.close)} / "
                f"{step(dream.close)}, lift {step(real.lift)} / {step(dream.lift)}, release "
                f"{step(real.release)} / {step(dream.release)}, end {len(real_record.states) - 1} / "
                f"{len(dream_record.states) - 1}; object ends at {np.round(real.end_object_cm, 1)} / "
                f"{np.round(dream.end_object_cm, 1)} cm")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run() -> None:
        records = read_episodes(args.results)
        if args.policy:
            records = select(records, policy=args.policy)
        print("\n".join(report(records) + disagreements(records)))

    run_cli(run)


if __name__ == "__main__":
    main()
