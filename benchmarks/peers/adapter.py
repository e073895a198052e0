"""A peer in the project's rollout loop: `PeerPolicy` (its observation dict in, its action out, over the pipe to
the peer's server) and the recorded demos its replay mode plays back.

    policy = PeerPolicy(server, "bc_rnn", observe)        # observe(states, active) -> (peer obs dicts, errors)
    records = rollout(env, policy, starts, instructions, horizon)        # evaluation/rollout.py, unchanged

Two observation builders: `robomimic_observer(env)` asks the real simulators for robomimic's obs dict (the keys a
robomimic-format HDF5 stores, quaternions as robosuite gives them) and `lerobot_observer` cuts our 83-d state into
LeRobot's `observation.state` / `observation.environment_state` with the export's own mapping. Replay mode
(`ReplayDemo`, `replay_payload`) sends each episode's recorded actions and recorded observations, built by the same
builders from the HDF5, so the same path is exercised as in evaluation.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
for path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:  # run as a plain script from anywhere
        sys.path.insert(0, str(path))

from protocol import PeerError, PeerServer  # noqa: E402

from common.errors import UserError  # noqa: E402
from common.policies import Policy  # noqa: E402
from data_prep.robomimic_io import read_robomimic_hdf5  # noqa: E402
from data_prep.tasks import ACTION_DIM, OBJECT_KEY, ROBOT_KEYS  # noqa: E402
from evaluation.envs import RobosuiteEnv, Start  # noqa: E402
from hub_cards.lerobot_format import lerobot_observation  # noqa: E402

Observation = dict[str, np.ndarray]
Observer = Callable[[np.ndarray, np.ndarray], tuple[list[Observation | None], list[str | None]]]
ROBOMIMIC_KEYS = (*ROBOT_KEYS, OBJECT_KEY)


def robomimic_observer(env: RobosuiteEnv) -> Observer:
    """robomimic's observation dicts, read from the real simulators (never rebuilt from our state: robosuite's
    quaternion signs, which the peer trained on, are not recoverable from it)."""

    def observe(states: np.ndarray, active: np.ndarray) -> tuple[list[Observation | None], list[str | None]]:
        return env.observations(active)

    return observe


def lerobot_observer(states: np.ndarray, active: np.ndarray) -> tuple[list[Observation | None], list[str | None]]:
    """LeRobot's observation dicts from our states (the mapping `vla-export --format lerobot` writes with)."""
    blocks = lerobot_observation(states)
    obs = [{k: v[i] for k, v in blocks.items()} if active[i] else None for i in range(len(states))]
    return obs, [None] * len(states)


def to_wire(obs: Observation | None) -> dict | None:
    return None if obs is None else {k: np.asarray(v, dtype=np.float64).tolist() for k, v in obs.items()}


class PeerPolicy(Policy):
    """The rollout loop's side of a peer: one request per control step for all active episodes.

    A failing server ends every active episode with its error; a missing or non-finite action ends that episode.
    Replay mode: `obs_error[i]` is the largest observation mismatch the server reported for episode i over the whole
    replay, `start_obs_error[i]` over its first `check_steps` steps (before the float32 rounding of the replayed
    actions, which the rollout loop applies to every policy, can make the contacts diverge)."""

    check_steps = 5

    def __init__(self, server: PeerServer, name: str, observe: Observer):
        self.server = server
        self.name = name
        self.observe = observe
        self.pending_replay: list[dict] | None = None
        self.obs_error = self.start_obs_error = np.zeros(0)
        self.t = 0

    def play_back(self, demos: Sequence[ReplayDemo], build: Callable[[ReplayDemo], Observation]) -> None:
        """Replay mode: the next reset sends these demos' actions and their observations as `build` makes them."""
        self.pending_replay = [{"actions": d.actions.astype(np.float64).tolist(),
                                "obs": {k: np.asarray(v, np.float64).tolist() for k, v in build(d).items()}}
                               for d in demos]

    def reset(self, n: int) -> None:
        super().reset(n)
        self.obs_error, self.start_obs_error, self.t = np.full(n, np.nan), np.full(n, np.nan), 0
        request: dict = {"op": "reset", "n": n}
        if self.pending_replay is not None:
            request["replay"], self.pending_replay = self.pending_replay, None
        self.server.request(request)

    def act(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        n = len(states)
        actions = np.zeros((n, ACTION_DIM), np.float32)
        obs, self.errors = self.observe(states, active)
        self.errors = list(self.errors)
        wire = [to_wire(o) if active[i] and self.errors[i] is None else None for i, o in enumerate(obs)]
        try:
            reply = self.server.request({"op": "act", "obs": wire})
        except PeerError as err:
            self.errors = [str(err) if a else None for a in active]
            return actions
        for i in np.flatnonzero(active):
            if self.errors[i] is not None:
                continue
            error, action = reply["errors"][i], reply["actions"][i]
            if error is None and action is None:
                error = "the peer answered no action"
            if error is None:
                action = np.asarray(action, dtype=np.float32)
                if action.shape != (ACTION_DIM,) or not np.isfinite(action).all():
                    error = f"the peer answered an action of shape {action.shape} that is not {ACTION_DIM} finite floats"
                else:
                    actions[i] = action
            self.errors[i] = error
            mismatch = (reply.get("obs_error") or [None] * n)[i]
            if mismatch is not None:
                self.obs_error[i] = np.fmax(self.obs_error[i], mismatch)
                if self.t < self.check_steps:
                    self.start_obs_error[i] = np.fmax(self.start_obs_error[i], mismatch)
        self.t += 1
        return actions


# ------------------------------------------------------------------------------------------------ replay


@dataclass
class ReplayDemo:
    """One recorded demo to play back: where it starts and what was executed and observed."""

    name: str
    start: Start  # the demo's seed: vla-generate's demo starts from the reset of its seed, reproduced bit for bit
    actions: np.ndarray  # [T, 7] as executed (not the expert's labels: they would not reproduce the trajectory)
    obs: dict[str, np.ndarray]  # robomimic keys, [T, ...]
    states: np.ndarray  # [T, 83] our state of each step


def replay_demos(hdf5: Path, limit: int | None = None) -> list[ReplayDemo]:
    """The demos of a `vla-generate` file (it records each demo's seed in `demo_seeds`; robomimic's own files do not,
    and their scene cannot be rebuilt from a seed, so they cannot be replayed here)."""
    source = read_robomimic_hdf5(hdf5)
    seeds = source.attrs.get("demo_seeds")
    seeds = json.loads(seeds) if isinstance(seeds, str) else seeds  # the writer stores lists as JSON
    if not isinstance(seeds, list) or len(seeds) != len(source.demo_names):
        raise UserError(f"{hdf5}: data.attrs['demo_seeds'] missing or not one per demo; replay needs a file written by "
                        "vla-generate (robomimic's published files record no seeds)")
    demos = []
    for name, seed in list(zip(source.demo_names, seeds, strict=True))[:limit]:
        episode = source.episode(name)
        state, _ = source.state(episode, "obs")
        # The seed alone, not the recorded MuJoCo state: restoring `states[0]` over the reset drops MuJoCo's
        # warm-start data and the replay then drifts by up to ~1e-3 (measured on Lift); from the seed it is exact,
        # so any observation mismatch is the plumbing's.
        demos.append(ReplayDemo(name, Start(seed=int(seed)), episode.actions, {k: episode.obs[k] for k in ROBOMIMIC_KEYS},
                                state))
    return demos


def robomimic_recorded(demo: ReplayDemo) -> Observation:
    return demo.obs


def lerobot_recorded(demo: ReplayDemo) -> Observation:
    return lerobot_observation(demo.states)
