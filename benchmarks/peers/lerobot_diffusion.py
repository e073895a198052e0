"""LeRobot's Diffusion Policy (state-based) on the project's demos, evaluated on the project's starts.

    python benchmarks/peers/lerobot_diffusion.py all --data data/raw [--steps 200000] [--episodes 50]

or step by step (each resumable, each skipping what is done):

    python benchmarks/peers/lerobot_diffusion.py install                  # .venv-peers/lerobot
    python benchmarks/peers/lerobot_diffusion.py prepare --data data/raw   # vla-preprocess, then one LeRobot export per task
    python benchmarks/peers/lerobot_diffusion.py replay --data data/raw    # validates the adapter (>= 95 % of demos)
    python benchmarks/peers/lerobot_diffusion.py train [--steps 200000 --part-steps 20000 --max-parts K]
    python benchmarks/peers/lerobot_diffusion.py evaluate [--episodes 50 --select-episodes 50]

Version and shims: lerobot 0.4.4 (the newest for Python 3.11) installed with `--no-deps` beside torch 2.14.1 +
torchvision 0.29.1 (the pair on this machine's disk; lerobot 0.4.4 asks for torch < 2.11, whose PyPI wheels are
multi-GB CUDA downloads) and its other dependencies at lerobot's own pins, less those for hardware, video decoding
and logging (torchcodec, rerun-sdk, wandb, pynput, cmake): nothing here records or decodes video (lerobot falls
back to PyAV and says so) or logs to wandb. No lerobot code is patched; `lerobot_side.py train` only ends
`lerobot-train` after a part's checkpoint.

Data: the task's `vla-generate` file goes through `vla-preprocess` (the project's split) and
`vla-export --format lerobot --tasks <task> --splits train` (`action` = `expert_action`, the label the project's
policies learn; `observation.environment_state` = the object block). One model per task, LeRobot's
`--policy.type=diffusion` defaults (n_obs_steps 2, horizon 16, n_action_steps 8, U-Net 512/1024/2048, DDPM 100
steps, AdamW 1e-4 with cosine decay, the object block fed unnormalised as lerobot does for ENV features). Budget:
200k steps at batch 64 (LeRobot's diffusion_pusht recipe); a checkpoint every `--part-steps`, each part resumable.
Below that it is an under-trained run and its results say so. On 2 CPU cores this U-Net (~250M parameters) needs
several seconds per step: the real runs belong on a GPU (lerobot-train picks one where it exists).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from adapter import lerobot_recorded  # noqa: E402

from common.errors import UserError, run_cli  # noqa: E402

NAME = "lerobot"
COMMAND = "python benchmarks/peers/lerobot_diffusion.py"
SIDE = harness.PEERS_DIR / "lerobot_side.py"
RECIPE_STEPS = 200_000  # LeRobot's diffusion_pusht: 200k steps at batch 64
RECIPE_BATCH = 64
INSTALL = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["--no-deps", "lerobot==0.4.4"],
    ["datasets>=4.0.0,<5.0.0", "diffusers>=0.27.2,<0.36.0", "huggingface-hub>=0.34.2,<0.36.0",
     "accelerate>=1.10.0,<2.0.0", "setuptools>=71.0.0,<81.0.0", "einops>=0.8.0,<0.9.0",
     "opencv-python-headless>=4.9.0,<4.13.0", "av>=15.0.0,<16.0.0", "jsonlines>=4.0.0,<5.0.0", "packaging>=24.2,<26.0",
     "draccus==0.10.0", "gymnasium>=1.1.1,<2.0.0", "deepdiff>=7.0.1,<9.0.0", "imageio[ffmpeg]>=2.34.0,<3.0.0",
     "termcolor>=2.4.0,<4.0.0", "pyserial>=3.5,<4.0"],
]
VERSIONS = ("import json, torch, torchvision, lerobot, datasets, huggingface_hub, diffusers; "
            "import lerobot.scripts.lerobot_train, lerobot.policies.diffusion.modeling_diffusion; "
            "print(json.dumps({'lerobot': lerobot.__version__, 'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'datasets': datasets.__version__, "
            "'huggingface_hub': huggingface_hub.__version__, 'diffusers': diffusers.__version__}))")


def export_dir(args: argparse.Namespace, task: str) -> Path:
    return (args.out / "data" / f"lerobot_{task}").resolve()


def exports(args: argparse.Namespace) -> dict[str, Path]:
    found = {task: export_dir(args, task) for task in args.tasks}
    missing = [str(p) for p in found.values() if not (p / "meta" / "info.json").is_file()]
    if missing:
        raise UserError(f"{missing[0]}: not prepared; run `{COMMAND} prepare --data DIR` first")
    return found


def peer(args: argparse.Namespace, python: Path) -> harness.Peer:
    return harness.Peer("diffusion_policy", "lerobot",
                        lambda task, ckpt: [str(python), str(SIDE), "serve", "--checkpoint", str(ckpt)], args.threads)


# ------------------------------------------------------------------------------------------------ steps


def install(args: argparse.Namespace) -> None:
    harness.ensure_venv(NAME, INSTALL, VERSIONS)


def prepare(args: argparse.Namespace) -> None:
    from data_prep.preprocess import preprocess
    from hub_cards.export import export_lerobot

    files = harness.task_files(args.data, args.tasks)
    dataset = args.out / "data" / "hf_dataset"
    result = preprocess(list(files.values()), dataset, overwrite=True)
    print(f"{dataset}: {result.episodes}")
    for task in args.tasks:
        done = export_lerobot(dataset, f"local/dreaming-vla-{task}", export_dir(args, task), "expert_action", [task],
                              ["train"], overwrite=True)
        print(f"{task}: {done.folder} ({done.episodes} episodes, {done.frames} frames, action = expert_action)")


def replay(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    roots = exports(args)
    results = []
    for task, source in harness.task_files(args.data, args.tasks).items():
        command = [str(python), str(SIDE), "serve", "--replay", "--root", str(roots[task])]
        results.append(harness.validate_replay(peer(args, python), task, source, command, lerobot_recorded,
                                               args.out / "logs", args.workers, args.replay_demos, not args.no_progress))
    harness.replay_report("diffusion_policy", results, args.out)


def trained_steps(run: Path) -> int:
    step_file = run / "checkpoints" / "last" / "training_state" / "training_step.json"
    return int(json.loads(step_file.read_text())["step"]) if step_file.is_file() else 0


def lerobot_arguments(args: argparse.Namespace, task: str, root: Path, run: Path) -> list[str]:
    """A fresh `lerobot-train` run (later parts resume from its saved train_config.json)."""
    extra = []
    for item in args.set or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE (a lerobot-train option without its dashes)")
        extra.append(f"--{item}")
    return ["--policy.type=diffusion", f"--dataset.repo_id=local/dreaming-vla-{task}", f"--dataset.root={root}",
            f"--output_dir={run}", f"--steps={args.steps}", f"--batch_size={args.batch_size}",
            f"--save_freq={args.part_steps}", f"--log_freq={min(200, args.part_steps)}", "--num_workers=0",
            "--eval_freq=0", "--policy.push_to_hub=false", "--wandb.enable=false", f"--seed={args.train_seed}", *extra]


def train(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    for task, root in exports(args).items():
        run = (args.out / "train" / task).resolve()
        parts = 0
        while parts < args.max_parts:
            done = trained_steps(run)
            if done >= args.steps:
                break
            stop = min(args.steps, done - done % args.part_steps + args.part_steps)
            if done == 0:
                shutil.rmtree(run, ignore_errors=True)  # a first part that died before its checkpoint starts over
                lerobot_args = lerobot_arguments(args, task, root, run)
            else:
                config = run / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
                lerobot_args = [f"--config_path={config}", "--resume=true"]
            command = [python, SIDE, "train", "--stop-at", stop, "--", *lerobot_args]
            harness.run_part(command, args.out / "logs" / f"train_{task}.log", args.threads,
                             {"task": task, "from_step": done, "to_step": stop, "batch_size": args.batch_size},
                             run.parent / f"{task}_parts.jsonl")
            for old in (run / "checkpoints").iterdir():  # optimizer states of all but the last: ~2 GB each
                if old.name != "last" and old.resolve() != (run / "checkpoints" / "last").resolve():
                    shutil.rmtree(old / "training_state", ignore_errors=True)
            parts += 1
        print(f"{task}: {harness.training_time(run.parent / f'{task}_parts.jsonl')}")


def checkpoints(args: argparse.Namespace) -> dict[str, list[Path]]:
    found = {}
    for task in args.tasks:
        folder = args.out / "train" / task / "checkpoints"
        models = sorted((p / "pretrained_model" for p in folder.glob("[0-9]*") if (p / "pretrained_model").is_dir()),
                        key=lambda p: int(p.parent.name))
        if not models:
            raise UserError(f"{folder}: no checkpoints; run `{COMMAND} train` first")
        found[task] = models
    return found


def evaluate(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    found = checkpoints(args)
    extra = {"versions": harness.installed_versions(NAME), "recipe_steps": RECIPE_STEPS,
             "training": {t: harness.training_time(args.out / "train" / f"{t}_parts.jsonl") for t in args.tasks}}
    extra["under_trained"] = any(t["steps"] < RECIPE_STEPS for t in extra["training"].values())
    harness.evaluate(peer(args, python), found, args, harness.settings_of(args, "LeRobot Diffusion Policy", extra))


def all_steps(args: argparse.Namespace) -> None:
    for step in (install, prepare, replay, train, evaluate):
        step(args)


STEPS = {"install": install, "prepare": prepare, "replay": replay, "train": train, "evaluate": evaluate, "all": all_steps}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=STEPS)
    harness.common_arguments(p, "runs/peers/diffusion_policy")
    p.add_argument("--steps", type=int, default=RECIPE_STEPS, help="training budget in steps (default: LeRobot's "
                   "diffusion_pusht recipe, 200k; fixed at the first part: it sets the cosine schedule)")
    p.add_argument("--batch-size", type=int, default=RECIPE_BATCH)
    p.add_argument("--part-steps", type=int, default=20_000, help="steps per resumable part (= checkpoint interval)")
    p.add_argument("--max-parts", type=int, default=10**9, help="parts to run now (rerun to go on)")
    p.add_argument("--train-seed", type=int, default=1000, help="lerobot-train --seed (lerobot's default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra lerobot-train option for a fresh run, e.g. policy.down_dims=[64,128,256]")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        harness.check_counts(args, ("steps", "part_steps", "max_parts", "batch_size"))
        STEPS[args.step](args)

    run_cli(run)


if __name__ == "__main__":
    main()
