"""One `vla-rollout` run: its plan, checked before the first roll-out (model folders, state layouts, tasks, --out), its
initial states, and playing every (task, env) of it. `evaluation/cli.py` is the command line around it; the
evaluation benchmark and the Space use it too.

Initial states: real episode i of a task starts from `make_env` reset with seed `--seed + i`; with
`--env both` each dream starts from its real twin's initial state (paired by seed). With
`--env dream`, dreams start from the first state of the held-out validation episodes of
`--dataset` when given, else from seeded simulator resets.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import check_output_dir, write_output_dir
from common.errors import UserError
from common.policies import ChunkExecution, ChunkPolicy, Policy
from common.saved_models import check_model_config, load_model, read_model_config
from data_prep.tasks import STATE_LAYOUT, get_task
from evaluation.envs import DreamEnv, RobosuiteEnv, Start, VideoSpec
from evaluation.expert_policy import ExpertPolicy
from evaluation.records import EpisodeRecord
from evaluation.rollout import rollout
from model_kinds import model_types

COMMAND = "vla-rollout"  # the name in the marker of the results folders it writes
EXPERT = "expert"


# --------------------------------------------------------------------------------------------------
# Checks before any rollout
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything decided and checked before the first rollout."""

    policy_name: str
    policy_dir: Path | None  # None = scripted expert
    world_model_dirs: list[Path]  # empty without dreams
    tasks: list[str]
    envs: list[str]  # in play order: "real" before "dream" (dreams may start from real states)


def make_plan(args: argparse.Namespace) -> Plan:
    tasks = list(dict.fromkeys(args.tasks))
    for task in tasks:
        get_task(task)
    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    if args.horizon is not None and args.horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {args.horizon}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.video_episodes < 0:
        raise UserError(f"--video-episodes must be >= 0, got {args.video_episodes}")
    if args.instruction is not None and not args.instruction.strip():
        raise UserError("--instruction: expected a non-empty instruction")
    envs = {"dream": ["dream"], "real": ["real"], "both": ["real", "dream"]}[args.env]
    expert = args.policy == EXPERT
    if expert and "dream" in envs:
        raise UserError("--policy expert reads the simulator's ground truth and runs only with --env real")
    policy_dir = None if expert else Path(args.policy)
    if policy_dir is not None:
        config = read_model_config(policy_dir, "--policy")
        check_model_config(config, policy_dir, "--policy", model_types("policy"), tasks, STATE_LAYOUT)
    world_model_dirs: list[Path] = []
    if "dream" in envs:
        if not args.world_model:
            raise UserError(f"--env {args.env} needs --world-model DIR (a saved WorldModel folder)")
        world_model_dirs = list(args.world_model)
        for world_model_dir in world_model_dirs:
            world_config = read_model_config(world_model_dir, "--world-model")
            if policy_dir is not None and world_config.get("state_layout") != config.get("state_layout"):
                raise UserError(
                    f"--world-model {world_model_dir}: state_layout {world_config.get('state_layout')!r} differs from "
                    f"--policy {policy_dir}: state_layout {config.get('state_layout')!r}; both must be trained on one dataset layout"
                )
            check_model_config(world_config, world_model_dir, "--world-model", model_types("world"), tasks,
                               STATE_LAYOUT)
        world_model_labels(world_model_dirs)  # distinct names, checked now rather than after the real rollouts
    if args.dataset is not None:
        from data_prep.preprocess import load_normalization

        load_normalization(args.dataset)  # exists and has our state layout
    name = args.name or (EXPERT if expert else policy_dir.resolve().name)
    plan = Plan(name, policy_dir, world_model_dirs, tasks, envs)
    check_output_dir(Path(args.out), COMMAND, args.overwrite, plan_inputs(args, plan))
    return plan


def plan_inputs(args: argparse.Namespace, plan: Plan) -> list[Path]:
    """The folders a run reads: --out may be none of them, nor hold or lie inside one."""
    return [*([plan.policy_dir] if plan.policy_dir else []), *plan.world_model_dirs,
            *([args.dataset] if args.dataset is not None else [])]


def world_model_labels(folders: list[Path]) -> list[str]:
    """Table labels of the dreaming world models: "" for a single one (plain "dream" rows), else each folder's run
    name (the parent of a trainer's `best/`), which must then be distinct."""
    if len(folders) < 2:
        return [""] * len(folders)
    labels = [(f.resolve().parent if f.resolve().name == "best" else f.resolve()).name for f in folders]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--world-model: several folders are named {repeated[0]!r}; give each world model its own run name")
    return labels


# --------------------------------------------------------------------------------------------------
# Initial states
# --------------------------------------------------------------------------------------------------


def seeded_starts(seed: int, episodes: int) -> list[Start]:
    return [Start(seed=seed + i) for i in range(episodes)]


def real_initial_states(task: str, starts: list[Start], workers: int) -> list[Start]:
    """Reset simulators with the starts' seeds and read their states (no step is played)."""
    with RobosuiteEnv(task, workers=workers) as env:
        result = env.reset(starts, [])
    bad = [(s.seed, e) for s, e in zip(starts, result.errors, strict=True) if e is not None]
    if bad:
        raise UserError(f"simulator reset failed for task {task!r} seed {bad[0][0]}: {bad[0][1]}")
    return [Start(seed=s.seed, state=state) for s, state in zip(starts, result.states, strict=True)]


def dataset_starts(dataset: Path, task: str, episodes: int) -> list[Start]:
    """First states of the held-out validation episodes of `task` (seed = dataset episode id)."""
    from data_prep.preprocess import load_vla_dataset

    split = load_vla_dataset(dataset)["validation"].select_columns(["task", "episode", "step", "state"])
    table = split.with_format("numpy")[:]
    rows = np.flatnonzero((table["task"] == task) & (table["step"] == 0))[:episodes]
    if len(rows) == 0:
        raise UserError(f"--dataset {dataset}: no validation episodes of task {task!r}")
    if len(rows) < episodes:
        print(f"note: --dataset {dataset} holds {len(rows)} held-out {task} episodes; dreaming {len(rows)}, not {episodes}")
    return [Start(seed=int(table["episode"][i]), state=np.asarray(table["state"][i], np.float32)) for i in rows]


def dream_starts(args: argparse.Namespace, task: str, real: list[EpisodeRecord] | None) -> list[Start]:
    if real is not None:
        return [Start(seed=r.seed, state=r.states[0]) for r in real if r.error is None]
    if args.dataset is not None:
        return dataset_starts(args.dataset, task, args.episodes)
    return real_initial_states(task, seeded_starts(args.seed, args.episodes), args.workers)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def play(args: argparse.Namespace, plan: Plan, folder: Path) -> tuple[list[EpisodeRecord], list[str]]:
    """Run every (task, env) of a checked plan; videos go under `folder`. Returns records and notes."""
    import torch

    torch.manual_seed(args.seed)
    model = load_model(plan.policy_dir, "--policy", args.device) if plan.policy_dir else None
    world_models = [load_model(folder, "--world-model", args.device) for folder in plan.world_model_dirs]
    labels = world_model_labels(plan.world_model_dirs)
    execution = ChunkExecution(args.chunk_mode, args.execute, args.ensemble_decay)
    records: list[EpisodeRecord] = []
    messages: list[str] = []
    films: list[Any] = []  # --video: dream videos, filmed once every real roll-out is done (film_dreams)
    for task in plan.tasks:
        horizon = args.horizon or get_task(task).horizon
        instruction = args.instruction or get_task(task).instruction
        real: list[EpisodeRecord] | None = None
        for kind in plan.envs:
            if kind == "real":
                video = VideoSpec(folder / "videos", args.video_episodes, plan.policy_name, args.video_camera) if args.video else None
                with RobosuiteEnv(task, workers=args.workers, video=video) as env:
                    policy: Policy = ExpertPolicy(env) if model is None else ChunkPolicy(model, plan.policy_name, execution)
                    starts = seeded_starts(args.seed, args.episodes)
                    real = rollout(env, policy, starts, [instruction] * len(starts), horizon, not args.no_progress)
                    messages += [f"{plan.policy_name} {task}: {m}" for m in env.finish()]
                records += real
            else:
                starts = dream_starts(args, task, real)
                if not starts:
                    messages.append(f"{plan.policy_name} {task}: no dreams (every real episode failed before its first state)")
                    continue
                for world_model, label in zip(world_models, labels, strict=True):
                    env = DreamEnv(world_model, task, args.success_threshold, args.done_threshold, args.dream_success,
                                   args.dream_relative)
                    policy = ChunkPolicy(model, plan.policy_name, execution)
                    dreams = rollout(env, policy, starts, [instruction] * len(starts), horizon, not args.no_progress)
                    for dream in dreams:
                        dream.world_model = label
                    records += dreams
                    if args.video:
                        films.append(film_job(args, plan, folder, dreams, real, label))
    return records, messages + film_dreams(films, plan.policy_name)


def film_job(args: argparse.Namespace, plan: Plan, folder: Path, dreams: list[EpisodeRecord],
             real: list[EpisodeRecord] | None, label: str) -> Any:
    """`--video`: the first --video-episodes dreams drawn in MuJoCo, beside their real twins' videos where filmed."""
    from evaluation.dream_video import FilmJob

    return FilmJob(dreams, folder / "videos", args.video_episodes, plan.policy_name if real else None, real or [],
                   args.video_camera, suffix=f"_{label}" if label else "")


def film_dreams(films: list[Any], policy_name: str) -> list[str]:
    """The dream videos, rendered in another process (evaluation.dream_video.film_apart); their notes."""
    if not films:
        return []
    from evaluation.dream_video import film_apart

    return [f"{policy_name} {job.dreams[0].task}: {note}" for job, notes in zip(films, film_apart(films), strict=True)
            for note in notes]


def write_results(out: Path, produce: Callable[[Path], str], command: str, overwrite: bool,
                  inputs: Sequence[Path] = ()) -> tuple[Path, str]:
    """Build a results folder in a temp dir with `produce(tmp) -> markdown`, then move it into place atomically
    (never over a folder that `command` did not write, common/atomic.py)."""
    return out, write_output_dir(out, command, overwrite, produce, inputs)


def settings_of(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value

    settings = {k: plain(v) for k, v in vars(args).items()}
    settings.update(policy_name=plan.policy_name, envs=plan.envs, state_layout=STATE_LAYOUT)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in settings.items()}


