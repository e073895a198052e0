"""World-model dream throughput against the number of rows `WorldModel.step` runs per pass (docs/SCALING.md).

    python benchmarks/dream_throughput.py --device cuda                     # GPU: 4k-262k dreams, 512-row to one pass
    python benchmarks/dream_throughput.py --device cpu --dreams 4096 --chunks 128 512 4096

Random weights of configs/world_model.yaml's model and random inputs (speed does not depend on the values);
imagined steps/s is dreams x steps / seconds, timed after one warm-up step. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import modeling_world  # noqa: E402
from benchmarks.gpu_reference import (  # noqa: E402
    WORLD_MODEL_CONFIG,
    peak_gpu_gib,
    reference_model_config,
    reset_peak,
    timed,
    write_json_atomically,
)
from common.errors import UserError, run_cli  # noqa: E402
from configuration_vla import WorldModelConfig  # noqa: E402


def rows_per_pass(device: torch.device, rows: int) -> None:
    """Make WorldModel.step run `rows` rows per pass on this kind of device."""
    if device.type in modeling_world.STEP_CHUNK_ROWS:
        modeling_world.STEP_CHUNK_ROWS[device.type] = rows
    else:
        modeling_world.STEP_CHUNK_ROWS_ACCELERATOR = rows


def measure(world: modeling_world.WorldModel, dreams: int, chunk: int, steps: int, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(dreams)
    config = world.config
    text = F.normalize(torch.randn(dreams, config.text_embed_dim, generator=generator), dim=-1).to(device)
    state = torch.randn(dreams, config.state_dim, generator=generator).to(device)
    action = (torch.rand(dreams, config.action_dim, generator=generator) * 2 - 1).to(device)
    rows_per_pass(device, chunk)
    world.step(state, action, text_emb=text, prev_state=state)  # warm-up
    reset_peak(device)
    seconds = timed(lambda: [world.step(state, action, text_emb=text, prev_state=state) for _ in range(steps)], device)
    return {"dreams": dreams, "rows_per_pass": chunk, "imagined_steps_per_s": dreams * steps / seconds,
            "step_ms": 1000 * seconds / steps, "peak_gpu_gib": peak_gpu_gib(device)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dream_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dreams", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 4096, 32768, 2**30],
                        help="rows per pass to compare (2**30: all rows in one pass)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "benchmarks" / "dream_throughput.json")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)

    def run() -> list[dict[str, Any]]:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("no CUDA GPU visible: pass --device cpu")
        if min(args.dreams + args.chunks + [args.steps]) < 1:
            raise UserError("--dreams, --chunks and --steps: expected positive numbers")
        with torch.device(device):
            world = modeling_world.WorldModel(WorldModelConfig(**reference_model_config(WORLD_MODEL_CONFIG))).eval()
        default = (dict(modeling_world.STEP_CHUNK_ROWS), modeling_world.STEP_CHUNK_ROWS_ACCELERATOR)
        try:
            rows = [measure(world, n, chunk, args.steps, device) for n in args.dreams for chunk in args.chunks]
        finally:
            modeling_world.STEP_CHUNK_ROWS.update(default[0])
            modeling_world.STEP_CHUNK_ROWS_ACCELERATOR = default[1]
        print("| parallel dreams | rows per pass | imagined steps/s | ms per step | peak GPU memory |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            peak = "n/a" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f} GiB"
            print(f"| {r['dreams']:,} | {r['rows_per_pass']:,} | {r['imagined_steps_per_s']:,.0f} | {r['step_ms']:.2f} | {peak} |")
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        write_json_atomically(args.out, {"date": datetime.now(UTC).isoformat(timespec="seconds"), "device": device_name,
                                         "torch": torch.__version__, "steps": args.steps, "rows": rows})
        print(f"wrote {args.out}")
        return rows

    return run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
