"""Numbers from rollouts: success rates with Wilson intervals, dream-vs-real agreement, trajectory error.

Episodes whose simulator failed (`error` set) are counted separately and left out of rates:
a crashed simulator says nothing about the policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.tasks import STATE_SLICES
from evaluation.records import EpisodeRecord, source_label

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
EEF_POS = STATE_SLICES["eef pos"]
OBJECT_POS = STATE_SLICES["object pos"]  # the object block starts with the object's position for every task


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there is no trial."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n (the formula leaves rounding noise there).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass
class SuccessSummary:
    """One row of the results table: one task in one env for one policy."""

    policy: str
    task: str
    env: str
    episodes: int  # without errors
    successes: int
    errors: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_return: float
    mean_length: float
    world_model: str = ""  # the dreaming world model's label when several dreamed the same starts
    wall_seconds: float = float("nan")  # the batch's wall time (policy + environment)
    steps_per_second: float = float("nan")  # executed env steps of all its episodes per wall-clock second

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def source(self) -> str:
        return source_label(self.env, self.world_model)


def summarize(records: Sequence[EpisodeRecord]) -> SuccessSummary:
    """Success rate (95% Wilson CI), mean return and length of records from one (policy, task, env)."""
    if not records:
        raise ValueError("summarize needs at least one episode record")
    ok = [r for r in records if r.error is None]
    successes = sum(r.success for r in ok)
    low, high = wilson_interval(successes, len(ok))
    seconds = records[0].batch_seconds
    return SuccessSummary(
        policy=records[0].policy,
        task=records[0].task,
        env=records[0].env,
        episodes=len(ok),
        successes=successes,
        errors=len(records) - len(ok),
        success_rate=successes / len(ok) if ok else float("nan"),
        ci_low=low,
        ci_high=high,
        mean_return=float(np.mean([r.episode_return for r in ok])) if ok else float("nan"),
        mean_length=float(np.mean([r.length for r in ok])) if ok else float("nan"),
        world_model=records[0].world_model,
        wall_seconds=seconds,
        steps_per_second=sum(r.length for r in records) / seconds if seconds > 0 else float("nan"),
    )


def pair_by_seed(dream: Sequence[EpisodeRecord], real: Sequence[EpisodeRecord]) -> list[tuple[EpisodeRecord, EpisodeRecord]]:
    """Dream and real episodes that started from the same initial state (same seed), both error-free."""
    real_by_seed = {r.seed: r for r in real if r.error is None}
    return [(d, real_by_seed[d.seed]) for d in dream if d.error is None and d.seed in real_by_seed]


@dataclass
class Agreement:
    """How often the dream predicts the real outcome, for episodes from the same initial state."""

    task: str
    pairs: int
    both_succeed: int
    both_fail: int
    dream_only: int  # dreamed success, real failure (the world model is too optimistic)
    real_only: int
    agreement_rate: float
    dream_success_rate: float
    real_success_rate: float
    success_gap: float  # dream - real
    eef_error: list[float]  # mean |eef_dream(t) - eef_real(t)| (m) for t = 0.., over pairs still running
    object_error: list[float]  # same for the object position
    error_support: list[int]  # number of pairs contributing at each t
    world_model: str = ""  # the dreaming world model's label when several dreamed the same starts

    def as_dict(self) -> dict:
        return asdict(self)

    def error_at(self, t: int, which: str = "eef") -> float:
        errors = self.eef_error if which == "eef" else self.object_error
        return errors[t] if t < len(errors) else float("nan")


def trajectory_error(
    pairs: Sequence[tuple[EpisodeRecord, EpisodeRecord]], part: slice
) -> tuple[np.ndarray, np.ndarray]:
    """Mean Euclidean distance of a 3-d state part between dream and real at each step, and its support."""
    if not pairs:
        return np.zeros(0), np.zeros(0, int)
    horizon = max(min(len(d.states), len(r.states)) for d, r in pairs)
    total, count = np.zeros(horizon), np.zeros(horizon, int)
    for dream, real in pairs:
        steps = min(len(dream.states), len(real.states))
        total[:steps] += np.linalg.norm(dream.states[:steps, part] - real.states[:steps, part], axis=-1)
        count[:steps] += 1
    return total / np.maximum(count, 1), count


def agreement(dream: Sequence[EpisodeRecord], real: Sequence[EpisodeRecord]) -> Agreement:
    pairs = pair_by_seed(dream, real)
    both = sum(d.success and r.success for d, r in pairs)
    neither = sum(not d.success and not r.success for d, r in pairs)
    dream_only = sum(d.success and not r.success for d, r in pairs)
    real_only = sum(r.success and not d.success for d, r in pairs)
    n = len(pairs)
    eef, support = trajectory_error(pairs, EEF_POS)
    obj, _ = trajectory_error(pairs, OBJECT_POS)
    rate = (lambda k: k / n) if n else (lambda k: float("nan"))
    return Agreement(
        task=(dream or real)[0].task if (dream or real) else "",
        pairs=n,
        both_succeed=both,
        both_fail=neither,
        dream_only=dream_only,
        real_only=real_only,
        agreement_rate=rate(both + neither),
        dream_success_rate=rate(both + dream_only),
        real_success_rate=rate(both + real_only),
        success_gap=rate(dream_only - real_only),
        eef_error=[float(x) for x in eef],
        object_error=[float(x) for x in obj],
        error_support=[int(x) for x in support],
        world_model=dream[0].world_model if dream else "",
    )


@dataclass
class DreamSpread:
    """Dream vs real for one (policy, task) over several world models (e.g. training seeds) that dreamed the same
    starts: one training run of a world model does not pin down a dreamed success rate, their spread does."""

    policy: str
    task: str
    world_models: list[str]
    real_success_rate: float
    dream_success_rates: list[float]
    gaps: list[float]  # dream - real, per world model
    agreement_rates: list[float]
    mean_gap: float
    sd_gap: float  # sample standard deviation over world models
    mean_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def dream_spread(policy: str, agreements: Sequence[Agreement]) -> DreamSpread:
    """Summary of several world models' agreements with the same real episodes of one (policy, task)."""
    if len(agreements) < 2:
        raise ValueError("dream_spread needs the agreements of at least two world models")
    gaps = np.array([a.success_gap for a in agreements])
    return DreamSpread(
        policy=policy,
        task=agreements[0].task,
        world_models=[a.world_model for a in agreements],
        real_success_rate=float(np.mean([a.real_success_rate for a in agreements])),
        dream_success_rates=[a.dream_success_rate for a in agreements],
        gaps=[float(g) for g in gaps],
        agreement_rates=[a.agreement_rate for a in agreements],
        mean_gap=float(gaps.mean()),
        sd_gap=float(gaps.std(ddof=1)),
        mean_agreement=float(np.mean([a.agreement_rate for a in agreements])),
    )
