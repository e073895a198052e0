"""How far a policy's gripper is turned from the object's nearest face when it comes down to grasp it.

    .venv/bin/python benchmarks/grasp_yaw.py results/benchmark_ftdagger --task lift

Reads a `vla-rollout --env real` results folder. For every real episode of the task, the *arrival* is the first step
at which the end effector is less than `ARRIVAL_HEIGHT` above the object's centre; the yaw error there is the
gripper's heading minus the object's, wrapped to the object's symmetry (`SYMMETRY`: a cube looks the same every 90
degrees; the expert grasps the square nut's handle across, which repeats every 180). The scripted expert turns to
within a degree of the face; a uniformly random turn would give a median of a quarter of the period (22.5 degrees
for the cube).

Per policy: the median and 90th percentile of the (absolute) yaw error, failures per error band, and the episodes that
*turned away*: whose error at the arrival is more than `TURNED_AWAY` above the error at the first step (the expert
always turns toward the nearest face, so never away). `--failures`
lists each failed episode: its yaw error, and where the gripper stayed from `SETTLE_STEPS` after the arrival on
(median height above the object's centre and horizontal distance from it; a fingertip resting on Lift's cube reads
~2.5 cm above and 3-6 cm off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from data_prep.tasks import STATE_SLICES
from evaluation.records import EpisodeRecord, read_episodes, select

ARRIVAL_HEIGHT = 0.02  # m above the object's centre: the fingers are around the object from here on
SYMMETRY = {"lift": np.pi / 2, "square": np.pi}  # yaw period of the face a gripper grasps
BANDS = (0.0, 15.0, 30.0, 90.0)  # degrees; the last band ends at the largest error a period allows
SETTLE_STEPS = 10  # after the arrival: where a failed episode's gripper stayed is read from here on
TURNED_AWAY = 5.0  # degrees: more than the wobble of a gripper holding its heading


def yaw_of_rot6(rot6: np.ndarray) -> np.ndarray:
    """Heading of a frame's x axis in the world xy-plane, from rot6 (R00 R10 R20 | R01 R11 R21)."""
    return np.arctan2(rot6[..., 1], rot6[..., 0])


def yaw_error(record: EpisodeRecord, t: int, period: float) -> float:
    """|gripper yaw - object yaw| in degrees at step t, wrapped to the period."""
    states = record.states
    turn = yaw_of_rot6(states[t, STATE_SLICES["eef rot"]]) - yaw_of_rot6(states[t, STATE_SLICES["object rot"]])
    return float(np.degrees(abs((turn + period / 2) % period - period / 2)))


def arrival_yaw_error(record: EpisodeRecord, period: float) -> float | None:
    """The yaw error at the arrival step; None if the gripper never arrives."""
    t = arrival_step(record)
    return None if t is None else yaw_error(record, t, period)


def turned_away(record: EpisodeRecord, period: float) -> bool:
    """Whether the gripper arrived more than TURNED_AWAY further from the nearest face than it started."""
    error = arrival_yaw_error(record, period)
    return error is not None and error > yaw_error(record, 0, period) + TURNED_AWAY


def arrival_step(record: EpisodeRecord) -> int | None:
    above = record.states[:, STATE_SLICES["eef pos"]][:, 2] - record.states[:, STATE_SLICES["object pos"]][:, 2]
    arrived = np.flatnonzero(above < ARRIVAL_HEIGHT)
    return int(arrived[0]) if arrived.size else None


def where_it_stayed(record: EpisodeRecord) -> tuple[float, float] | None:
    """Median height above the object's centre and horizontal distance from it (cm), from SETTLE_STEPS after the
    arrival to the end; None when the gripper never arrived or the episode ended before."""
    t = arrival_step(record)
    if t is None or t + SETTLE_STEPS >= len(record.states):
        return None
    offset = record.states[t + SETTLE_STEPS :, STATE_SLICES["eef pos"]] - record.states[t + SETTLE_STEPS :, STATE_SLICES["object pos"]]
    return float(np.median(offset[:, 2]) * 100), float(np.median(np.linalg.norm(offset[:, :2], axis=1)) * 100)


def yaw_table(records: list[EpisodeRecord], task: str) -> list[list[str]]:
    """One row per policy: episodes arrived, median / 90th percentile |yaw error|, failures / episodes per band and
    among those that turned away."""
    period = SYMMETRY[task]
    rows = []
    for policy in sorted({r.policy for r in records}):
        arrived = [(r, e) for r in select(records, policy=policy) if (e := arrival_yaw_error(r, period)) is not None]
        errors = np.array([e for _, e in arrived])
        row = [policy, f"{len(arrived)}/{len(select(records, policy=policy))}"]
        row += [f"{np.median(errors):.1f}", f"{np.percentile(errors, 90):.1f}"] if arrived else ["n/a", "n/a"]
        for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
            band = [r for r, e in arrived if low <= e < high]
            row.append(f"{sum(not r.success for r in band)} / {len(band)}")
        away = [r for r, _ in arrived if turned_away(r, period)]
        row.append(f"{sum(not r.success for r in away)} / {len(away)}")
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a vla-rollout --env real (or both) results folder")
    parser.add_argument("--task", choices=sorted(SYMMETRY), default="lift")
    parser.add_argument("--failures", action="store_true", help="also list every failed episode")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    records = [r for r in select(read_episodes(args.results), task=args.task, env="real") if r.error is None]
    if not records:
        raise UserError(f"{args.results}: no real {args.task} episodes (expected a vla-rollout --env real folder)")
    bands = [f"failed / episodes, {low:.0f}-{min(high, np.degrees(SYMMETRY[args.task]) / 2):.0f} deg"
             for low, high in zip(BANDS[:-1], BANDS[1:], strict=True)]
    header = ["policy", "arrived", "median yaw error (deg)", "90th percentile", *bands, "failed / turned away"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in yaw_table(records, args.task):
        print("| " + " | ".join(row) + " |")
    if args.failures:
        print("\n| policy | seed | yaw error (deg) | stayed: cm above the object | cm off to the side |\n|" + " --- |" * 5)
        for record in (r for r in records if not r.success):
            error, stayed = arrival_yaw_error(record, SYMMETRY[args.task]), where_it_stayed(record)
            values = [error, *(stayed or (None, None))]
            cells = [f"{v:.1f}" if v is not None else "n/a" for v in values]
            print(f"| {record.policy} | {record.seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run_cli(main)
