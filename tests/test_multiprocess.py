"""Two processes, one model: `accelerate launch` of the trainer with 2 CPU ranks talking over gloo.

The test launches this very file (the `__main__` block below) with configs/accelerate/cpu_2proc.yaml. It runs
the real trainer (`train_accelerate.main`) and, just before the trainer saves best/ and final/, makes every
rank write the trainable weights it holds. Both ranks must hold identical weights (DDP kept them in sync),
equal to what rank 0 saved, and the run must leave exactly one best/, one final/ and the expected
checkpoints, with each rank's RNG state in them (both processes really took part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
SNAPSHOT_ENV = "VLA_TEST_RANK_SNAPSHOTS"  # folder the launched ranks write their weights to
STEPS, SAVE_EVERY = 4, 2

TINY_WORLD_MODEL = f"""\
model: world
model_config:
  hidden_dim: 16
  token_mlp_dim: 8
  channel_mlp_dim: 16
  num_layers: 1
  num_ensemble: 2
  multi_step: 2
batch_size: 8
lr: 3.0e-3
warmup_steps: 1
max_steps: {STEPS}
eval_every: {SAVE_EVERY}
save_every: {SAVE_EVERY}
keep_checkpoints: 1
log_every: 1
seed: 0
"""


def snapshot_path(folder: Path, name: str, rank: int) -> Path:
    return folder / f"{name}-rank{rank}.safetensors"


def run_trainer_with_rank_snapshots(argv: list[str]) -> None:
    """The trainer's own CLI, with every rank recording its trainable weights whenever a model folder is saved."""
    import torch  # noqa: F401 -- before safetensors.torch
    from safetensors.torch import save_file

    import train_accelerate

    folder = Path(os.environ[SNAPSHOT_ENV])
    save_model = train_accelerate.save_model

    def save_model_with_snapshot(accelerator, model, output_dir, name):
        weights = {n: p.detach().cpu().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters()
                   if p.requires_grad}
        save_file(weights, snapshot_path(folder, name, accelerator.process_index))
        save_model(accelerator, model, output_dir, name)

    train_accelerate.save_model = save_model_with_snapshot
    train_accelerate.main(argv)


def tiny_dataset(make_robomimic_file, out: Path) -> Path:
    from data_prep.preprocess import preprocess

    files = [make_robomimic_file("lift", episodes=6, steps=8, seed=0), make_robomimic_file("can", episodes=6, steps=8, seed=1)]
    preprocess(files, out, valid_fraction=0.34)
    return out


def test_two_cpu_ranks_train_one_model(tmp_path: Path, make_robomimic_file) -> None:
    import torch
    from safetensors.torch import load_file

    dataset = tiny_dataset(make_robomimic_file, tmp_path / "dataset")
    config = tmp_path / "tiny_world.yaml"
    config.write_text(TINY_WORLD_MODEL)
    output_dir, snapshots = tmp_path / "run", tmp_path / "snapshots"
    snapshots.mkdir()
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",  # ranks pick the CPU and gloo (see cpu_2proc.yaml)
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),
        SNAPSHOT_ENV: str(snapshots),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
        "--num_cpu_threads_per_process", "1",
        __file__, "--model", "world", "--config", str(config), "--dataset", str(dataset), "--output-dir", str(output_dir),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log

    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["processes"] == 2, log
    assert summary["steps"] == STEPS

    # Exactly the folders one run should leave: nothing half-written, nothing saved twice.
    assert sorted(p.name for p in output_dir.iterdir() if p.is_dir()) == ["best", "checkpoints", "final", "logs"]
    leftovers = [p for p in output_dir.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers, leftovers
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{STEPS}"]  # keep_checkpoints=1 dropped step_2
    checkpoint = output_dir / "checkpoints" / f"step_{STEPS}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    for name in ("best", "final"):
        rank0 = load_file(snapshot_path(snapshots, name, 0))
        rank1 = load_file(snapshot_path(snapshots, name, 1))
        saved = load_file(output_dir / name / "model.safetensors")
        assert rank0.keys() == rank1.keys() and rank0, name
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{name}: ranks disagree on {key}"
            assert torch.equal(rank0[key], saved[key]), f"{name}: saved {key} differs from the ranks' weights"

    # Training moved the weights away from what a fresh model of the same config starts with.
    from configuration_vla import WorldModelConfig
    from modeling_vla import WorldModel

    saved_config = WorldModelConfig.from_pretrained(output_dir / "final")
    torch.manual_seed(0)
    fresh = dict(WorldModel(saved_config).named_parameters())
    final = load_file(snapshot_path(snapshots, "final", 0))
    assert any(not torch.equal(final[k], fresh[k].detach()) for k in final)


if __name__ == "__main__":
    run_trainer_with_rank_snapshots(sys.argv[1:])
