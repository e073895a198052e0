"""`vla-pool-world-models`: one dream model from several training runs of a world model (a deep ensemble).

    vla-pool-world-models --inputs runs/wm_s0/best runs/wm_s1/best runs/wm_s2/best --out runs/wm_pool/best

The output is an ordinary saved WorldModel (`AutoModel.from_pretrained(out, trust_remote_code=True)`) whose
ensemble holds every input's members side by side (`WorldModel.pool`); the folder appears atomically.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from data_prep.atomic import replace_dir
from data_prep.errors import UserError, run_cli
from data_prep.tasks import TASKS
from evaluation.cli import WORLD_MODEL_TYPE, check_model_config, read_model_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-pool-world-models", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=Path, nargs="+", required=True, help="saved WorldModel folders (two or more)")
    p.add_argument("--out", type=Path, required=True, help="folder of the pooled WorldModel (replaced atomically)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def pool_world_models(inputs: list[Path], out: Path) -> Path:
    from modeling_vla import WorldModel

    if len(inputs) < 2:
        raise UserError(f"--inputs: expected two or more world-model folders, got {len(inputs)}")
    for folder in inputs:
        config = read_model_config(folder, "--inputs")
        check_model_config(config, folder, "--inputs", (WORLD_MODEL_TYPE,), list(config.get("tasks") or TASKS))
    models = [WorldModel.from_pretrained(str(folder)) for folder in inputs]
    try:
        pooled = WorldModel.pool(models)
    except ValueError as err:
        raise UserError(f"--inputs {' '.join(map(str, inputs))}: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pooled.save_pretrained(tmp)
    replace_dir(tmp, out)
    print(f"wrote {out}: {pooled.config.num_ensemble} members from {len(inputs)} world models")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: pool_world_models(list(args.inputs), args.out))


if __name__ == "__main__":
    main()
