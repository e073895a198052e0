"""Running a trained policy step by step: its action chunks become one action per control step.

Every policy answers `act(states [N, 83], instructions, active [N]) -> actions [N, 7]` once per
control step, after `reset(n)` at the start of a batch of episodes.

`ChunkPolicy` wraps anything with `predict_actions(state, instruction) -> [B, H, 7]` (`VLAPolicy`,
`MLPPolicy`) and turns chunks into one action per step, either
* "ensemble" (default, ACT's temporal ensembling): query every step; the action for step t is the
  average of every chunk's prediction for t, weighted exp(-decay * i) with i = 0 the oldest chunk, or
* "receding": query every `execute` steps and play the first `execute` actions of each chunk.
A model whose config has `velocity_input` also gets the previous step's states (`prev_state`; none
right after `reset`, i.e. at rest, as an episode's first row in training).

The scripted expert, which reads the simulator's ground truth, is `evaluation.expert_policy.ExpertPolicy`. These run
a trained policy wherever one drives: evaluation's roll-outs and `vla-generate`'s DAgger data and policy roll-outs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common.errors import UserError


class Policy:
    """Interface: `name`, `reset(n)`, `act(states, instructions, active)`; `errors` of the last act."""

    name: str = "policy"

    def reset(self, n: int) -> None:
        self.errors: list[str | None] = [None] * n

    def act(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class ChunkExecution:
    """How action chunks are turned into per-step actions."""

    mode: Literal["ensemble", "receding"] = "ensemble"
    execute: int = 1  # receding: steps played from each chunk before re-planning
    # ensemble: ACT's weight exp(-m * i), i = 0 for the oldest chunk. ACT's 0.01 stays: favouring the newest chunks
    # made the actions less smooth and the dreams drift (docs/experiments/027).
    decay: float = 0.01


class ChunkPolicy(Policy):
    """A trained model's action chunks executed with temporal ensembling or a receding horizon."""

    def __init__(self, model: Any, name: str = "model", execution: ChunkExecution | None = None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.name = name
        self.execution = execution or ChunkExecution()
        if self.execution.mode not in ("ensemble", "receding"):
            raise UserError(f"--chunk-mode must be 'ensemble' or 'receding', got {self.execution.mode!r}")
        if self.execution.execute < 1:
            raise UserError(f"--execute must be >= 1, got {self.execution.execute}")
        self.t = 0
        self.chunks: deque[tuple[int, np.ndarray]] = deque()
        self.reads_velocity = bool(getattr(getattr(model, "config", None), "velocity_input", False))
        self.prev_states: np.ndarray | None = None

    def reset(self, n: int) -> None:
        super().reset(n)
        self.t = 0
        self.chunks.clear()
        self.prev_states = None

    def predict(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        """Chunks [N, H, 7] for the active rows (zeros elsewhere: those episodes are over)."""
        import torch

        rows = np.flatnonzero(active)
        device = next(self.model.parameters()).device if hasattr(self.model, "parameters") else "cpu"
        extra = {}
        if self.reads_velocity and self.prev_states is not None:
            extra["prev_state"] = torch.as_tensor(self.prev_states[rows], dtype=torch.float32, device=device)
        with torch.no_grad():
            chunk = to_numpy(
                self.model.predict_actions(
                    torch.as_tensor(states[rows], dtype=torch.float32, device=device), [instructions[i] for i in rows],
                    **extra,
                )
            )
        width = getattr(getattr(self.model, "config", None), "action_dim", chunk.shape[-1])  # the model's own, if it says
        if chunk.ndim != 3 or chunk.shape[0] != len(rows) or chunk.shape[2] != width:
            raise ValueError(f"{self.name}.predict_actions returned shape {chunk.shape}, expected ({len(rows)}, H, {width})")
        full = np.zeros((len(states), chunk.shape[1], width), np.float32)
        full[rows] = chunk
        return full

    def act(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        try:
            return self._act(states, instructions, active)
        finally:
            self.prev_states = np.array(states, dtype=np.float32)  # every step, also those that reuse a chunk

    def _act(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        t, ex = self.t, self.execution
        self.t += 1
        if ex.mode == "receding":
            if not self.chunks or t - self.chunks[-1][0] >= min(ex.execute, self.chunks[-1][1].shape[1]):
                self.chunks.clear()
                self.chunks.append((t, self.predict(states, instructions, active)))
            t0, chunk = self.chunks[-1]
            return chunk[:, t - t0]
        chunk = self.predict(states, instructions, active)
        horizon = chunk.shape[1]
        self.chunks.append((t, chunk))
        while self.chunks and t - self.chunks[0][0] >= horizon:
            self.chunks.popleft()
        # Oldest first, as in ACT: the oldest prediction gets weight 1, newer ones exp(-decay * i).
        predictions = np.stack([c[:, t - t0] for t0, c in self.chunks])
        weights = np.exp(-ex.decay * np.arange(len(predictions), dtype=np.float32))
        return np.tensordot(weights / weights.sum(), predictions, axes=1).astype(np.float32)


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
