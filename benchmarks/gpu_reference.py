"""Reference GPU numbers for docs/SCALING.md: the Llama-3-8B VLA and the world model on one GPU.

    python benchmarks/gpu_reference.py                      # a CUDA GPU with ~40 GB free; writes the JSON below
    python benchmarks/gpu_reference.py --memory-cap-gib 32  # ... as if the card had 32 GiB (the design card's claim)
    python benchmarks/gpu_reference.py --micro-batch auto   # the largest micro-batch that fits, fewer accumulations
    python benchmarks/gpu_reference.py --backbone minilm    # the default VLA (MiniLM, configs/vla_minilm_cpu.yaml)
    python benchmarks/gpu_reference.py --tiny               # CPU smoke test of the same code path (seconds)

Measures, with random weights (speed and memory do not depend on the values):
* VLA policy = a backbone of Meta-Llama-3-8B's shape (bf16, built directly on the GPU) + the LoRA / head /
  checkpointing / mixed-precision settings of its trainer YAML (configs/vla_llama3_8b_lora.yaml: r=32 on q/k/v/o,
  gradient checkpointing, bf16 autocast): peak GPU memory, training samples/s and tokens/s at the YAML's batch
  (batch_size per step x grad_accum_steps: 128 x 1), and predict_actions latency at batch 1;
* world model (`modeling_vla.WorldModel`, configs/world_model.yaml): imagined steps/s for 65,536 parallel dreams.

Prints a markdown table and writes JSON (settings, device, versions, numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from common.errors import UserError, run_cli  # noqa: E402
from data_prep.tasks import ACTION_DIM, STATE_DIM, default_tasks, instructions_for  # noqa: E402

# transformers.LlamaConfig of meta-llama/Meta-Llama-3-8B(-Instruct): 8.03 B parameters with the LM head,
# 7.50 B in the LlamaModel the VLA uses (it reads hidden states; no LM head).
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# transformers.BertConfig of sentence-transformers/all-MiniLM-L6-v2, the default VLA's backbone (22.7 M parameters).
MINILM_L6 = {
    "model_type": "bert",
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
}
REFERENCE_CONFIG = REPO_ROOT / "configs" / "vla_llama3_8b_lora.yaml"
WORLD_MODEL_CONFIG = REPO_ROOT / "configs" / "world_model.yaml"
# Same architecture families, small enough for a CPU test (--tiny).
LLAMA_TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
MINILM_TINY = {**MINILM_L6, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 512, "max_position_embeddings": 256}


@dataclass(frozen=True)
class Backbone:
    shape: dict[str, Any]
    tiny_shape: dict[str, Any]
    trainer_yaml: Path  # the YAML the VLA on this backbone is trained with


# --backbone NAME
BACKBONES = {
    "llama3-8b": Backbone(LLAMA3_8B, LLAMA_TINY, REFERENCE_CONFIG),
    "minilm": Backbone(MINILM_L6, MINILM_TINY, REPO_ROOT / "configs" / "vla_minilm_cpu.yaml"),
}


@dataclass
class Settings:
    backbone: dict[str, Any] = field(default_factory=lambda: dict(LLAMA3_8B))
    model_config: dict[str, Any] = field(default_factory=dict)  # VLAConfig fields (LoRA, head, dtype)
    batch_size: int = 128  # effective batch of one optimizer step
    micro_batch: int | None = 16  # samples per forward/backward; None: the largest power of two that fits
    mixed_precision: str | None = "bf16"  # the trainer YAML's: bf16 runs the forward under bf16 autocast
    memory_cap_gib: float | None = None  # behave as a card of this size (torch's per-process memory fraction)
    train_warmup_steps: int = 2
    train_steps: int = 5  # timed optimizer steps
    latency_warmup: int = 5
    latency_iters: int = 50
    latency_only: bool = False  # skip training and dreams (benchmarks/gpu_latency.sh)
    dreams: int = 65536  # parallel world-model rollouts
    dream_steps: int = 20  # timed imagined steps of each
    seed: int = 0

    @classmethod
    def tiny(cls, backbone: dict[str, Any] = LLAMA_TINY) -> Settings:
        return cls(backbone=dict(backbone), batch_size=8, micro_batch=4, train_warmup_steps=1, train_steps=2,
                   latency_warmup=1, latency_iters=3, dreams=64, dream_steps=2)

    def apply_trainer_yaml(self, path: Path) -> None:
        """Model fields, batch and mixed precision as the trainer reads them from its YAML."""
        trainer = read_trainer_yaml(path)
        self.model_config = trainer["model_config"]
        self.micro_batch = int(trainer.get("batch_size", self.micro_batch))
        self.batch_size = self.micro_batch * int(trainer.get("grad_accum_steps", 1))
        self.mixed_precision = trainer.get("mixed_precision")


# ----------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of fn(), with the GPU's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_gpu_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def host_peak_rss_gib() -> float:
    """Peak resident memory of this process: a CPU fp32 copy of the 8B backbone would show up here as ~30 GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------- models


def all_instructions() -> list[str]:
    return [text for task in default_tasks() for text in instructions_for(task, "train")]


def write_backbone_folder(folder: Path, backbone: dict[str, Any]) -> Path:
    """A config-only backbone folder (no weights) plus a word-level tokenizer over the project's instructions.

    The Llama-3 tokenizer is gated and not needed for speed: instructions tokenise to a similar handful of
    tokens per phrase (the count actually fed to the model is reported).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    fields = dict(backbone)
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(folder)
    words = sorted({w for text in all_instructions() for w in text.lower().replace(",", " ").split()})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    if len(vocab) > backbone["vocab_size"]:
        raise UserError(f"backbone vocab_size={backbone['vocab_size']} is smaller than the {len(vocab)} instruction words")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


def read_trainer_yaml(path: Path) -> dict[str, Any]:
    """A trainer YAML with its `model_config` block (e.g. the reference VLA's LoRA rank, targets, head, dtype)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected a trainer YAML with a model_config block)")
    trainer = yaml.safe_load(path.read_text()) or {}
    if not isinstance(trainer, dict) or not isinstance(trainer.get("model_config"), dict):
        raise UserError(f"{path}: expected a `model_config` mapping of model config fields")
    return trainer


def reference_model_config(path: Path) -> dict[str, Any]:
    return read_trainer_yaml(path)["model_config"]


def build_policy(settings: Settings, folder: Path, device: torch.device):
    """VLAPolicy with random backbone weights created directly on `device` in the config's backbone_dtype."""
    from transformers import AutoConfig

    from configuration_vla import VLAConfig
    from modeling_vla import VLAPolicy

    fields = dict(settings.model_config)
    fields.update(
        backbone=str(folder),
        # Setting backbone_config makes load_backbone build random weights (from_config) instead of loading.
        backbone_config=AutoConfig.from_pretrained(folder).to_dict(),
    )
    config = VLAConfig(**fields)
    # Under a device context every parameter is allocated on the GPU at creation: no CPU fp32 copy of 8B weights.
    # The YAML's `gradient_checkpointing: true` is applied by VLAPolicy itself, as in training.
    with torch.device(device):
        policy = VLAPolicy(config)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in policy.base_backbone.modules())
    if checkpointed != bool(config.gradient_checkpointing):
        raise RuntimeError(f"gradient checkpointing is {checkpointed} in the backbone's layers, "
                           f"expected {config.gradient_checkpointing}")
    wrong = {(p.device.type, p.dtype) for p in policy.base_backbone.parameters() if p.device.type != device.type}
    if wrong:
        raise RuntimeError(f"backbone parameters landed on {wrong}, expected {device}")
    return policy.train()


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def policy_batch(batch: int, chunk: int, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """A training batch in the docs/DESIGN.md layout (random values, real instructions)."""
    texts = all_instructions()
    picks = torch.randint(len(texts), (batch,), generator=generator).tolist()

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(device)

    return {
        "instruction": [texts[i] for i in picks],
        "state": uniform(batch, STATE_DIM),
        "state_mask": torch.ones(batch, STATE_DIM, device=device),
        "actions": uniform(batch, chunk, ACTION_DIM),
        "step_mask": torch.ones(batch, chunk, device=device),
    }


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------- measurements


def time_optimizer_steps(policy, optimizer, batches: list[dict[str, Any]], settings: Settings, device: torch.device) -> float:
    """Seconds for `train_steps` optimizer steps, each accumulating gradients over all of `batches`."""

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.mixed_precision == "bf16")

    def optimizer_step() -> None:
        for batch in batches:
            with autocast:  # what accelerate's mixed_precision=bf16 wraps the forward in
                loss = policy(**batch).loss
            (loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(settings.train_warmup_steps):
        optimizer_step()
    return timed(lambda: [optimizer_step() for _ in range(settings.train_steps)], device)


def measure_training(policy, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Optimizer steps of `batch_size` samples in micro-batches of `micro_batch` (None: the largest power of two
    that fits), accumulated."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(settings.seed)
    chunk = policy.config.chunk_size
    micro = settings.micro_batch or settings.batch_size
    while True:
        batches = [policy_batch(micro, chunk, device, generator) for _ in range(settings.batch_size // micro)]
        reset_peak(device)
        try:
            seconds = time_optimizer_steps(policy, optimizer, batches, settings, device)
            break
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            if settings.micro_batch is not None or micro == 1:
                raise UserError(f"micro-batch {micro} does not fit in GPU memory"
                                + (f" capped at {settings.memory_cap_gib} GiB" if settings.memory_cap_gib else "")
                                + "; try --micro-batch auto") from None
        del batches
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        micro //= 2
        print(f"micro-batch {micro * 2} does not fit; trying {micro}", file=sys.stderr)
    ids, _ = policy._instruction_ids(batches[0]["instruction"], device)
    tokens_per_sample = ids.shape[1] + policy.config.num_state_tokens  # padded instruction + state tokens
    samples_per_s = settings.batch_size * settings.train_steps / seconds
    return {
        "micro_batch": micro,
        "grad_accumulation": settings.batch_size // micro,
        "tokens_per_sample": int(tokens_per_sample),
        "train_samples_per_s": samples_per_s,
        "train_tokens_per_s": samples_per_s * tokens_per_sample,
        "train_step_s": seconds / settings.train_steps,
        "train_peak_gpu_gib": peak_gpu_gib(device),
    }


def measure_latency(policy, settings: Settings, device: torch.device) -> dict[str, Any]:
    """predict_actions at batch 1 (one control step: an H-step action chunk), as a rollout calls it: the same
    instruction every step, so with instruction_prefix its keys/values come from the eval cache. Also the joint
    sequence (instruction_prefix off, the path before 2026-12-07) on the same weights, for the before / after."""
    policy.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    state = (torch.rand(1, STATE_DIM, generator=generator) * 2 - 1).to(device)
    instruction = all_instructions()[0]
    results: dict[str, Any] = {}
    prefix_setting = policy.config.instruction_prefix
    for name, prefix in (("", prefix_setting), ("_joint", False)):
        if name and not prefix_setting:
            break  # the model's own path is the joint one already
        policy.config.instruction_prefix = prefix
        for _ in range(settings.latency_warmup):
            policy.predict_actions(state, instruction)
        times = sorted(timed(lambda: policy.predict_actions(state, instruction), device)
                       for _ in range(settings.latency_iters))
        results[f"latency{name}_ms_median"] = 1000 * statistics.median(times)
        results[f"latency{name}_ms_p90"] = 1000 * times[min(len(times) - 1, int(0.9 * len(times)))]
    policy.config.instruction_prefix = prefix_setting
    return results


def measure_dreams(settings: Settings, device: torch.device) -> dict[str, Any]:
    """WorldModel.step on `dreams` parallel states for `dream_steps` steps (eval mode, fp32 as trained)."""
    from configuration_vla import WorldModelConfig
    from modeling_vla import WorldModel

    with torch.device(device):
        # configs/world_model.yaml's model: the dreams measured are the ones the evaluation dreams with
        world = WorldModel(WorldModelConfig(**reference_model_config(WORLD_MODEL_CONFIG))).eval()
    generator = torch.Generator().manual_seed(settings.seed + 2)
    n = settings.dreams
    # The instruction embedding is computed once per rollout (not timed) and its values do not change the speed:
    # random unit vectors stand in, so no text-encoder weights are needed on the GPU machine.
    text_emb = F.normalize(torch.randn(n, world.config.text_embed_dim, generator=generator), dim=-1).to(device)
    state = torch.randn(n, STATE_DIM, generator=generator).to(device)
    actions = (torch.rand(settings.dream_steps, n, ACTION_DIM, generator=generator) * 2 - 1).to(device)

    def dream() -> None:
        s, prev = state, state
        for t in range(settings.dream_steps):
            s, prev = world.step(s, actions[t], text_emb=text_emb, prev_state=prev)[0], s

    dream()  # warm-up (kernel selection, caches)
    reset_peak(device)
    seconds = timed(dream, device)
    return {
        "world_model_params": parameter_counts(world)[0],
        "dreams": n,
        "dream_steps": settings.dream_steps,
        "imagined_steps_per_s": n * settings.dream_steps / seconds,
        "dream_step_ms": 1000 * seconds / settings.dream_steps,
        "dream_peak_gpu_gib": peak_gpu_gib(device),
    }


def run_benchmark(settings: Settings, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    results: dict[str, Any] = {}
    if settings.memory_cap_gib is not None and device.type == "cuda":
        # torch's caching allocator then raises OutOfMemoryError beyond the cap (the CUDA context, ~0.5 GiB, is
        # outside it), as on a card of that size.
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, settings.memory_cap_gib * 2**30 / total), index)
        results["memory_cap_gib"] = settings.memory_cap_gib
    with tempfile.TemporaryDirectory(prefix="backbone-config-") as tmp:
        folder = write_backbone_folder(Path(tmp), settings.backbone)
        reset_peak(device)
        build_seconds = timed(lambda: results.update(policy=build_policy(settings, folder, device)), device)
        policy = results.pop("policy")
        policy.tokenizer  # noqa: B018 -- loads the tokenizer while its folder still exists
    total, trainable = parameter_counts(policy)
    results.update(
        params_total=total,
        params_trainable=trainable,
        build_s=build_seconds,
        weights_gpu_gib=peak_gpu_gib(device),
    )
    if not settings.latency_only:
        results.update(measure_training(policy, settings, device))
    results.update(measure_latency(policy, settings, device))
    del policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not settings.latency_only:
        results.update(measure_dreams(settings, device))
    results["host_peak_rss_gib"] = host_peak_rss_gib()
    return results


# ----------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


ROWS = [
    ("VLA parameters (total / trainable)", lambda r: f"{count(r['params_total'])} / {count(r['params_trainable'])}"),
    ("peak GPU memory while building the model", lambda r: gib(r["weights_gpu_gib"])),
    ("peak GPU memory, training", lambda r: gib(r["train_peak_gpu_gib"])
     + (f" (capped at {r['memory_cap_gib']} GiB)" if r.get("memory_cap_gib") else "")),
    ("micro-batch x accumulation", lambda r: f"{r['micro_batch']} x {r['grad_accumulation']}"),
    ("training samples/s", lambda r: f"{r['train_samples_per_s']:.1f}"),
    ("training tokens/s", lambda r: f"{r['train_tokens_per_s']:.0f} ({r['tokens_per_sample']} tokens/sample)"),
    ("inference latency, batch 1 (median / p90)", lambda r: f"{r['latency_ms_median']:.1f} / {r['latency_ms_p90']:.1f} ms"),
    ("... with the instruction as a joint sequence", lambda r: f"{r['latency_joint_ms_median']:.1f} / "
                                                              f"{r['latency_joint_ms_p90']:.1f} ms"),
    ("world model imagined steps/s", lambda r: f"{r['imagined_steps_per_s']:,.0f} ({r['dreams']:,} parallel dreams)"),
    ("peak GPU memory, dreams", lambda r: gib(r["dream_peak_gpu_gib"])),
    ("peak host RSS", lambda r: gib(r["host_peak_rss_gib"])),
]


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


def markdown_table(results: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [f"| measurement ({env['device']}) | value |", "| --- | --- |"]
    for name, fmt in ROWS:
        try:
            lines.append(f"| {name} | {fmt(results)} |")
        except KeyError:  # not measured in this run (--latency-only, or a model without instruction_prefix)
            continue
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU: checks the code path in seconds")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, or cpu with --tiny)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: runs/benchmarks/gpu_reference[_tiny].json)")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="llama3-8b",
                        help="backbone shape (random weights) and its trainer YAML (default: llama3-8b)")
    parser.add_argument("--config", type=Path, default=None,
                        help="trainer YAML: model_config (LoRA, head, checkpointing), batch_size, grad_accum_steps, "
                             "mixed_precision (default: the backbone's, e.g. configs/vla_llama3_8b_lora.yaml)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="effective training batch (default: the YAML's batch_size x grad_accum_steps)")
    parser.add_argument("--micro-batch", default=None,
                        help="samples per forward/backward, or 'auto' for the largest power of two that fits "
                             "(default: the YAML's batch_size)")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default=None,
                        help="override the YAML's model_config.gradient_checkpointing")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="fail allocations beyond this many GiB, as on a smaller card (e.g. 32)")
    parser.add_argument("--dreams", type=int, default=None, help="parallel world-model rollouts (default 65536)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only predict_actions latency at batch 1, instruction as a prefix and as a joint sequence")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def positive_power_of_two(text: str) -> int:
    if not text.isdigit() or not is_power_of_two(int(text)):
        raise UserError(f"--micro-batch {text}: expected 'auto' or a power of two")
    return int(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def run() -> dict[str, Any]:
        backbone = BACKBONES[args.backbone]
        yaml_path = args.config or backbone.trainer_yaml
        if args.tiny:  # the YAML's model, on a tiny backbone and batch
            settings = Settings.tiny(backbone.tiny_shape)
            settings.model_config = reference_model_config(yaml_path)
        else:
            settings = Settings(backbone=dict(backbone.shape))
            settings.apply_trainer_yaml(yaml_path)
        if args.gradient_checkpointing is not None:
            settings.model_config = {**settings.model_config, "gradient_checkpointing": args.gradient_checkpointing == "on"}
        if args.batch_size is not None:
            if not is_power_of_two(args.batch_size):
                raise UserError(f"--batch-size {args.batch_size}: expected a power of two (micro-batches halve it)")
            settings.batch_size = args.batch_size
            settings.micro_batch = min(settings.micro_batch or args.batch_size, args.batch_size)
        if args.micro_batch is not None:
            settings.micro_batch = None if args.micro_batch == "auto" else positive_power_of_two(args.micro_batch)
        if settings.micro_batch is not None and settings.batch_size % settings.micro_batch:
            raise UserError(f"micro-batch {settings.micro_batch} does not divide the batch {settings.batch_size}")
        if args.memory_cap_gib is not None:
            if args.memory_cap_gib <= 0:
                raise UserError(f"--memory-cap-gib {args.memory_cap_gib}: expected a positive number of GiB")
            settings.memory_cap_gib = args.memory_cap_gib
        if args.dreams is not None:
            if args.dreams < 1:
                raise UserError(f"--dreams {args.dreams}: expected a positive number")
            settings.dreams = args.dreams
        settings.latency_only = args.latency_only
        device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("no CUDA GPU visible: run on a GPU machine, or pass --tiny for the CPU smoke test")
        if device.type == "cpu" and not args.tiny:
            raise UserError("the full-size benchmark (Llama-3-8B shapes) needs a GPU; pass --tiny on CPU")
        out = args.out or REPO_ROOT / "runs" / "benchmarks" / f"gpu_reference{'_tiny' if args.tiny else ''}.json"
        env = environment(device)
        print(f"benchmark on {env['device']}: {settings.backbone['model_type']} backbone "
              f"{settings.backbone['num_hidden_layers']} layers x {settings.backbone['hidden_size']}, batch "
              f"{settings.batch_size} (micro-batch {settings.micro_batch or 'auto'}), {settings.dreams:,} dreams",
              flush=True)
        results = run_benchmark(settings, device)
        payload = {"command": " ".join(["python", "benchmarks/gpu_reference.py", *(argv or [])]),
                   "environment": env, "settings": dataclasses.asdict(settings), "results": results}
        write_json_atomically(out, payload)
        print(markdown_table(results, env))
        print(f"wrote {out}")
        return payload

    return run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
