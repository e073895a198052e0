"""The one rollout loop, for every (env, policy) pair: dreams or real robosuite; VLA, MLP or expert.

    records = rollout(env, policy, starts, instructions, horizon)

Each control step: the policy acts for the active episodes, the env steps them, and an episode
ends at its first success, a `done`, an error, or the horizon. A non-finite state (a dream that diverged, a NaN
start) or a non-finite action ends its episode as an error: nothing NaN reaches a policy or a simulator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from common.policies import Policy
from data_prep.tasks import ACTION_DIM, STATE_DIM
from evaluation.envs import Env, Start
from evaluation.records import EpisodeRecord


def rollout(
    env: Env,
    policy: Policy,
    starts: Sequence[Start],
    instructions: Sequence[str],
    horizon: int,
    progress: bool = True,
) -> list[EpisodeRecord]:
    """Play len(starts) episodes at once in `env` with `policy`; one record per episode, in order."""
    n = len(starts)
    if len(instructions) != n:
        raise ValueError(f"got {len(instructions)} instructions for {n} episodes")
    instructions = list(instructions)
    start_time = time.perf_counter()
    first = env.reset(starts, instructions)
    policy.reset(n)
    states = np.zeros((n, horizon + 1, STATE_DIM), np.float32)
    stds = np.zeros_like(states)
    p_success = np.zeros((n, horizon + 1), np.float32)  # dreams: the env's reward is the success head's probability
    actions = np.zeros((n, horizon, ACTION_DIM), np.float32)
    states[:, 0] = first.states
    errors = list(first.errors)
    active = np.array([e is None for e in errors])
    success = np.zeros(n, bool)
    success_step: list[int | None] = [None] * n
    returns = np.zeros(n, np.float64)
    lengths = np.zeros(n, int)
    bar = tqdm(total=horizon, desc=f"{policy.name} {env.task} {env.kind}", unit="step", disable=not progress, leave=False)
    for t in range(horizon):
        stop_where(active & ~np.isfinite(states[:, t]).all(1), f"non-finite state (NaN or inf) at step {t}", errors, active)
        if not active.any():
            break
        action = np.asarray(policy.act(states[:, t], instructions, active), np.float32)
        for i, error in enumerate(policy.errors):
            if error is not None and active[i]:
                errors[i], active[i] = f"policy: {error}", False
        # Checked before clipping, which would pass NaN on and turn inf into a full-range command.
        stop_where(active & ~np.isfinite(action).all(1), f"policy: non-finite action (NaN or inf) at step {t}", errors,
                   active)
        action = np.where(active[:, None], np.clip(action, -1.0, 1.0), 0.0).astype(np.float32)  # ended rows: not stepped
        result = env.step(action, active)
        actions[active, t] = action[active]
        states[:, t + 1] = result.states
        if result.std is not None:
            stds[:, t + 1] = result.std
        p_success[active, t + 1] = result.reward[active]
        returns[active] += result.reward[active]
        lengths[active] += 1
        for i in np.flatnonzero(active):
            if result.errors[i] is not None:
                errors[i] = result.errors[i]
            if result.success[i]:
                success[i], success_step[i] = True, t + 1
        ended = result.success | result.done | np.array([e is not None for e in errors])
        active &= ~ended
        bar.update()
        bar.set_postfix(running=int(active.sum()), success=int(success.sum()))
    bar.close()
    seconds = time.perf_counter() - start_time
    dream = env.kind == "dream"
    return [
        EpisodeRecord(
            policy=policy.name,
            task=env.task,
            env=env.kind,
            index=i,
            seed=starts[i].seed,
            instruction=instructions[i],
            success=bool(success[i]),
            episode_return=float(returns[i]),
            length=int(lengths[i]),
            error=errors[i],
            states=states[i, : lengths[i] + 1].copy(),
            actions=actions[i, : lengths[i]].copy(),
            std=stds[i, : lengths[i] + 1].copy() if dream else None,
            p_success=p_success[i, : lengths[i] + 1].copy() if dream else None,
            success_step=success_step[i],
            batch_seconds=seconds,
        )
        for i in range(n)
    ]


def stop_where(rows: np.ndarray, error: str, errors: list[str | None], active: np.ndarray) -> None:
    """End the episodes in `rows` with `error` (in place)."""
    for i in np.flatnonzero(rows):
        errors[i] = error
    active &= ~rows

