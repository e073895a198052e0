"""`vla-generate`: scripted-expert demonstrations (or "play" data) in robosuite, written as robomimic HDF5.

    vla-generate demos --tasks lift can square --episodes 50 --out data/raw --workers 2 --seed 0
    vla-generate play --tasks lift can square --episodes 100 --out data/raw_play --perturb-prob lift=0.06 can=0.02 square=0.01 --seed 50000
    vla-generate dagger --tasks square --episodes 100 --out data/raw_dagger --policy runs/mlp_demos_square/best --handover-steps 150 --max-attempts 600 --seed 60000
    vla-generate rollouts --tasks lift can square --episodes 100 --out data/raw_onpolicy --policy runs/mlp_demos/best --seed 70000

Four modes, each a subcommand with its own flags: `demos` (the expert's successes), `play` (the expert with
random-action bursts, every attempt kept), `dagger` (a policy drives, the expert finishes) and `rollouts` (a
policy's own whole episodes).

For each task, attempt i runs the expert from the initial state of seed `--seed + i` (the
expert's action noise uses the same seed), so a demo depends only on its seed, never on the
number of workers. Attempts run in seed order over a process pool (one simulator per worker);
failed attempts are dropped and more seeds are tried, up to `--max-attempts`, until
`--episodes` successful demos exist. The kept demos are the first successes in seed order.

An episode ends `--steps-after-success` steps after the first success (so the data shows what
success looks like) or at the task horizon; it is kept if the task is solved at its last step.
Output, one file per task, mirroring robomimic's `<task>/ph/low_dim_v15.hdf5` naming:

    <out>/<task>/low_dim_generated.hdf5

`--report results.json` records attempts, successes, success rate, episode lengths and timing
per task (the numbers in docs/RESULTS.md come from it).

Play data (`play`, for the world model, which must also see imperfect behaviour and failures):
`--perturb-prob P` starts, with probability P at each step, a burst of `--perturb-steps LO HI`
steps in which the expert's action is replaced by a random "wrong move": an arm action drawn
uniformly (scaled by `PERTURB_ARM_SCALE`) and a random open/close, both held for the burst
(a held move drifts 5-25 cm, as a policy's mistakes do; a fresh draw per step would average out
to jitter). Afterwards the expert takes over again and re-plans (it restarts when the object was
dropped). P may differ per task (`0.02 lift=0.05`): the longer and more precise the task, the
fewer bursts it takes to fail it; by default each task's registered `play_perturb_prob` (data_prep/tasks.py,
~30-60 % failures), the setting `vla-pipeline` uses. The recorded action is
the executed one; the bursts draw from their own generator seeded by the attempt seed, so the
expert's noise is exactly what it is without perturbations.
Play data keeps every attempt: `--episodes N` is N attempts per task, and a failed
episode runs to the horizon with `dones` all 0 (robomimic's done marks a successful end; a time
limit cannot be predicted from the state) and its per-step sparse rewards (0 unless the task was
solved on the way and lost again).

Labels: every episode stores, next to the executed `actions`, the expert's noise-free action at each
state (`expert_actions`), which is what the policies learn. In plain demos the two differ by the
expert's exploration noise; in play data the bursts' states get the expert's correction as label
(policies are not trained on play data: the expert's phase machine keeps going during a burst,
docs/experiments/008).

DAgger data (`dagger`; Ross et al., 2011, with the roll-in/roll-out split of AggreVaTe): `--policy DIR` lets a
trained policy drive the first 0..`--handover-steps` steps of each attempt (uniform, seeded by the
attempt seed), then the expert re-plans from wherever the policy left the robot (keeping an object
already grasped, else starting over) and finishes the task; only the expert's part is recorded, and,
as for demos, only when it succeeds. The next policy so learns from the states its predecessor
reaches, mistakes included, with labels that are always consistent: a scripted expert that merely
watched a policy drive would label from its own plan, not the policy's progress (docs/experiments/008).
Attempts in which the policy
solves the task before the handover are counted (`learner_solved_seeds`) and yield no episode.
With `--handover-on-stall` the policy instead drives until its gripper stalls (`data_prep.stalls`: it moved less
than 1 cm in every 20 steps for the last 20 steps) or for `--handover-steps` steps, whichever comes first, so the
expert's part starts where the policy gets stuck and shows the way out (lift, re-align, descend again).

Policy roll-outs (`rollouts`, world-model data, Dyna-style): `--policy DIR` lets the policy drive whole
episodes, records every step and keeps failures (`--episodes` counts attempts, as in play data), so a world
model sees the states and mistakes of policies like the ones it will dream with. The label (`expert_actions`) is the policy's own
action: this data is for world models, never for training a policy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError, run_cli
from data_prep.robomimic_io import TASK_ATTR, Episode, write_robomimic_hdf5
from data_prep.stalls import STALL_WINDOW, stalled_for
from data_prep.tasks import (
    OBJECT_KEY,
    STATE_LAYOUT,
    default_tasks,
    get_task,
    object_obs,
    state_from_obs,
    task_names,
    task_of_env,
)

OUTPUT_NAME = "low_dim_generated.hdf5"
# robomimic's low-dim observation keys: the robot ones are copied from robosuite's observation as they are;
# "object" is rebuilt in robomimic's order (robosuite's own "object-state" is ordered differently for Can/Square).
ROBOT_OBS_KEYS: tuple[str, ...] = (
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_gripper_qpos",
    "robot0_joint_pos",
    "robot0_joint_pos_cos",
    "robot0_joint_pos_sin",
    "robot0_joint_vel",
    "robot0_gripper_qvel",
)
OBS_KEYS: tuple[str, ...] = (*ROBOT_OBS_KEYS, OBJECT_KEY)
# Random burst actions: translation at the expert's typical (often saturated) scale; rotation half of it,
# as the expert's rotation actions are smaller (full-scale held twists mostly drive the wrist into its limits).
PERTURB_ARM_SCALE = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
PERTURB_STREAM = 1  # second entropy word of the bursts' generator: independent of the expert's (seeded by the seed alone)
DRIVER_STREAM = 2  # likewise for the length of a driving policy's roll-in
# --handover-on-stall: the expert takes over once the gripper has moved < 1 cm in every 20-step window of the last
# 20 steps (~2 s nearly still): past a grasp's pause, and the arm stands where it would stay (docs/experiments/026).
STALL_HANDOVER_STEPS = STALL_WINDOW


@dataclass(frozen=True)
class Perturbation:
    """Random "wrong move" bursts mixed into the expert's actions (play data); prob 0 = none."""

    prob: float = 0.0  # chance per step (outside a burst) that a burst starts
    min_steps: int = 5
    max_steps: int = 20


class Perturber:
    """Replaces the expert's action during bursts; one per attempt, seeded by the attempt seed."""

    def __init__(self, settings: Perturbation, seed: int):
        self.settings = settings
        self.rng = np.random.default_rng([seed, PERTURB_STREAM])
        self.steps_left = 0
        self.arm = np.zeros(6)
        self.gripper = 0.0
        self.bursts = 0

    def __call__(self, expert_action: np.ndarray) -> np.ndarray:
        if self.steps_left == 0 and self.rng.random() < self.settings.prob:
            self.steps_left = int(self.rng.integers(self.settings.min_steps, self.settings.max_steps + 1))
            self.gripper = float(self.rng.choice([-1.0, 1.0]))
            self.arm = PERTURB_ARM_SCALE * self.rng.uniform(-1.0, 1.0, 6)
            self.bursts += 1
        if self.steps_left == 0:
            return expert_action
        self.steps_left -= 1
        return np.concatenate([self.arm, [self.gripper]])


class LearnerDriver:
    """A trained policy that drives the first steps of an attempt (DAgger's roll-in), after which the expert
    re-plans from wherever the policy left the robot and finishes the task (the roll-out, which is recorded).

    The number of steps the policy drives is uniform in 0..`handover_steps`, drawn from a generator seeded by the
    attempt seed, so the recorded starts cover the whole of the policy's typical path, mistakes included. With
    `on_stall` it drives until its gripper stalls, or `handover_steps` steps.
    """

    def __init__(self, folder: str, task: str, handover_steps: int, on_stall: bool = False):
        from common.policies import ChunkPolicy
        from common.saved_models import load_model

        self.policy = ChunkPolicy(load_model(Path(folder), "--policy", "cpu"), name=Path(folder).name)
        self.task = task
        self.instruction = get_task(task).instruction
        self.handover_steps = handover_steps
        self.on_stall = on_stall

    def steps_for(self, seed: int) -> int:
        """How many steps the policy drives at most in the attempt of `seed`."""
        if self.on_stall:
            return self.handover_steps
        return int(np.random.default_rng([seed, DRIVER_STREAM]).integers(self.handover_steps + 1))

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The policy's action for one observation (call `reset()` at the start of an episode)."""
        state = state_from_obs(obs, self.task)[0][None]
        return np.asarray(self.policy.act(state, [self.instruction], np.ones(1, bool))[0], dtype=np.float64)

    def reset(self) -> None:
        """A new episode: forget the action chunks of the last one."""
        self.policy.reset(1)

    def roll_in(self, sim, obs: dict[str, np.ndarray], steps: int) -> tuple[dict[str, np.ndarray], bool, int]:
        """Let the policy drive `steps` steps from `obs` (fewer, with `on_stall`, once its gripper stalls); returns
        the last observation, whether it solved the task and the steps it drove."""
        self.reset()
        eef = [np.array(obs["robot0_eef_pos"], dtype=np.float64)]
        for step in range(1, steps + 1):
            obs, _, _, _ = sim.env.step(self.act(obs))
            if sim.success():
                return obs, True, step
            eef.append(np.array(obs["robot0_eef_pos"], dtype=np.float64))
            if self.on_stall and stalled_for(eef, STALL_HANDOVER_STEPS):
                return obs, False, step
        return obs, False, steps


@dataclass(frozen=True)
class RolloutSettings:
    """How one attempt is run (identical in every worker)."""

    task: str
    horizon: int
    steps_after_success: int = 10
    noise: float = 0.05
    perturbation: Perturbation = field(default_factory=Perturbation)
    keep_failures: bool = False
    policy: str | None = None  # saved policy folder that drives the first steps (DAgger data)
    handover_steps: int = 100  # with a policy: it drives a uniform 0..handover_steps steps before the expert
    handover_on_stall: bool = False  # with a policy: it drives until its gripper stalls, at most handover_steps
    policy_rollouts: bool = False  # with a policy: it drives whole episodes, all recorded, failures kept

    @property
    def play(self) -> bool:
        return self.keep_failures or self.perturbation.prob > 0

    @property
    def keeps_every_attempt(self) -> bool:
        """Failures are kept, so `episodes` counts attempts (play data, policy roll-outs)."""
        return self.keep_failures or self.policy_rollouts

    @property
    def dagger(self) -> bool:
        """A policy drives the first steps and the expert finishes (only the expert's part is recorded)."""
        return self.policy is not None and not self.policy_rollouts


@dataclass
class Attempt:
    seed: int
    success: bool
    length: int  # control steps run
    restarts: int  # times the expert started over (dropped object, stalled phase)
    episode: Episode | None  # only for kept attempts (successes; with keep_failures, all)
    bursts: int = 0  # perturbation bursts started
    handover: int = 0  # steps a driving policy played before the expert took over (not recorded)
    learner_solved: bool = False  # the driving policy solved the task before the handover: no episode


@dataclass
class TaskReport:
    task: str
    requested: int
    attempts: int
    successes: int
    success_rate: float
    kept_successes: int
    kept_failures: int  # > 0 only with keep_failures
    perturb_bursts: int  # random-action bursts started, over all attempts
    mean_length: float  # over kept episodes
    min_length: int
    max_length: int
    wall_seconds: float
    demos_per_minute: float
    kept_seeds: list[int] = field(default_factory=list)
    failed_seeds: list[int] = field(default_factory=list)
    learner_solved_seeds: list[int] = field(default_factory=list)  # DAgger: the policy finished before the handover
    handovers: list[int] = field(default_factory=list)  # DAgger: policy steps before each kept episode
    path: str = ""


def observation_arrays(obs: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    arrays = {key: np.array(obs[key], dtype=np.float64) for key in ROBOT_OBS_KEYS}
    arrays[OBJECT_KEY] = object_obs(obs, task).astype(np.float64)
    return arrays


def run_attempt(sim, expert, seed: int, settings: RolloutSettings, driver: LearnerDriver | None = None) -> Attempt:
    """Run the expert (with perturbation bursts, if any) from the initial state of `seed`, or, with a `driver`,
    from wherever the driving policy left the robot; record every expert step: the executed action and the
    expert's noise-free label. With `settings.policy_rollouts` the driver plays the whole episode instead and
    every step is recorded with its own action as the label."""
    obs = sim.reset(seed)
    expert.reset(sim.env, seed=seed)
    handover = 0
    if settings.policy_rollouts:
        driver.reset()
    elif driver is not None:
        obs, solved, handover = driver.roll_in(sim, obs, driver.steps_for(seed))
        if solved:  # nothing left for the expert to show from here
            return Attempt(seed=seed, success=False, length=0, restarts=0, episode=None, handover=handover,
                           learner_solved=True)
        expert.resume(obs)
    # No generator at all without perturbations, so that output is exactly the plain expert's.
    perturb = Perturber(settings.perturbation, seed) if settings.perturbation.prob > 0 else None
    record: dict[str, list] = {"obs": [], "next_obs": [], "actions": [], "expert_actions": [], "rewards": [], "states": []}
    first_success = None
    success = False
    for step in range(settings.horizon - handover):
        record["states"].append(np.array(sim.env.sim.get_state().flatten()))
        record["obs"].append(observation_arrays(obs, settings.task))
        if settings.policy_rollouts:
            action = driver.act(obs)
            record["expert_actions"].append(action.copy())
        else:
            # The expert acts every step, also during a burst, so that it notices a dropped object or a stalled
            # phase and its label is always the action it would take from here.
            action = expert.act(obs)
            record["expert_actions"].append(expert.clean_action.copy())
        if perturb is not None:
            action = perturb(action)
        obs, _, _, _ = sim.env.step(action)
        success = sim.success()
        record["actions"].append(np.asarray(action, dtype=np.float64))
        record["rewards"].append(float(success))
        record["next_obs"].append(observation_arrays(obs, settings.task))
        if success and first_success is None:
            first_success = step
        if first_success is not None and step >= first_success + settings.steps_after_success:
            break
    length = len(record["actions"])
    episode = None
    if success or settings.keeps_every_attempt:
        dones = np.zeros(length, dtype=np.int64)
        dones[-1] = int(success)
        episode = Episode(
            obs={key: np.stack([o[key] for o in record["obs"]]) for key in OBS_KEYS},
            next_obs={key: np.stack([o[key] for o in record["next_obs"]]) for key in OBS_KEYS},
            actions=np.stack(record["actions"]),
            expert_actions=np.stack(record["expert_actions"]),
            rewards=np.asarray(record["rewards"], dtype=np.float64),
            dones=dones,
            states=np.stack(record["states"]),
            model_file=sim.env.sim.model.get_xml(),
        )
    bursts = perturb.bursts if perturb is not None else 0
    return Attempt(seed=seed, success=success, length=length, restarts=expert.restarts, episode=episode, bursts=bursts,
                   handover=handover)


# ----- worker processes: one simulator and one expert each ------------------------------------------
_WORKER: dict = {}


def _init_worker(settings: RolloutSettings) -> None:
    from data_prep.sim import make_env
    from data_prep.tasks import make_expert

    _WORKER["settings"] = settings
    _WORKER["sim"] = make_env(settings.task)
    _WORKER["expert"] = make_expert(settings.task, noise=settings.noise)
    _WORKER["driver"] = None
    if settings.policy is not None:
        import torch

        torch.set_num_threads(1)  # one simulator and one policy per worker process
        _WORKER["driver"] = LearnerDriver(settings.policy, settings.task, settings.handover_steps,
                                          settings.handover_on_stall)


def _attempt_in_worker(seed: int) -> Attempt:
    return run_attempt(_WORKER["sim"], _WORKER["expert"], seed, _WORKER["settings"], _WORKER["driver"])


def attempts(settings: RolloutSettings, seeds: Iterator[int], workers: int) -> Iterator[Attempt]:
    """Attempts for `seeds`, yielded in seed order (workers > 1: a spawned process pool)."""
    if workers <= 1:
        _init_worker(settings)
        try:
            for seed in seeds:
                yield _attempt_in_worker(seed)
        finally:
            _WORKER["sim"].env.close()
            _WORKER.clear()
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_attempt_in_worker, seeds)


def generate_task(
    settings: RolloutSettings,
    episodes: int,
    seed: int = 0,
    max_attempts: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[Episode], TaskReport]:
    """The first `episodes` successful demos of seeds seed, seed+1, ... (at most `max_attempts` tried).

    With `settings.keep_failures`: exactly `episodes` attempts (seeds seed .. seed+episodes-1), all kept.
    """
    max_attempts = episodes if settings.keeps_every_attempt else max_attempts or 2 * episodes
    kept: list[Episode] = []
    kept_seeds: list[int] = []
    failed: list[int] = []
    learner_solved: list[int] = []
    handovers: list[int] = []
    successes = bursts = 0
    start = time.perf_counter()
    bar = tqdm(total=episodes, desc=f"{settings.task}", unit="episode" if settings.keeps_every_attempt else "demo",
               disable=not progress, dynamic_ncols=True)
    # closing(): stopping early must shut the pool down now, not whenever the generator is collected.
    with bar, closing(attempts(settings, iter(range(seed, seed + max_attempts)), workers)) as stream:
        for attempt in stream:
            successes += attempt.success
            bursts += attempt.bursts
            if attempt.episode is not None:
                kept.append(attempt.episode)
                kept_seeds.append(attempt.seed)
                handovers.append(attempt.handover)
            if attempt.learner_solved:
                learner_solved.append(attempt.seed)
            elif not attempt.success:
                failed.append(attempt.seed)
            bar.set_postfix(attempts=successes + len(failed), failed=len(failed), refresh=False)
            bar.update(int(attempt.episode is not None))
            if len(kept) == episodes:
                break
    wall = time.perf_counter() - start
    lengths = [len(e) for e in kept]
    tried = successes + len(failed)
    report = TaskReport(
        task=settings.task,
        requested=episodes,
        attempts=tried,
        successes=successes,
        success_rate=successes / tried if tried else 0.0,
        kept_successes=sum(int(e.dones[-1]) for e in kept),
        kept_failures=sum(1 - int(e.dones[-1]) for e in kept),
        perturb_bursts=bursts,
        mean_length=float(np.mean(lengths)) if lengths else 0.0,
        min_length=min(lengths, default=0),
        max_length=max(lengths, default=0),
        wall_seconds=wall,
        demos_per_minute=60.0 * len(kept) / wall if wall > 0 else 0.0,
        kept_seeds=kept_seeds,
        failed_seeds=failed,
        learner_solved_seeds=learner_solved,
        handovers=handovers if settings.dagger else [],
    )
    return kept, report


def write_task_file(path: Path, episodes: list[Episode], settings: RolloutSettings, report: TaskReport, seed: int) -> None:
    from data_prep.sim import env_args_for, standard_env_kwargs

    env_args = env_args_for(settings.task, standard_env_kwargs(settings.task))
    attrs = {
        "generator": "vla-generate (data_prep.experts scripted expert)",
        "expert_noise": settings.noise,
        "steps_after_success": settings.steps_after_success,
        "horizon": settings.horizon,
        "demo_seeds": report.kept_seeds,
    }
    if task_of_env(env_args["env_name"]) != settings.task:  # a task that shares its env: the file names it
        attrs[TASK_ATTR] = settings.task
    if settings.play:  # only then: plain expert files stay exactly as they were
        attrs |= {
            "keep_failures": settings.keep_failures,
            "failed_seeds": report.failed_seeds,
            "perturb_prob": settings.perturbation.prob,
            "perturb_steps": [settings.perturbation.min_steps, settings.perturbation.max_steps],
            "perturb_arm_scale": PERTURB_ARM_SCALE.tolist(),
        }
    if settings.policy_rollouts:  # the whole episode is the policy's: no expert, no handover
        attrs |= {"rollout_policy": str(settings.policy), "keep_failures": True, "failed_seeds": report.failed_seeds}
    elif settings.dagger:
        attrs |= {"driver_policy": str(settings.policy), "handover_steps": settings.handover_steps,
                  "handover_on_stall": settings.handover_on_stall,
                  "handovers": report.handovers}
    write_robomimic_hdf5(path, episodes, env_args, valid_fraction=0.1, seed=seed, attrs=attrs)


def write_report(path: Path, reports: list[TaskReport], args: argparse.Namespace, argv: list[str]) -> None:
    payload = {
        "command": "vla-generate " + " ".join(argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tasks": {r.task: asdict(r) for r in reports},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a report is meant to be read
    os.replace(tmp, path)


def summary_line(r: TaskReport) -> str:
    kept = f"kept {r.kept_successes + r.kept_failures} ({r.kept_successes} succeeded, {r.kept_failures} failed)  "
    if r.handovers or r.learner_solved_seeds:
        kept += f"policy solved it before the handover {len(r.learner_solved_seeds)}  "
    return (
        f"{r.task:7s} attempts {r.attempts:4d}  successes {r.successes:4d}  success rate {100 * r.success_rate:5.1f}%  "
        f"{kept}"
        f"mean length {r.mean_length:6.1f} (min {r.min_length}, max {r.max_length})  "
        f"{r.demos_per_minute:6.1f} demos/min  ({r.wall_seconds:.0f} s)"
    )


MODES = {  # subcommand -> what it makes
    "demos": "the scripted expert's successful demonstrations (failed attempts are dropped, more seeds tried)",
    "play": "play data for the world model: the expert with random-action bursts, every attempt kept",
    "dagger": "DAgger data: a saved policy drives the first steps, the expert finishes; successes kept",
    "rollouts": "a saved policy's own whole episodes, every step recorded, failures kept (world-model data)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-generate", description=__doc__.split("\n\n")[0])
    modes = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
    tasks = default_tasks()
    for mode, summary in MODES.items():
        sub = modes.add_parser(mode, help=summary, description=summary)
        every_attempt = mode in ("play", "rollouts")
        sub.add_argument("--tasks", nargs="+", default=tasks,
                         help=f"tasks to generate (default: {' '.join(tasks)}; any of {' '.join(task_names())})")
        sub.add_argument("--episodes", type=int, default=50,
                         help="attempts per task, all kept" if every_attempt else "successful episodes per task")
        sub.add_argument("--out", type=Path, default=Path("data/raw"), help=f"output root: <out>/<task>/{OUTPUT_NAME}")
        sub.add_argument("--workers", type=int, default=2, help="simulator processes (1 = in this process)")
        sub.add_argument("--seed", type=int, default=0, help="attempt i uses seed + i")
        if not every_attempt:
            sub.add_argument("--max-attempts", type=int, default=None,
                             help="attempts per task before giving up (default 2x episodes)")
        sub.add_argument("--horizon", type=int, default=None, help="max steps per episode (default: the task's horizon)")
        sub.add_argument("--steps-after-success", type=int, default=10, help="steps recorded after the first success")
        if mode != "rollouts":  # there the policy acts, not the expert
            sub.add_argument("--noise", type=float, default=0.05, help="std of Gaussian noise on the expert's arm actions")
        if mode == "play":
            sub.add_argument("--perturb-prob", nargs="+", default=None, metavar="P|TASK=P",
                             help="chance per step that a burst of random actions replaces the expert's: a bare P for "
                                  "every task, TASK=P for one (default: each task's registered play_perturb_prob)")
            sub.add_argument("--perturb-steps", type=int, nargs=2, default=[5, 20], metavar=("LO", "HI"),
                             help="a burst lasts a uniform random number of steps in [LO, HI]")
        if mode in ("dagger", "rollouts"):
            sub.add_argument("--policy", required=True, metavar="DIR",
                             help="saved policy folder (a model kind with role policy, e.g. runs/mlp/best)")
        if mode == "dagger":
            sub.add_argument("--handover-steps", type=int, default=100,
                             help="the policy drives a uniform random 0..N steps before the expert takes over")
            sub.add_argument("--handover-on-stall", action="store_true",
                             help="the policy drives until its gripper stalls (moves < 1 cm in every 20 steps for 20 "
                                  "steps) or --handover-steps steps, whichever comes first")
        sub.add_argument("--report", type=Path, default=None, help="write per-task statistics to this JSON file")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def perturb_probs(values: list[str] | None, tasks: list[str]) -> dict[str, float]:
    """`--perturb-prob` values -> probability per task: by default each task's registered `play_perturb_prob`; a bare
    number sets every task, TASK=P one task (tasks not being generated are ignored, so one setting can serve runs of
    any subset of tasks)."""
    default, per_task = None, {}
    for value in values or []:
        task, _, number = value.rpartition("=")
        try:
            prob = float(number)
        except ValueError:
            raise UserError(f"--perturb-prob {value!r}: expected a number P or TASK=P") from None
        if not 0.0 <= prob <= 1.0:
            raise UserError(f"--perturb-prob must be in [0, 1], got {value}")
        if task:
            get_task(task)
            per_task[task] = prob
        else:
            default = prob
    return {task: per_task.get(task, get_task(task).play_perturb_prob if default is None else default) for task in tasks}


def validate(args: argparse.Namespace) -> None:
    for task in args.tasks:
        get_task(task)
    for name in ("episodes", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    max_attempts = vars(args).get("max_attempts")
    if max_attempts is not None and max_attempts < args.episodes:
        raise UserError(f"--max-attempts ({max_attempts}) must be >= --episodes ({args.episodes})")
    if args.horizon is not None and args.horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {args.horizon}")
    if vars(args).get("noise", 0.0) < 0:
        raise UserError(f"--noise must be >= 0, got {args.noise}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    if args.mode == "play":
        perturb_probs(args.perturb_prob, args.tasks)
        low, high = args.perturb_steps
        if low < 1 or high < low:
            raise UserError(f"--perturb-steps LO HI must satisfy 1 <= LO <= HI, got {low} {high}")
    if args.mode == "dagger" and args.handover_steps < 0:
        raise UserError(f"--handover-steps must be >= 0, got {args.handover_steps}")
    if args.mode in ("dagger", "rollouts"):
        from common.saved_models import check_model_config, read_model_config
        from model_kinds import model_types

        folder = Path(args.policy)
        check_model_config(read_model_config(folder, "--policy"), folder, "--policy", model_types("policy"),
                           list(args.tasks), STATE_LAYOUT)


def rollout_settings(args: argparse.Namespace, task: str) -> RolloutSettings:
    """How each attempt of `task` runs in this mode."""
    run = {"task": task, "horizon": args.horizon or get_task(task).horizon, "steps_after_success": args.steps_after_success}
    if args.mode == "rollouts":
        return RolloutSettings(**run, policy=args.policy, policy_rollouts=True)
    run["noise"] = args.noise
    if args.mode == "play":
        prob = perturb_probs(args.perturb_prob, [task])[task]
        return RolloutSettings(**run, perturbation=Perturbation(prob, *args.perturb_steps), keep_failures=True)
    if args.mode == "dagger":
        return RolloutSettings(**run, policy=args.policy, handover_steps=args.handover_steps,
                               handover_on_stall=args.handover_on_stall)
    return RolloutSettings(**run)


def generate(argv: list[str] | None = None) -> list[TaskReport]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    validate(args)
    from data_prep.sim import quiet_robosuite

    quiet_robosuite()
    reports = []
    for task in dict.fromkeys(args.tasks):  # keep order, drop repeats
        settings = rollout_settings(args, task)
        episodes, report = generate_task(
            settings, args.episodes, args.seed, vars(args).get("max_attempts"), args.workers,
            progress=not args.no_progress,
        )
        if episodes:
            path = args.out / task / OUTPUT_NAME
            write_task_file(path, episodes, settings, report, args.seed)
            report.path = str(path)
        reports.append(report)
        print(summary_line(report) + (f"  -> {report.path}" if report.path else "  (nothing written)"))
    if args.report:
        write_report(args.report, reports, args, argv)
        print(f"report: {args.report}")
    short = [r for r in reports if r.kept_successes + r.kept_failures < r.requested]
    if short:
        names = ", ".join(f"{r.task} ({r.successes}/{r.requested})" for r in short)
        raise UserError(f"too few successful demos within --max-attempts for: {names}; raise --max-attempts")
    return reports


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: generate(argv))


if __name__ == "__main__":
    main()
