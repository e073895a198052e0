"""robomimic's BC-RNN (paper low-dim settings) on the project's demos, evaluated on the project's starts.

    python benchmarks/peers/robomimic_bc_rnn.py all --data data/raw [--epochs 2000] [--episodes 50]

or step by step (each resumable, each skipping what is done):

    python benchmarks/peers/robomimic_bc_rnn.py install                 # .venv-peers/robomimic
    python benchmarks/peers/robomimic_bc_rnn.py prepare --data data/raw  # the files it trains on (labels below)
    python benchmarks/peers/robomimic_bc_rnn.py replay --data data/raw   # validates the adapter (>= 95 % of demos)
    python benchmarks/peers/robomimic_bc_rnn.py train [--epochs 2000 --part-epochs 50 --max-parts K]
    python benchmarks/peers/robomimic_bc_rnn.py evaluate [--episodes 50 --select-episodes 50]

Version and shims: robomimic 0.3.0 (pip, `--no-deps`) with torch 2.14.1 + torchvision 0.29.1 (the pair that lies on
this machine's disk; torchvision from PyPI does not import beside the project's CPU torch 2.13.0) and its light
dependencies. Training and evaluation never build robomimic's own environment (the project's simulator plays the
episodes), so neither `mujoco_py`, `egl_probe` nor robosuite is needed in its venv: no shim.

Data: one model per task, on that task's `vla-generate` file as it is except for one column: `actions` holds the
file's `expert_actions` (the scripted expert's noise-free labels, what the project's policies learn; the executed
actions stay as `executed_actions`). robomimic reads the file's own `train`/`valid` masks, the split `vla-preprocess`
uses. Budget: robomimic's paper setting, 2000 epochs of 100 steps (200k steps, batch 100), a checkpoint every 50
epochs; `--epochs` below that is an under-trained run and says so in its results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from adapter import robomimic_recorded  # noqa: E402

from common.errors import UserError, run_cli  # noqa: E402

NAME = "robomimic"
COMMAND = "python benchmarks/peers/robomimic_bc_rnn.py"
SIDE = harness.PEERS_DIR / "robomimic_side.py"
PAPER_EPOCHS = 2000  # 2000 epochs x 100 steps (robomimic generate_paper_configs, low-dim)
STEPS_PER_EPOCH = 100
BATCH_SIZE = 100
INSTALL = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["--no-deps", "robomimic==0.3.0"],
    ["h5py", "psutil", "tqdm", "termcolor", "tensorboard", "tensorboardX", "imageio", "matplotlib", "six"],
]
VERSIONS = ("import json, torch, torchvision, robomimic, numpy, h5py; "
            "import robomimic.utils.train_utils, robomimic.algo; "
            "print(json.dumps({'robomimic': robomimic.__version__, 'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'numpy': numpy.__version__, 'h5py': h5py.__version__}))")


def labelled_file(source: Path, target: Path) -> None:
    """A copy of `source` whose `actions` are its `expert_actions` (the executed ones kept as `executed_actions`)."""
    import h5py

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as f:
            for demo in f["data"].values():
                if "expert_actions" not in demo:
                    continue  # robomimic's own files: the executed actions are the labels
                demo.move("actions", "executed_actions")
                demo.create_dataset("actions", data=demo["expert_actions"][()])
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def prepared(args: argparse.Namespace) -> dict[str, Path]:
    files = {task: args.out / "data" / f"{task}.hdf5" for task in args.tasks}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: not prepared; run `{COMMAND} prepare --data DIR` first")
    return files


def peer(args: argparse.Namespace, python: Path) -> harness.Peer:
    return harness.Peer("bc_rnn", "robomimic", lambda task, ckpt: [str(python), str(SIDE), "serve", "--checkpoint", str(ckpt)],
                        args.threads)


# ------------------------------------------------------------------------------------------------ steps


def install(args: argparse.Namespace) -> None:
    harness.ensure_venv(NAME, INSTALL, VERSIONS)


def prepare(args: argparse.Namespace) -> None:
    for task, source in harness.task_files(args.data, args.tasks).items():
        target = args.out / "data" / f"{task}.hdf5"
        labelled_file(source, target)
        print(f"{task}: {source} -> {target} (actions = expert_actions)")


def replay(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    files = prepared(args)
    results = []
    for task, source in harness.task_files(args.data, args.tasks).items():
        command = [str(python), str(SIDE), "serve", "--replay", "--hdf5", str(files[task])]
        results.append(harness.validate_replay(peer(args, python), task, source, command, robomimic_recorded,
                                               args.out / "logs", args.workers, args.replay_demos, not args.no_progress))
    harness.replay_report("bc_rnn", results, args.out)


def train(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    for task, hdf5 in prepared(args).items():
        run = args.out / "train" / task
        log = run / "train_log.jsonl"
        parts = 0
        while parts < args.max_parts:
            done = json.loads(log.read_text().splitlines()[-1])["epoch"] if log.is_file() and log.read_text() else 0
            if done >= args.epochs:
                break
            command = [python, SIDE, "train", "--hdf5", hdf5, "--out", run, "--epochs", args.epochs,
                       "--part-epochs", args.part_epochs, "--max-parts", 1, "--seed", args.train_seed]
            if args.save_every:
                command += ["--save-every", args.save_every]
            end = min(args.epochs, done - done % args.part_epochs + args.part_epochs)
            harness.run_part(command, args.out / "logs" / f"train_{task}.log", args.threads,
                             {"task": task, "from_step": done * STEPS_PER_EPOCH, "to_step": end * STEPS_PER_EPOCH,
                              "batch_size": BATCH_SIZE}, run / "parts.jsonl")
            parts += 1
        print(f"{task}: {harness.training_time(run / 'parts.jsonl')}")


def checkpoints(args: argparse.Namespace) -> dict[str, list[Path]]:
    found = {}
    for task in args.tasks:
        models = sorted((args.out / "train" / task / "models").glob("model_epoch_*.pth"),
                        key=lambda p: int(p.stem.split("_")[-1]))
        if not models:
            raise UserError(f"{args.out / 'train' / task / 'models'}: no checkpoints; run `{COMMAND} train` first")
        found[task] = models
    return found


def evaluate(args: argparse.Namespace) -> None:
    python = harness.installed_python(NAME, COMMAND)
    found = checkpoints(args)
    extra = {"versions": harness.installed_versions(NAME), "paper_steps": PAPER_EPOCHS * STEPS_PER_EPOCH,
             "training": {t: harness.training_time(args.out / "train" / t / "parts.jsonl") for t in args.tasks}}
    extra["under_trained"] = any(t["steps"] < extra["paper_steps"] for t in extra["training"].values())
    harness.evaluate(peer(args, python), found, args, harness.settings_of(args, "robomimic BC-RNN", extra))


def all_steps(args: argparse.Namespace) -> None:
    for step in (install, prepare, replay, train, evaluate):
        step(args)


STEPS = {"install": install, "prepare": prepare, "replay": replay, "train": train, "evaluate": evaluate, "all": all_steps}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=STEPS)
    harness.common_arguments(p, "runs/peers/bc_rnn")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="training budget in epochs of 100 steps "
                   "(default: the paper's 2000 = 200k steps)")
    p.add_argument("--part-epochs", type=int, default=50, help="epochs per resumable part")
    p.add_argument("--max-parts", type=int, default=10**9, help="parts to run now (rerun to go on)")
    p.add_argument("--save-every", type=int, help="checkpoint every N epochs (default: robomimic's 50)")
    p.add_argument("--train-seed", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        harness.check_counts(args, ("epochs", "part_epochs", "max_parts", "save_every"))
        STEPS[args.step](args)

    run_cli(run)


if __name__ == "__main__":
    main()
