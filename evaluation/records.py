"""One finished episode (`EpisodeRecord`) and how records are stored in a results folder.

    episodes.jsonl       one JSON line per episode (no trajectories)
    trajectories.npz     states / actions / ensemble std / p_success per episode, keyed
                         "<policy>__<task>__<env>__<index>__<field>" (env "dream@<world model>" when several world models
                         dreamed the same starts); std and p_success only for dreams, p_success only from folders
                         written since the dream videos (older folders read back with p_success None)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

OPTIONAL_ARRAYS = ("std", "p_success")  # per-step arrays only some records have (dreams); absent keys read as None


def source_label(env: str, world_model: str) -> str:
    """Where episodes were played: "real", "dream", or "dream@<world model>" when several world models dreamed."""
    return f"{env}@{world_model}" if world_model else env


@dataclass
class EpisodeRecord:
    policy: str
    task: str
    env: str  # "dream" or "real"
    index: int  # position in its batch
    seed: int  # simulator seed of the initial state (dataset episode id for dataset starts)
    instruction: str
    success: bool
    episode_return: float  # real: sparse reward sum; dream: sum of p_success
    length: int  # executed steps
    error: str | None  # simulator / worker failure that ended the episode
    states: np.ndarray  # [length + 1, 83]: initial state, then the state after every step
    actions: np.ndarray  # [length, 7]
    std: np.ndarray | None = None  # [length + 1, 83] world-model ensemble spread (dreams)
    p_success: np.ndarray | None = None  # [length + 1] dreams: the success head after each step (0 at the start)
    success_step: int | None = None  # step (1-based) at which success was first reported
    world_model: str = ""  # which world model dreamed it, when several did ("" for real episodes or a single one)
    batch_seconds: float = float("nan")  # wall time of the whole batch of episodes it was played in

    @property
    def source(self) -> str:
        return source_label(self.env, self.world_model)

    @property
    def key(self) -> str:
        return f"{self.policy}__{self.task}__{self.source}__{self.index}"

    def to_json(self) -> dict:
        return {
            "policy": self.policy,
            "task": self.task,
            "env": self.env,
            **({"world_model": self.world_model} if self.world_model else {}),
            "episode": self.index,
            "seed": self.seed,
            "instruction": self.instruction,
            "success": bool(self.success),
            "return": float(self.episode_return),
            "length": int(self.length),
            "success_step": self.success_step,
            "error": self.error,
            "initial_state": [round(float(x), 6) for x in self.states[0]],
            "final_state": [round(float(x), 6) for x in self.states[-1]],
        }


def write_episodes(records: Iterable[EpisodeRecord], folder: Path) -> None:
    records = list(records)
    with open(folder / "episodes.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
    arrays: dict[str, np.ndarray] = {}
    for record in records:
        arrays[f"{record.key}__states"] = record.states.astype(np.float32)
        arrays[f"{record.key}__actions"] = record.actions.astype(np.float32)
        for name in OPTIONAL_ARRAYS:
            if getattr(record, name) is not None:
                arrays[f"{record.key}__{name}"] = getattr(record, name).astype(np.float32)
    np.savez_compressed(folder / "trajectories.npz", **arrays)


def read_episodes(folder: Path) -> list[EpisodeRecord]:
    """The records `write_episodes` stored in `folder` (batch wall times are not stored: NaN)."""
    lines_path, arrays_path = folder / "episodes.jsonl", folder / "trajectories.npz"
    for path in (lines_path, arrays_path):
        if not path.is_file():
            raise UserError(f"{path}: not found (expected a results folder written by vla-rollout)")
    records = []
    with np.load(arrays_path) as arrays, open(lines_path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                record = EpisodeRecord(
                    policy=row["policy"], task=row["task"], env=row["env"], index=row["episode"], seed=row["seed"],
                    instruction=row["instruction"], success=row["success"], episode_return=row["return"],
                    length=row["length"], error=row["error"], states=np.empty((0, 0)), actions=np.empty((0, 0)),
                    success_step=row["success_step"], world_model=row.get("world_model", ""),
                )
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{lines_path}:{number}: not an episode record ({type(err).__name__}: {err})") from None
            key = record.key
            if f"{key}__states" not in arrays:
                raise UserError(f"{arrays_path}: no arrays for episode {key!r} of {lines_path.name}")
            record.states, record.actions = arrays[f"{key}__states"], arrays[f"{key}__actions"]
            for name in OPTIONAL_ARRAYS:
                setattr(record, name, arrays[f"{key}__{name}"] if f"{key}__{name}" in arrays else None)
            records.append(record)
    return records


def select(records: Sequence[EpisodeRecord], **match: str) -> list[EpisodeRecord]:
    """Records whose attributes equal every given value, e.g. select(rs, task="lift", env="real")."""
    return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]
