#!/usr/bin/env bash
# The reference trainer end to end on one GPU, as a user would run it: `accelerate launch` with
# configs/accelerate/single_gpu_bf16.yaml and configs/vla_llama3_8b_lora.yaml (LoRA r=32, gradient checkpointing, bf16
# backbone, batch 128) on a random backbone of Llama-3-8B's width with 4 layers (0.87 B parameters; the real weights are
# gated), 40 steps, then 20 more with --resume, then AutoModel.from_pretrained(best, trust_remote_code=True).
#   bash benchmarks/gpu_trainer_check.sh [OUT_DIR] [DATASET]        # ~2 min on an H200; full log in OUT_DIR
#   SIZE=tiny ACCELERATE_USE_CPU=true bash benchmarks/gpu_trainer_check.sh /tmp/check   # the same path on a CPU
set -uo pipefail
out=$(mkdir -p "${1:-runs/benchmarks/gpu_trainer_check}" && cd "${1:-runs/benchmarks/gpu_trainer_check}" && pwd) || exit 2
dataset=${2:-data/hf_dataset_lift_demos}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
work=$(mktemp -d)
backbone=$work/backbone run=$work/run
exec > >(tee "$out/trainer_check.log") 2>&1

SIZE=${SIZE:-mid} "$python" - "$backbone" <<'PY' || exit 1
import os, sys
from pathlib import Path

import torch
sys.path.insert(0, ".")
from benchmarks.gpu_reference import LLAMA3_8B, LLAMA_TINY, write_backbone_folder
from transformers import AutoConfig, LlamaModel

shape = dict(LLAMA_TINY) if os.environ["SIZE"] == "tiny" else {**LLAMA3_8B, "num_hidden_layers": 4, "vocab_size": 512}
folder = write_backbone_folder(Path(sys.argv[1]), shape)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaModel(AutoConfig.from_pretrained(folder)).to(torch.bfloat16)
model.save_pretrained(folder)
print(f"backbone: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {shape['num_hidden_layers']} layers")
PY

train() {
  "$python" -m accelerate.commands.launch --config_file configs/accelerate/single_gpu_bf16.yaml train_accelerate.py \
    --model policy --config configs/vla_llama3_8b_lora.yaml --dataset "$dataset" --output-dir "$run" "$@" \
    --set model_config.backbone="$backbone" warmup_steps=5 eval_every=20 save_every=20 max_eval_batches=4 log_every=5 \
    "${extra[@]}"
}
extra=(max_steps=40)
train || exit 1
extra=(max_steps=60)
train --resume || exit 1
ls -la "$run" "$run/best" "$run/checkpoints"
cp "$run/train_summary.json" "$out/"
"$python" - "$run" <<'PY'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModel

run = Path(sys.argv[1])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModel.from_pretrained(run / "best", trust_remote_code=True).to(device).eval()
actions = model.predict_actions(torch.zeros(2, model.config.state_dim, device=device), ["Lift the red cube"] * 2)
summary = json.loads((run / "train_summary.json").read_text())
print(f"reloaded {type(model).__name__}: actions {tuple(actions.shape)}, backbone {next(model.base_backbone.parameters()).dtype}")
print({k: summary[k] for k in ("steps", "best_val_loss", "train_samples_per_s", "wall_time_s") if k in summary})
PY
rm -rf "$work"
