"""Batched environments the one rollout loop runs in: the world model's dreams and real robosuite.

Both speak the same `Env` protocol over N episodes at once:

    result = env.reset(starts, instructions)        # result.states [N, 83]
    result = env.step(actions [N, 7], active [N])   # states, success, done, reward, std, errors

Episodes outside `active` are not advanced (their state is carried over); the rollout loop decides
when an episode ends (success, done, error or horizon), the env only reports.

* `DreamEnv`: the trained `WorldModel` imagines every step, all N dreams in one torch batch. success is the
  world model's success head thresholded, or with success_from="state" robosuite's own rule applied to the
  imagined state (`data_prep.tasks.success_from_state`); done is the done head thresholded; `std` is the
  ensemble spread; `reward` is p_success. The object-to-eef block is derived from the imagined poses with
  robosuite's formula (relative_from="poses", the default) or taken from the world model ("model").
* `RobosuiteEnv`: N real simulators built by `data_prep.sim.make_env`, spread over worker processes
  (`workers > 1`, one Pipe per worker) or stepped in this process (`workers == 1`). A simulator that
  raises, or a worker process that dies, marks its episodes as errors; the other episodes go on.
  It also runs the scripted expert next to each simulator (`expert_actions`), since the expert reads
  ground truth that only the simulator has, and optionally records MP4 videos. `observations` hands out each
  episode's robomimic observation dict (the keys robomimic-format HDF5 files store), for peers that read it
  (benchmarks/peers/).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import UserError
from common.policies import to_numpy
from data_prep.tasks import (
    ACTION_DIM,
    STATE_DIM,
    get_task,
    relative_pose_from_poses,
    state_from_obs,
    state_mask,
    success_from_state,
)

WORKER_REPLY_TIMEOUT_S = 600.0  # a worker silent this long is treated as crashed
# What makes a dream succeed: the world model's success head ("head", the default), or the simulator's rule on the
# imagined state ("state": a dreamed success is then one the dreamed trajectory shows). The head's success rates were
# the closer to reality, though it can fire on states that are not successes: long dreams are not precise enough for
# Square's 3 cm tolerance (docs/experiments/007).
DREAM_SUCCESS = ("head", "state")
# Where a dream's object-to-eef block comes from: robosuite's formula applied to the imagined eef and object poses
# ("poses", the default, `data_prep.tasks.relative_pose_from_poses`), so that what the policy reads about the object
# relative to its fingers agrees with where the dream put both; or the world model's own prediction ("model"), which
# could show the fingers beside the nut's handle while the poses put them at it (docs/experiments/037).
DREAM_RELATIVE = ("poses", "model")


@dataclass
class Start:
    """Where one episode begins: a simulator seed, and/or an 83-d state to dream from."""

    seed: int
    state: np.ndarray | None = None  # required by DreamEnv
    sim_state: np.ndarray | None = None  # MuJoCo flattened state; RobosuiteEnv restores it after the seeded reset


@dataclass
class StepResult:
    """What an env reports for all N episodes after a reset or a step."""

    states: np.ndarray  # [N, 83] float32
    success: np.ndarray  # [N] bool
    done: np.ndarray  # [N] bool
    reward: np.ndarray  # [N] float32
    errors: list[str | None]  # per episode; a non-None error ends that episode
    std: np.ndarray | None = None  # [N, 83] world-model ensemble spread (dreams only)

    @classmethod
    def empty(cls, n: int) -> StepResult:
        return cls(
            states=np.zeros((n, STATE_DIM), np.float32),
            success=np.zeros(n, bool),
            done=np.zeros(n, bool),
            reward=np.zeros(n, np.float32),
            errors=[None] * n,
        )


class Env(Protocol):
    kind: str  # "dream" or "real"
    task: str

    def reset(self, starts: Sequence[Start], instructions: Sequence[str]) -> StepResult: ...

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


def check_actions(actions: np.ndarray, n: int) -> np.ndarray:
    actions = np.asarray(actions, dtype=np.float32)
    if actions.shape != (n, ACTION_DIM):
        raise ValueError(f"actions must have shape ({n}, {ACTION_DIM}), got {actions.shape}")
    return actions


# ----------------------------------------------------------------------------------------------
# Dreams
# ----------------------------------------------------------------------------------------------


class DreamEnv:
    """N imagined episodes stepped by a trained `WorldModel` (raw units in and out)."""

    kind = "dream"

    def __init__(self, world_model: Any, task: str, success_threshold: float = 0.5, done_threshold: float = 0.5,
                 success_from: str = DREAM_SUCCESS[0], relative_from: str = DREAM_RELATIVE[0]):
        get_task(task)
        if success_from not in DREAM_SUCCESS:
            raise ValueError(f"success_from must be one of {DREAM_SUCCESS}, got {success_from!r}")
        if relative_from not in DREAM_RELATIVE:
            raise ValueError(f"relative_from must be one of {DREAM_RELATIVE}, got {relative_from!r}")
        if relative_from == "model" and getattr(world_model.config, "derive_relative_pose", False):
            raise ValueError("relative_from='model': this world model was trained with derive_relative_pose, so its own "
                             "object-to-eef block is untrained; use relative_from='poses'")
        self.success_from = success_from
        self.relative_from = relative_from
        self.world_model = world_model.eval()
        self.task = task
        self.success_threshold = success_threshold
        self.done_threshold = done_threshold
        self.state_mask = state_mask(task)
        self.states = np.zeros((0, STATE_DIM), np.float32)
        self.prev_states = self.states  # s_{t-1}, for world models that read velocities
        self.instructions: list[str] = []

    def reset(self, starts: Sequence[Start], instructions: Sequence[str]) -> StepResult:
        missing = [s.seed for s in starts if s.state is None]
        if missing:
            raise ValueError(f"DreamEnv needs a starting state for every episode (none for seeds {missing})")
        self.states = np.stack([np.asarray(s.state, np.float32).reshape(STATE_DIM) for s in starts])
        self.prev_states = self.states.copy()  # a reset starts at rest: zero velocity
        self.instructions = list(instructions)
        result = StepResult.empty(len(starts))
        result.states = self.states.copy()
        result.std = np.zeros_like(self.states)
        return result

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        import torch

        n = len(self.states)
        actions = check_actions(actions, n)
        result = StepResult.empty(n)
        result.states = self.states.copy()
        result.std = np.zeros_like(self.states)
        rows = np.flatnonzero(active)
        if len(rows):
            device = next(self.world_model.parameters()).device
            with torch.no_grad():
                mean, std, p_success, p_done = self.world_model.step(
                    torch.as_tensor(self.states[rows], device=device),
                    torch.as_tensor(actions[rows], device=device),
                    [self.instructions[i] for i in rows],
                    state_mask=torch.as_tensor(self.state_mask, device=device).expand(len(rows), -1),
                    prev_state=torch.as_tensor(self.prev_states[rows], device=device),
                )
            result.states[rows] = to_numpy(mean)
            if self.relative_from == "poses":
                result.states[rows] = relative_pose_from_poses(result.states[rows], self.states[rows], self.task)
            result.std[rows] = to_numpy(std)
            p_success = to_numpy(p_success).reshape(-1)
            result.reward[rows] = p_success
            if self.success_from == "head":
                result.success[rows] = p_success > self.success_threshold
            else:
                result.success[rows] = success_from_state(result.states[rows], self.task)
            result.done[rows] = to_numpy(p_done).reshape(-1) > self.done_threshold
        self.prev_states[rows] = self.states[rows]
        self.states = result.states.copy()
        return result

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Real simulators
# ----------------------------------------------------------------------------------------------


@dataclass
class VideoSpec:
    """Which real episodes to film and how (offscreen MuJoCo rendering; MUJOCO_GL=egl or osmesa)."""

    out_dir: Path
    episodes: int = 1  # film episodes 0 .. episodes-1 of each reset
    prefix: str = "rollout"
    camera: str = "agentview"
    size: int = 256
    fps: int = 20
    every: int = 1  # film every k-th step (and the last): shorter videos where rendering time is bounded (the Space)


@dataclass
class _Slot:
    """One episode's simulator inside a worker."""

    sim: Any  # data_prep.sim.SimEnv
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    expert: Any = None
    video: Any = None  # evaluation.video.VideoRecorder while filming


class Simulators:
    """The simulators one worker owns, keyed by episode index. Every method catches per episode."""

    def __init__(self, task: str, make_env: Callable[[str, int], Any], video: VideoSpec | None = None):
        self.task = task
        self.make_env = make_env
        self.video = video
        self.slots: dict[int, _Slot] = {}
        self.messages: list[str] = []  # non-fatal notes for the user (e.g. rendering unavailable)

    def _state(self, slot: _Slot) -> np.ndarray:
        return state_from_obs(slot.obs, self.task, source=f"robosuite {self.task} observation")[0]

    def reset(self, items: list[tuple[int, Start]]) -> list[tuple[int, np.ndarray | None, str | None]]:
        replies = []
        for index, start in items:
            try:
                slot = self.slots.get(index)
                if slot is None:
                    slot = self.slots[index] = _Slot(sim=self.make_env(self.task, start.seed))
                self._finish_video(slot)
                slot.obs = slot.sim.reset(start.seed)
                if start.sim_state is not None:
                    slot.obs = restore_sim_state(slot.sim.env, start.sim_state)
                slot.expert = None
                self._start_video(index, slot, start.seed)
                replies.append((index, self._state(slot), None))
            except Exception as err:  # noqa: BLE001 - any simulator failure becomes this episode's error
                replies.append((index, None, describe(err)))
        return replies

    def step(self, items: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray | None, bool, str | None]]:
        replies = []
        for index, action in items:
            slot = self.slots[index]
            try:
                slot.obs, _, _, _ = slot.sim.env.step(np.asarray(action, dtype=np.float64))
                success = slot.sim.success()
                self._film(slot)
                if success:
                    self._finish_video(slot)
                replies.append((index, self._state(slot), success, None))
            except Exception as err:  # noqa: BLE001
                self._finish_video(slot)
                replies.append((index, None, False, describe(err)))
        return replies

    def expert_actions(self, items: list[tuple[int, int]]) -> list[tuple[int, np.ndarray | None, str | None]]:
        from data_prep.tasks import make_expert

        replies = []
        for index, seed in items:
            slot = self.slots[index]
            try:
                if slot.expert is None:
                    slot.expert = make_expert(self.task, seed=seed)
                    slot.expert.reset(slot.sim.env)
                replies.append((index, np.asarray(slot.expert.act(slot.obs), np.float32), None))
            except Exception as err:  # noqa: BLE001
                replies.append((index, None, describe(err)))
        return replies

    def observations(self, items: list[tuple[int, None]]) -> list[tuple[int, dict[str, np.ndarray] | None, str | None]]:
        """Each episode's current observation in robomimic's keys (robot keys as robosuite gives them, `object` in
        robomimic's order), exactly what `vla-generate` stores in a robomimic-format HDF5 file for that step."""
        from data_prep.generate import observation_arrays

        replies = []
        for index, _ in items:
            try:
                replies.append((index, observation_arrays(self.slots[index].obs, self.task), None))
            except Exception as err:  # noqa: BLE001
                replies.append((index, None, describe(err)))
        return replies

    def finish(self) -> list[str]:
        """Close open videos; return (and forget) the notes gathered so far."""
        for slot in self.slots.values():
            self._finish_video(slot)
        messages, self.messages = self.messages, []
        return messages

    def close(self) -> None:
        self.finish()
        for slot in self.slots.values():
            try:
                slot.sim.env.close()
            except Exception:  # noqa: BLE001 - closing a broken simulator must not hide the results
                pass
        self.slots.clear()

    # ----- video --------------------------------------------------------------------------------
    def _start_video(self, index: int, slot: _Slot, seed: int) -> None:
        if self.video is None or index >= self.video.episodes:
            return
        from evaluation.video import RenderingUnavailable, VideoRecorder, video_path

        path = video_path(self.video.out_dir, self.video.prefix, self.task, seed)
        try:
            slot.video = VideoRecorder(slot.sim.env, path, self.video.camera, self.video.size, self.video.fps,
                                       self.video.every)
        except RenderingUnavailable as err:
            self.messages.append(f"video skipped: {err}")
            self.video = None
            slot.video = None

    def _film(self, slot: _Slot) -> None:
        if slot.video is not None:
            slot.video.capture()

    def _finish_video(self, slot: _Slot) -> None:
        if slot.video is not None:
            path = slot.video.close()
            self.messages.append(f"video written: {path.name}")
            slot.video = None


def restore_sim_state(env: Any, sim_state: np.ndarray) -> dict[str, np.ndarray]:
    """Put a reset robosuite env into a recorded MuJoCo state (robomimic `states`) and observe it."""
    env.sim.set_state_from_flattened(np.asarray(sim_state, dtype=np.float64))
    env.sim.forward()
    return env._get_observations(force_update=True)


def describe(err: BaseException) -> str:
    """One line naming the failure and where it happened (the last frame of the traceback)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {err}{where}".replace("\n", " ")


def _worker_main(conn: Any, task: str, make_env: Callable[[str, int], Any], video: VideoSpec | None) -> None:
    """A worker process: execute (method, args) requests on its Simulators until 'close'."""
    from data_prep.sim import quiet_robosuite

    quiet_robosuite()
    sims = Simulators(task, make_env, video)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if method == "close":
            sims.close()
            conn.send(None)
            break
        conn.send(getattr(sims, method)(*args))
    conn.close()


class RobosuiteEnv:
    """N real robosuite episodes of one task, in `workers` processes (or in-process for workers=1).

    Episode i lives in worker i % workers. Workers are forked, so `make_env` may be any callable.
    """

    kind = "real"

    def __init__(
        self,
        task: str,
        workers: int = 1,
        make_env: Callable[[str, int], Any] | None = None,
        video: VideoSpec | None = None,
    ):
        get_task(task)
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        if make_env is None:
            from data_prep.sim import make_env
        self.task = task
        self.workers = workers
        self.messages: list[str] = []
        self.starts: list[Start] = []
        self._n = 0
        self._states = np.zeros((0, STATE_DIM), np.float32)
        self._dead: set[int] = set()  # workers whose process died
        if workers == 1:
            self._local: Simulators | None = Simulators(task, make_env, video)
            self._procs: list[Any] = []
            self._conns: list[Any] = []
        else:
            self._local = None
            ctx = mp.get_context("fork")  # no pickling of make_env; workers only use numpy/MuJoCo
            self._conns, self._procs = [], []
            for _ in range(workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, task, make_env, video), daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)

    # ----- request fan-out --------------------------------------------------------------------
    def _call(self, method: str, items: list[tuple[int, Any]]) -> tuple[list[tuple], dict[int, str]]:
        """Send each item to the worker owning its episode; return all replies and per-episode crashes."""
        if self._local is not None:
            return getattr(self._local, method)(items), {}
        per_worker: dict[int, list] = {}
        for item in items:
            per_worker.setdefault(item[0] % self.workers, []).append(item)
        crashed: dict[int, str] = {}
        sent = []
        for w, batch in per_worker.items():
            if w in self._dead:
                crashed.update({i: f"simulator worker {w} died earlier" for i, _ in batch})
                continue
            try:
                self._conns[w].send((method, (batch,)))
                sent.append((w, batch))
            except (BrokenPipeError, OSError):
                self._mark_dead(w, batch, crashed)
        replies: list[tuple] = []
        for w, batch in sent:
            try:
                if not self._conns[w].poll(WORKER_REPLY_TIMEOUT_S):
                    raise TimeoutError
                replies.extend(self._conns[w].recv())
            except (EOFError, OSError, TimeoutError):
                self._mark_dead(w, batch, crashed)
        return replies, crashed

    def _mark_dead(self, w: int, batch: list, crashed: dict[int, str]) -> None:
        self._dead.add(w)
        proc = self._procs[w]
        proc.join(timeout=1)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        reason = f"simulator worker {w} crashed (exit code {proc.exitcode})"
        crashed.update({i: reason for i, _ in batch})

    # ----- Env protocol -------------------------------------------------------------------------
    def reset(self, starts: Sequence[Start], instructions: Sequence[str] = ()) -> StepResult:
        self.starts = list(starts)
        self._n = len(self.starts)
        result = StepResult.empty(self._n)
        replies, crashed = self._call("reset", list(enumerate(self.starts)))
        for index, state, error in replies:
            if state is not None:
                result.states[index] = state
            result.errors[index] = error
        for index, error in crashed.items():
            result.errors[index] = error
        self._states = result.states.copy()
        return result

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        actions = check_actions(actions, self._n)
        result = StepResult.empty(self._n)
        result.states = self._states.copy()
        rows = [int(i) for i in np.flatnonzero(active)]
        replies, crashed = self._call("step", [(i, actions[i]) for i in rows])
        for index, state, success, error in replies:
            if state is not None:
                result.states[index] = state
            result.success[index] = success
            result.errors[index] = error
        for index, error in crashed.items():
            result.errors[index] = error
        result.reward = result.success.astype(np.float32)  # robomimic's sparse reward
        self._states = result.states.copy()
        return result

    def expert_actions(self, active: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """The scripted expert's next action for every active episode (zeros + error where it failed)."""
        actions = np.zeros((self._n, ACTION_DIM), np.float32)
        errors: list[str | None] = [None] * self._n
        rows = [int(i) for i in np.flatnonzero(active)]
        replies, crashed = self._call("expert_actions", [(i, self.starts[i].seed) for i in rows])
        for index, action, error in replies:
            if action is not None:
                actions[index] = action
            errors[index] = error
        for index, error in crashed.items():
            errors[index] = error
        return actions, errors

    def observations(self, active: np.ndarray) -> tuple[list[dict[str, np.ndarray] | None], list[str | None]]:
        """The robomimic observation dict of every active episode (None + error where it failed)."""
        observations: list[dict[str, np.ndarray] | None] = [None] * self._n
        errors: list[str | None] = [None] * self._n
        replies, crashed = self._call("observations", [(int(i), None) for i in np.flatnonzero(active)])
        for index, obs, error in replies:
            observations[index], errors[index] = obs, error
        for index, error in crashed.items():
            errors[index] = error
        return observations, errors

    def finish(self) -> list[str]:
        """Finalise videos of the last batch; return notes from the workers (e.g. rendering unavailable)."""
        if self._local is not None:
            notes = self._local.finish()
        else:
            notes = []
            for w, conn in enumerate(self._conns):
                if w in self._dead:
                    continue
                try:
                    conn.send(("finish", ()))
                    notes.extend(conn.recv())
                except (EOFError, OSError):
                    self._dead.add(w)
        unique = list(dict.fromkeys(notes))
        self.messages.extend(unique)
        return unique

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
            return
        for w, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True)):
            if w not in self._dead:
                try:
                    conn.send(("close", ()))
                    conn.poll(30) and conn.recv()
                except (EOFError, OSError):
                    pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> RobosuiteEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
