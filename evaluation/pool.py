"""`vla-pool-world-models`: one dream model from several training runs of a world model (a deep ensemble).

    vla-pool-world-models --inputs runs/wm_s0/best runs/wm_s1/best runs/wm_s2/best --out runs/wm_pool/best

The output is an ordinary saved WorldModel (`AutoModel.from_pretrained(out, trust_remote_code=True)`) whose
ensemble holds every input's members side by side (`WorldModel.pool`); the folder appears atomically. An existing
--out is replaced only with --overwrite, and only when vla-pool-world-models wrote it (common/atomic.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.atomic import check_output_dir, write_output_dir
from common.errors import UserError, run_cli
from common.saved_models import check_model_config, load_model, read_model_config
from data_prep.tasks import STATE_LAYOUT, task_names
from model_kinds import model_types

COMMAND = "vla-pool-world-models"  # the name in the marker of the folders it writes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=Path, nargs="+", required=True, help="saved WorldModel folders (two or more)")
    p.add_argument("--out", type=Path, required=True, help="folder of the pooled WorldModel (appears atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by vla-pool-world-models")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def pool_world_models(inputs: list[Path], out: Path, overwrite: bool = False) -> Path:
    from modeling_vla import WorldModel

    if len(inputs) < 2:
        raise UserError(f"--inputs: expected two or more world-model folders, got {len(inputs)}")
    for folder in inputs:
        config = read_model_config(folder, "--inputs")
        check_model_config(config, folder, "--inputs", model_types("world"), list(config.get("tasks") or task_names()),
                           STATE_LAYOUT)
    check_output_dir(out, COMMAND, overwrite, inputs)
    models = [load_model(folder, "--inputs", "cpu") for folder in inputs]
    try:
        pooled = WorldModel.pool(models)
    except ValueError as err:
        raise UserError(f"--inputs {' '.join(map(str, inputs))}: {err}") from None
    write_output_dir(out, COMMAND, overwrite, pooled.save_pretrained, inputs)
    print(f"wrote {out}: {pooled.config.num_ensemble} members from {len(inputs)} world models")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: pool_world_models(list(args.inputs), args.out, args.overwrite))


if __name__ == "__main__":
    main()
