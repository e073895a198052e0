"""LeRobot's side of the Diffusion Policy peer: runs with the lerobot virtualenv's Python, never with the project's.

    python lerobot_side.py check --root DIR --repo-id local/name            # load an export with LeRobotDataset
    python lerobot_side.py train --stop-at STEP -- <lerobot-train arguments>  # one resumable part of lerobot-train
    python lerobot_side.py serve --checkpoint DIR/checkpoints/010000/pretrained_model
    python lerobot_side.py serve --replay --root DIR                          # replay mode: recorded actions

`check` prints, as one JSON object, what lerobot's own `LeRobotDataset` reads from a `vla-export --format lerobot`
folder (tests/test_lerobot_export.py compares it with the source data). `train` runs lerobot's `lerobot-train`
unchanged and ends it once the checkpoint of step `--stop-at` is written (lerobot has no such flag; its cosine
schedule is set by the total `--steps`, so a budget cut into parts must keep `--steps` and stop early); the next part
is `lerobot-train --config_path=.../checkpoints/last/pretrained_model/train_config.json --resume=true`. `serve` runs
a trained policy the way `lerobot-eval` does (its saved pre/post-processors around `select_action`), all episodes in
one batch; in replay mode it checks each observation against the one recorded and answers the recorded action.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import protocol_stdout, serve  # noqa: E402
from replay_server import ReplayServer, decode_observation  # noqa: E402

OBS_KEYS = ("observation.state", "observation.environment_state")


def check(args: argparse.Namespace) -> None:
    """What lerobot reads from an export: metadata, and frames with an action chunk (delta timestamps)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    fps_step = 1.0 / 20
    dataset = LeRobotDataset(args.repo_id, root=args.root, delta_timestamps={"action": [k * fps_step for k in range(4)]})
    meta = dataset.meta
    items = []
    for index in args.items:
        item = dataset[index]
        items.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in item.items()})
    summary = {
        "codebase_version": meta.info["codebase_version"],
        "fps": dataset.fps,
        "num_episodes": dataset.num_episodes,
        "num_frames": dataset.num_frames,
        "features": {k: list(v["shape"]) for k, v in meta.features.items()},
        "tasks": list(meta.tasks.index),
        "episodes": [{"from": int(e["dataset_from_index"]), "to": int(e["dataset_to_index"]), "tasks": list(e["tasks"])}
                     for e in meta.episodes],
        "stats_keys": sorted(meta.stats),
        "action_mean": np.asarray(meta.stats["action"]["mean"]).tolist(),
        "items": items,
    }
    print(json.dumps(summary))


class PartDone(Exception):
    """Raised after the checkpoint that ends this part has been written."""


def train(args: argparse.Namespace, lerobot_args: list[str]) -> None:
    import lerobot.scripts.lerobot_train as lerobot_train

    written = lerobot_train.update_last_checkpoint

    def stop_after(checkpoint_dir: Path) -> Path:
        result = written(checkpoint_dir)
        if int(Path(checkpoint_dir).name) >= args.stop_at:
            raise PartDone
        return result

    lerobot_train.update_last_checkpoint = stop_after
    sys.argv = ["lerobot-train", *lerobot_args]
    try:
        lerobot_train.main()
    except PartDone:
        print(f"part done: checkpoint of step {args.stop_at} written", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ serving


class PolicyServer:
    """A trained Diffusion Policy with its saved processors; episodes batched (an ended one repeats its last obs)."""

    def __init__(self, checkpoint: Path, seed: int):
        import torch
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
        from lerobot.policies.factory import make_pre_post_processors

        torch.manual_seed(seed)
        self.torch = torch
        self.policy = DiffusionPolicy.from_pretrained(str(checkpoint)).eval()
        self.preprocess, self.postprocess = make_pre_post_processors(
            self.policy.config, pretrained_path=str(checkpoint),
            preprocessor_overrides={"device_processor": {"device": str(self.policy.config.device)}},
        )
        self.shapes = {k: tuple(f.shape) for k, f in self.policy.config.input_features.items()}
        self.last: list[dict[str, np.ndarray] | None] = []

    def reset(self, request: dict) -> dict:
        self.policy.reset()
        self.last = [None] * int(request["n"])
        return {"ok": True}

    def act(self, request: dict) -> dict:
        for i, obs in enumerate(request["obs"]):
            if obs is not None:
                self.last[i] = decode_observation(obs, self.shapes, np.float32)
        filler = next(o for o in self.last if o is not None)
        rows = [o if o is not None else filler for o in self.last]  # not yet seen: any row keeps the batch whole
        batch = {k: self.torch.as_tensor(np.stack([r[k] for r in rows])) for k in self.shapes}
        with self.torch.no_grad():
            action = self.postprocess(self.policy.select_action(self.preprocess(batch)))
        action = action.detach().cpu().numpy().astype(np.float64)
        actions = [action[i].tolist() if obs is not None else None for i, obs in enumerate(request["obs"])]
        return {"actions": actions, "errors": [None] * len(actions)}


def recorded_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """Replay mode: the observation shapes of the export the policy trains on, read by lerobot's own class."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata("local/replay", root=root)
    return {k: tuple(meta.features[k]["shape"]) for k in OBS_KEYS}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    lerobot_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="lerobot_side.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--repo-id", default="local/export")
    c.add_argument("--items", type=int, nargs="*", default=[0])
    t = sub.add_parser("train")
    t.add_argument("--stop-at", type=int, required=True, help="end after the checkpoint of this step")
    s = sub.add_parser("serve")
    s.add_argument("--checkpoint", type=Path)
    s.add_argument("--replay", action="store_true")
    s.add_argument("--root", type=Path, help="replay mode: the LeRobot export the policy trains on")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "check":
        check(args)
    elif args.command == "train":
        train(args, lerobot_args)
    else:
        replies = protocol_stdout()
        server = ReplayServer(recorded_shapes(args.root)) if args.replay else PolicyServer(args.checkpoint, args.seed)
        serve({"reset": server.reset, "act": server.act}, replies)


if __name__ == "__main__":
    main()
