"""`vla-rollout`: evaluate a policy in dreams (world model), in real robosuite, or both.

    vla-rollout --policy runs/vla --world-model runs/world --tasks lift can square --episodes 50 \
        --env both --out results/ --seed 0 --workers 2 [--instruction "custom text"] [--video]

`--video` films the first --video-episodes episodes of each task: `<policy>_<task>_seed<seed>.mp4` (real),
`dream_<task>_seed<seed>.mp4` (the dream drawn in MuJoCo, with its ensemble spread) and, with `--env both`,
`side_by_side_<task>_seed<seed>.mp4` (dream | real), all under <out>/videos/.

`--policy expert` plays the scripted expert (real only: it reads simulator ground truth).
Initial states and the checks: evaluation/plan.py. Every check (folders, state layouts,
tasks, --out) happens before the first rollout; the results folder appears atomically at the end. An existing --out
is replaced only with --overwrite, and only when vla-rollout wrote it (common/atomic.py).
`--world-model A B C` (e.g. one dream model trained with three seeds) dreams every start in each model; the
report then gives each model's dream - real gap and their mean and spread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import run_cli
from common.policies import ChunkExecution
from data_prep.tasks import default_tasks, task_names
from evaluation.envs import DREAM_RELATIVE, DREAM_SUCCESS
from evaluation.plan import COMMAND, make_plan, plan_inputs, play, settings_of, write_results
from evaluation.records import write_episodes
from evaluation.report import write_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="saved VLAPolicy / MLPPolicy folder, or 'expert'")
    p.add_argument("--world-model", type=Path, nargs="+",
                   help="saved WorldModel folder (needed for --env dream/both); several (e.g. training seeds) dream the "
                        "same starts one after the other, and the report adds the spread of their dream - real gaps")
    tasks = default_tasks()
    p.add_argument("--tasks", nargs="+", default=tasks,
                   help=f"tasks to play (default: {' '.join(tasks)}; also {' '.join(sorted(set(task_names()) - set(tasks)))})")
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
    p.add_argument("--video", action="store_true",
                   help="MP4s (offscreen MuJoCo; MUJOCO_GL=egl|osmesa) of real rollouts, of dreams (the dreamed poses drawn"
                        " in MuJoCo) and of both side by side, under <out>/videos (evaluation/dream_video.py)")
    p.add_argument("--video-episodes", type=int, default=2, help="filmed episodes per task (real and dream)")
    p.add_argument("--video-camera", default="agentview", help="robosuite camera (agentview, frontview, birdview...)")
    p.add_argument("--device", default="cpu", help="torch device for the models")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def evaluate(args: argparse.Namespace) -> Path:
    """Check everything, run every (task, env) of the plan, write the results folder; returns its path."""
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: evaluate(args))


if __name__ == "__main__":
    main()
