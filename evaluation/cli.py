"""`vla-rollout`: evaluate a policy in dreams (world model), in real robosuite, or both.

    vla-rollout --policy runs/vla --world-model runs/world --tasks lift can square --episodes 50 \
        --env both --out results/ --seed 0 --workers 2 [--instruction "custom text"] [--video]

`--policy expert` plays the scripted expert (real only: it reads simulator ground truth).
Initial states: real episode i of a task starts from `make_env` reset with seed `--seed + i`; with
`--env both` each dream starts from its real twin's initial state (paired by seed). With
`--env dream`, dreams start from the first state of the held-out validation episodes of
`--dataset` when given, else from seeded simulator resets. Every check (folders, state layouts,
tasks, --out) happens before the first rollout; the results folder appears atomically at the end. An existing --out
is replaced only with --overwrite, and only when vla-rollout wrote it (common/atomic.py).
`--world-model A B C` (e.g. one dream model trained with three seeds) dreams every start in each model; the
report then gives each model's dream - real gap and their mean and spread.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import check_output_dir, write_output_dir
from common.errors import UserError, first_line, run_cli
from data_prep.tasks import STATE_LAYOUT, TASKS, get_task
from evaluation.envs import DREAM_RELATIVE, DREAM_SUCCESS, DreamEnv, RobosuiteEnv, Start, VideoSpec
from evaluation.policies import ChunkExecution, ChunkPolicy, ExpertPolicy, Policy
from evaluation.records import EpisodeRecord, write_episodes
from evaluation.rollout import rollout

COMMAND = "vla-rollout"  # the name in the marker of the results folders it writes
EXPERT = "expert"
WORLD_MODEL_TYPE = "vla_world_model"
POLICY_TYPES = ("vla_policy", "vla_mlp_policy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="saved VLAPolicy / MLPPolicy folder, or 'expert'")
    p.add_argument("--world-model", type=Path, nargs="+",
                   help="saved WorldModel folder (needed for --env dream/both); several (e.g. training seeds) dream the "
                        "same starts one after the other, and the report adds the spread of their dream - real gaps")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"tasks to play (default: {' '.join(TASKS)})")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task and env")
    p.add_argument("--env", choices=("dream", "real", "both"), default="both")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder (appears atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by vla-rollout")
    # Far from vla-generate's seeds (attempt i uses seed i), so evaluation never replays a training start.
    p.add_argument("--seed", type=int, default=100_000, help="episode i starts from simulator seed seed+i")
    p.add_argument("--workers", type=int, default=2, help="simulator processes for real rollouts (1 = in-process)")
    p.add_argument("--instruction", help="custom instruction for every episode (default: the task's canonical one)")
    p.add_argument("--dataset", type=Path, help="vla-preprocess folder: --env dream starts from held-out episodes")
    p.add_argument("--horizon", type=int, help="max steps per episode (default: the task's horizon, 400)")
    p.add_argument("--name", help="policy label in tables/figures (default: the policy folder's name)")
    p.add_argument("--chunk-mode", choices=("ensemble", "receding"), default="ensemble",
                   help="action chunks: ACT temporal ensembling (default) or receding horizon")
    p.add_argument("--execute", type=int, default=1, help="receding horizon: actions played per chunk")
    p.add_argument("--ensemble-decay", type=float, default=ChunkExecution.decay,
                   help="temporal ensembling: weight exp(-m * i) of the i-th oldest chunk (< 0: newest weigh most)")
    p.add_argument("--dream-success", choices=DREAM_SUCCESS, default="head",
                   help="what makes a dream succeed: the world model's success head (p_success > --success-threshold,"
                        " default) or robosuite's success rule on the imagined state")
    p.add_argument("--dream-relative", choices=DREAM_RELATIVE, default=DREAM_RELATIVE[0],
                   help="the dream's object-to-eef pose: derived from the imagined eef and object poses with"
                        " robosuite's formula (default) or the world model's own prediction")
    p.add_argument("--success-threshold", type=float, default=0.5, help="dream success when p_success exceeds it")
    p.add_argument("--done-threshold", type=float, default=0.5, help="dream ends when p_done exceeds it")
    p.add_argument("--video", action="store_true", help="MP4 of real rollouts (offscreen MuJoCo; MUJOCO_GL=egl|osmesa)")
    p.add_argument("--video-episodes", type=int, default=2, help="filmed real episodes per task")
    p.add_argument("--video-camera", default="agentview", help="robosuite camera (agentview, frontview, birdview...)")
    p.add_argument("--device", default="cpu", help="torch device for the models")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Checks before any rollout
# --------------------------------------------------------------------------------------------------


def read_model_config(folder: Path, flag: str) -> dict[str, Any]:
    """config.json of a saved model folder, as a dict; one-line errors for missing or broken folders."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: folder not found")
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{flag} {path}: missing (expected a model folder written by save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: expected a JSON object")
    return config


def check_model_config(config: dict, folder: Path, flag: str, kinds: tuple[str, ...], tasks: list[str]) -> None:
    model_type = config.get("model_type")
    if model_type not in kinds:
        raise UserError(f"{flag} {folder}/config.json: model_type {model_type!r}, expected one of {list(kinds)}")
    layout = config.get("state_layout")
    if layout != STATE_LAYOUT:
        raise UserError(f"{flag} {folder}/config.json: state_layout {layout!r} does not match this code's {STATE_LAYOUT!r}")
    trained = config.get("tasks") or []
    unknown = [t for t in tasks if trained and t not in trained]
    if unknown:
        raise UserError(f"{flag} {folder}/config.json: tasks {trained} do not include {unknown}; pass --tasks from that list")


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
    if args.instruction is not None and not args.instruction.strip():
        raise UserError("--instruction: expected a non-empty instruction")
    envs = {"dream": ["dream"], "real": ["real"], "both": ["real", "dream"]}[args.env]
    expert = args.policy == EXPERT
    if expert and "dream" in envs:
        raise UserError("--policy expert reads the simulator's ground truth and runs only with --env real")
    policy_dir = None if expert else Path(args.policy)
    if policy_dir is not None:
        config = read_model_config(policy_dir, "--policy")
        check_model_config(config, policy_dir, "--policy", POLICY_TYPES, tasks)
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
            check_model_config(world_config, world_model_dir, "--world-model", (WORLD_MODEL_TYPE,), tasks)
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


def load_model(folder: Path, flag: str, device: str) -> Any:
    """AutoModel.from_pretrained(folder, trust_remote_code=True), offline, in eval mode on `device`.

    Weights that do not fit the folder's config are refused by the models' from_pretrained (modeling_vla.py)."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    except SafetensorError as err:
        raise UserError(f"{flag} {folder}: cannot read its weights, truncated or corrupt? ({first_line(err)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{flag} {folder}: cannot load the model ({type(err).__name__}: {first_line(err)})") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Initial states
# --------------------------------------------------------------------------------------------------


def seeded_starts(seed: int, episodes: int) -> list[Start]:
    return [Start(seed=seed + i) for i in range(episodes)]


def real_initial_states(task: str, starts: list[Start], workers: int) -> list[Start]:
    """Reset simulators with the starts' seeds and read their 29-d states (no step is played)."""
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
    if args.video and "real" not in plan.envs:
        messages.append("video skipped: videos are filmed from real rollouts (use --env real or both)")
    return records, messages


def write_results(out: Path, produce: Callable[[Path], str], command: str, overwrite: bool,
                  inputs: Sequence[Path] = ()) -> tuple[Path, str]:
    """Build a results folder in a temp dir with `produce(tmp) -> markdown`, then move it into place atomically
    (never over a folder that `command` did not write, common/atomic.py)."""
    return out, write_output_dir(out, command, overwrite, produce, inputs)


def evaluate(args: argparse.Namespace) -> Path:
    """Check everything, run every (task, env) of the plan, write the results folder; returns its path."""
    from evaluation.report import write_summary

    plan = make_plan(args)
    messages: list[str] = []

    def produce(tmp: Path) -> str:
        records, notes = play(args, plan, tmp)
        messages.extend(notes)
        write_episodes(records, tmp)
        return write_summary(records, tmp, settings_of(args, plan), messages)

    out, markdown = write_results(Path(args.out), produce, COMMAND, args.overwrite, plan_inputs(args, plan))
    print(markdown)
    for message in messages:
        print(message)
    print(f"wrote {out}")
    return out


def settings_of(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value

    settings = {k: plain(v) for k, v in vars(args).items()}
    settings.update(policy_name=plan.policy_name, envs=plan.envs, state_layout=STATE_LAYOUT)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in settings.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: evaluate(args))
