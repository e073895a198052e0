"""What both peer servers share: decoding an episode's observation from the pipe, and replay mode.

Replay mode validates an adapter: instead of a policy it answers the actions recorded in a demo, played from the
demo's recorded start, after checking the observation it was sent against the one recorded at that step (both
decoded by `decode_observation`, the policy's own path). Demos that then fail, or observations that differ,
would show a fault in the plumbing rather than in the peer. Runs in a peer's virtualenv: numpy and the standard
library only.
"""

from __future__ import annotations

import numpy as np


def decode_observation(obs: dict, shapes: dict[str, tuple[int, ...]], dtype: type = np.float32) -> dict[str, np.ndarray]:
    """One episode's observation from the pipe -> arrays with exactly the keys and shapes the policy reads."""
    decoded = {}
    for key, shape in shapes.items():
        if key not in obs:
            raise ValueError(f"observation lacks {key!r} (got {sorted(obs)})")
        value = np.asarray(obs[key], dtype=dtype)
        if value.shape != tuple(shape):
            raise ValueError(f"observation {key!r} has shape {value.shape}, expected {tuple(shape)}")
        decoded[key] = value
    return decoded


class ReplayServer:
    """Handlers for "reset" (with "replay": per episode {"actions": [T][7], "obs": {key: [T][...]}}) and "act"."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: type = np.float32):
        self.shapes = shapes
        self.dtype = dtype
        self.recorded: list[dict] = []
        self.t = 0

    def reset(self, request: dict) -> dict:
        self.recorded = request["replay"]
        if len(self.recorded) != int(request["n"]):
            raise ValueError(f"replay holds {len(self.recorded)} episodes for n={request['n']}")
        self.t = 0
        return {"ok": True}

    def act(self, request: dict) -> dict:
        actions, errors, obs_error = [], [], []
        for episode, obs in zip(self.recorded, request["obs"], strict=True):
            actions.append(None)
            errors.append(None)
            obs_error.append(None)
            if obs is None:
                continue
            if self.t >= len(episode["actions"]):
                errors[-1] = f"replay exhausted after {len(episode['actions'])} recorded steps"
                continue
            live = decode_observation(obs, self.shapes, self.dtype)
            recorded = decode_observation({k: v[self.t] for k, v in episode["obs"].items()}, self.shapes, self.dtype)
            obs_error[-1] = max(float(np.max(np.abs(live[k] - recorded[k]))) for k in self.shapes)
            actions[-1] = episode["actions"][self.t]
        self.t += 1
        return {"actions": actions, "errors": errors, "obs_error": obs_error}
