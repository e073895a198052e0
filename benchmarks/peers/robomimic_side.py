"""robomimic's side of the BC-RNN peer: runs with the robomimic virtualenv's Python, never with the project's.

    python robomimic_side.py train --hdf5 F --out DIR --epochs 2000 [--part-epochs 50] [--max-parts K]
    python robomimic_side.py serve --checkpoint DIR/models/model_epoch_50.pth      # the policy, over the pipe protocol
    python robomimic_side.py serve --replay --hdf5 F                             # replay mode: recorded actions

`train` builds robomimic 0.3.0's BC-RNN with the paper's low-dim settings by calling robomimic's own config functions
(`generate_paper_configs`: `modify_config_for_default_low_dim_exp`, `modify_bc_rnn_config_for_dataset` and the "ph"
part of `modify_config_for_dataset`: GMM with 5 modes, LSTM 2 x 400, sequence length 10, lr 1e-4, batch 100, epochs
of 100 steps with 10 validation steps on the file's `train`/`valid` masks, a checkpoint every 50 epochs), and trains
it with robomimic's own loop pieces (`TrainUtils.load_data_for_training`, `run_epoch`, `save_model`): robomimic's
`train()` would also do so, but cannot stop and resume. Rollouts during training are off: the project evaluates
the saved checkpoints in its own simulator (benchmarks/peers/robomimic_bc_rnn.py). Each part ends with
`resume.pth` (weights, optimizer and scheduler states, epoch; loaded with weights_only=True); the next call goes on
from it, re-seeding from (seed, epoch), so a run cut into parts follows the same schedule as one run.

`serve` plays one robomimic `RolloutPolicy` per episode (robomimic's own inference path: its observation
preparation, the RNN state reset every 10 steps, the GMM's low-noise mode). In replay mode it checks each
observation against the one recorded at that step and answers the recorded action.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import protocol_stdout, serve  # noqa: E402
from replay_server import ReplayServer, decode_observation  # noqa: E402

OBS_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]  # robomimic's low-dim default


def paper_config(hdf5: Path, epochs: int, seed: int, batch_size: int | None):
    """robomimic's BC-RNN config for low-dim PH data, set by robomimic's own paper-config functions."""
    from robomimic.config import config_factory
    from robomimic.scripts.generate_paper_configs import (
        modify_bc_rnn_config_for_dataset,
        modify_config_for_default_low_dim_exp,
    )

    config = config_factory("bc")
    config = modify_config_for_default_low_dim_exp(config)
    config = modify_bc_rnn_config_for_dataset(config, task_name="lift", dataset_type="ph", hdf5_type="low_dim")
    with config.values_unlocked():
        # what modify_config_for_dataset does for "ph" data (it also wants robomimic's download folder layout)
        config.experiment.validate = True
        config.train.hdf5_filter_key = "train"
        config.train.hdf5_validation_filter_key = "valid"
        config.train.data = str(hdf5)
        config.train.num_epochs = epochs
        config.train.seed = seed
        if batch_size is not None:
            config.train.batch_size = batch_size
        # The project evaluates checkpoints in its own simulator (same starts as its policies): no robomimic env.
        config.experiment.rollout.enabled = False
        config.experiment.logging.log_tb = False
        config.experiment.logging.terminal_output_to_txt = False
        config.experiment.name = "bc_rnn"
    config.lock()
    return config


def train(args: argparse.Namespace) -> None:
    import robomimic.utils.file_utils as FileUtils
    import robomimic.utils.obs_utils as ObsUtils
    import robomimic.utils.train_utils as TrainUtils
    import torch
    from robomimic.algo import algo_factory
    from torch.utils.data import DataLoader

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    config = paper_config(Path(args.hdf5).resolve(), args.epochs, args.seed, args.batch_size)
    (out / "config.json").write_text(config.dump())
    ObsUtils.initialize_obs_utils_with_config(config)
    env_meta = FileUtils.get_env_metadata_from_dataset(dataset_path=config.train.data)
    shape_meta = FileUtils.get_shape_metadata_from_dataset(config.train.data, all_obs_keys=config.all_obs_keys)
    model = algo_factory(config.algo_name, config, obs_key_shapes=shape_meta["all_shapes"],
                         ac_dim=shape_meta["ac_dim"], device=torch.device("cpu") if not torch.cuda.is_available()
                         else torch.device("cuda"))
    epoch = 0
    resume = out / "resume.pth"
    if resume.is_file():
        state = torch.load(resume, map_location=model.device, weights_only=True)
        model.deserialize(state["model"])
        for name, optimizer in model.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in model.lr_schedulers.items():
            if scheduler is not None:
                scheduler.load_state_dict(state["lr_schedulers"][name])
        epoch = int(state["epoch"])
    if epoch >= config.train.num_epochs:
        print(f"already trained {epoch} epochs of {config.train.num_epochs}", file=sys.stderr)
        return
    np.random.seed([args.seed, epoch])
    torch.manual_seed(args.seed * 1_000_003 + epoch)
    trainset, validset = TrainUtils.load_data_for_training(config, obs_keys=shape_meta["all_obs_keys"])
    loaders = []
    for dataset in (trainset, validset):  # as robomimic's train() builds them, except that a validation split
        sampler = dataset.get_dataset_sampler()  # smaller than one batch (tiny data) is not dropped whole
        loaders.append(DataLoader(dataset, sampler=sampler, batch_size=config.train.batch_size,
                                  shuffle=sampler is None, num_workers=0,
                                  drop_last=dataset is trainset or len(dataset) >= config.train.batch_size))
    loader, valid_loader = loaders
    part_end = min(config.train.num_epochs, epoch + args.part_epochs * args.max_parts)
    every = config.experiment.save.every_n_epochs if args.save_every is None else args.save_every
    log_path = out / "train_log.jsonl"
    kept = [line for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if json.loads(line)["epoch"] <= epoch]  # epochs after the last part boundary are trained again
    log_path.write_text("".join(line + "\n" for line in kept))
    log = open(log_path, "a")
    while epoch < part_end:
        epoch += 1
        start = time.perf_counter()
        train_log = TrainUtils.run_epoch(model, loader, epoch, num_steps=config.experiment.epoch_every_n_steps)
        model.on_epoch_end(epoch)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            valid_log = TrainUtils.run_epoch(model, valid_loader, epoch, validate=True,
                                             num_steps=config.experiment.validation_epoch_every_n_steps)
        record = {"epoch": epoch, "steps": epoch * config.experiment.epoch_every_n_steps, "train_seconds": seconds,
                  "loss": train_log.get("Loss"), "valid_loss": valid_log.get("Loss")}
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), file=sys.stderr)
        if epoch % every == 0 or epoch == config.train.num_epochs:
            TrainUtils.save_model(model, config, env_meta, shape_meta, str(out / "models" / f"model_epoch_{epoch}.pth"))
        if epoch % args.part_epochs == 0 or epoch == part_end:
            state = {
                "model": model.serialize(),
                "optimizers": {k: o.state_dict() for k, o in model.optimizers.items()},
                "lr_schedulers": {k: (s.state_dict() if s is not None else None) for k, s in model.lr_schedulers.items()},
                "epoch": epoch,
            }
            torch.save(state, out / "resume.pth.tmp")
            os.replace(out / "resume.pth.tmp", resume)
    log.close()


# ------------------------------------------------------------------------------------------------ serving


class PolicyServer:
    """One robomimic RolloutPolicy per episode."""

    def __init__(self, checkpoint: Path):
        import robomimic.utils.file_utils as FileUtils
        import torch

        torch.manual_seed(0)
        self.policy, ckpt = FileUtils.policy_from_checkpoint(ckpt_path=str(checkpoint), verbose=False)
        self.shapes = {k: tuple(v) for k, v in ckpt["shape_metadata"]["all_shapes"].items()}
        self.episodes: list = []

    def reset(self, request: dict) -> dict:
        self.episodes = [copy.deepcopy(self.policy) for _ in range(int(request["n"]))]
        for policy in self.episodes:
            policy.start_episode()
        return {"ok": True}

    def act(self, request: dict) -> dict:
        actions, errors = [], []
        for policy, obs in zip(self.episodes, request["obs"], strict=True):
            if obs is None:
                actions.append(None)
                errors.append(None)
                continue
            try:
                actions.append(np.asarray(policy(decode_observation(obs, self.shapes, np.float64)), dtype=np.float64).tolist())
                errors.append(None)
            except Exception as err:  # noqa: BLE001 - one episode's failure ends that episode only
                actions.append(None)
                errors.append(f"{type(err).__name__}: {err}")
        return {"actions": actions, "errors": errors}


def recorded_shapes(hdf5: Path) -> dict[str, tuple[int, ...]]:
    """Replay mode: the observation keys and shapes robomimic reads from the training file."""
    import robomimic.utils.file_utils as FileUtils
    import robomimic.utils.obs_utils as ObsUtils

    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": OBS_KEYS, "rgb": []}})
    meta = FileUtils.get_shape_metadata_from_dataset(str(hdf5), all_obs_keys=OBS_KEYS)
    return {k: tuple(v) for k, v in meta["all_shapes"].items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="robomimic_side.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--hdf5", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--epochs", type=int, default=2000, help="total epochs of 100 steps (paper: 2000 = 200k steps)")
    t.add_argument("--part-epochs", type=int, default=50, help="epochs per resumable part")
    t.add_argument("--max-parts", type=int, default=10**9, help="stop after this many parts (rerun to go on)")
    t.add_argument("--save-every", type=int, help="checkpoint every N epochs (default: robomimic's 50)")
    t.add_argument("--batch-size", type=int, help="default: the paper's 100")
    t.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("serve")
    s.add_argument("--checkpoint", type=Path)
    s.add_argument("--replay", action="store_true")
    s.add_argument("--hdf5", type=Path, help="replay mode: the training file (observation keys and shapes)")
    args = p.parse_args(argv)
    if args.command == "train":
        train(args)
        return
    replies = protocol_stdout()
    server = ReplayServer(recorded_shapes(args.hdf5), np.float64) if args.replay else PolicyServer(args.checkpoint)
    serve({"reset": server.reset, "act": server.act}, replies)


if __name__ == "__main__":
    main()
