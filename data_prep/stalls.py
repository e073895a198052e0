"""When a policy's gripper counts as stalled: shared by DAgger's stall handover (`vla-generate dagger --handover-on-stall`)
and the failure analysis of benchmarks/diagnostics/stalls.py.

A stall: the gripper has come down open next to the object and the policy keeps commanding a small move that contact
with the table or the object does not let happen (on Square, most failures: docs/experiments/022).
"""

from __future__ import annotations

import numpy as np

STALL_MOVE, STALL_WINDOW = 0.01, 20  # m per control steps: 0.5 mm a step, a tenth of a servo's approach speed
STALL_STEPS = 50  # control steps (2.5 s): shorter stops are pauses, e.g. waiting for the fingers to close


def stall_step(eef: np.ndarray, move: float = STALL_MOVE, window: int = STALL_WINDOW,
               min_steps: int = STALL_STEPS) -> int | None:
    """First step t of a whole episode's eef path [T, 3] from which the eef moves less than `move` in every
    `window` steps until the end, at least `min_steps` steps later."""
    if len(eef) <= window:
        return None
    moving = window_moves(eef, window) >= move  # moving[s]: from s to s + window
    last_moving = np.flatnonzero(moving)
    t = int(last_moving[-1]) + 1 if len(last_moving) else 0
    return t if len(eef) - 1 - t >= min_steps else None


def stalled_for(eef: list[np.ndarray] | np.ndarray, steps: int, move: float = STALL_MOVE,
                window: int = STALL_WINDOW) -> bool:
    """Online: has the eef path so far (oldest first) moved less than `move` in every `window` steps of its last
    `steps` steps? Needs window + steps positions."""
    if len(eef) < window + steps:
        return False
    return bool(np.all(window_moves(np.asarray(eef[-(window + steps):]), window) < move))


def window_moves(eef: np.ndarray, window: int) -> np.ndarray:
    """How far the eef gets in each `window` steps: [T - window], entry s from step s to s + window."""
    return np.linalg.norm(eef[window:] - eef[:-window], axis=1)
