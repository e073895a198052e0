"""`vla-export`: a trained model (or the dataset) → a self-contained Hub repo folder + the local HF cache.

    vla-export --model-dir runs/pipeline/train_policy/best --repo-id local/dreaming-vla-vla-policy \\
               --card-results runs/pipeline/train_policy/train_summary.json runs/pipeline/eval_policy/summary.json
    vla-export --dataset-dir runs/pipeline/dataset --repo-id local/dreaming-vla-dataset
    vla-export --dataset-dir runs/pipeline/dataset --format lerobot --repo-id local/dreaming-vla-lerobot

A model repo holds config.json (with `auto_map`), the code files that auto_map needs (`code_files`: the modules it
names and the sibling modules they import), the safetensors weights (plus the tokenizer for the VLA) and README.md,
the model card written from the results files.
The folder is assembled under a temporary name and renamed into place (an existing --out only with --overwrite, and
only when vla-export wrote it: common/atomic.py). By default it is then placed
into the local Hugging Face cache as the `main` revision of `--repo-id`, so

    HF_HUB_OFFLINE=1 python -c 'from transformers import AutoModel; AutoModel.from_pretrained("org/name", trust_remote_code=True)'

works in a fresh process (and `datasets.load_dataset("org/name")` for the dataset). `--push` uploads the
folder with `huggingface_hub.upload_folder` (needs a token and network).

`--format lerobot` writes the dataset as a LeRobotDataset instead (hub_cards/lerobot_format.py), for LeRobot's
trainers; it lives where `--out` says (LeRobot reads it with `root=`), not in the HF cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from common.atomic import MARKER, check_output_dir, publish_dir, temp_dir
from common.errors import UserError, run_cli
from hub_cards.cards import Results, dataset_card, model_card, model_kind, read_json
from hub_cards.hub_cache import place_in_hub_cache
from hub_cards.lerobot_format import ACTION_COLUMNS, LeRobotExport, write_lerobot_dataset
from hub_cards.lerobot_format import SPLITS as LEROBOT_SPLITS

COMMAND = "vla-export"  # the name in the marker of the folders it writes
REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
FORMATS = ("datasets", "lerobot")  # what --dataset-dir becomes: a `datasets` repo, or a LeRobotDataset
# Training leftovers that do not belong in a published repo.
SKIPPED_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt")


@dataclass(frozen=True)
class ExportResult:
    folder: Path  # the self-contained repo folder
    repo_id: str
    repo_type: str  # "model" or "dataset"
    snapshot: Path | None  # where it sits in the local HF cache
    url: str | None  # the Hub commit URL after --push


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--repo-id {repo_id!r}: {err}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"--repo-id {repo_id!r}: expected 'org/name' (the cache layout needs a namespace)")


def class_path(cls: type) -> str:
    """A class as auto_map names it: "<module file name>.<class name>"."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def with_auto_map(config: dict, source: Path) -> dict:
    """config.json with the auto_map trust_remote_code needs (save_pretrained normally writes it already)."""
    kind = model_kind(config, source)
    auto_map = dict(config.get("auto_map") or {})
    auto_map.setdefault("AutoConfig", class_path(kind.config_class))
    auto_map.setdefault("AutoModel", class_path(kind.model_class))
    return {**config, "auto_map": auto_map}


def code_files(auto_map: dict, folder: Path) -> list[str]:
    """The .py files a model folder needs: the modules auto_map names and, recursively, the sibling modules they
    import relatively (what transformers copies into its modules cache). Read in `folder`, else in the project."""
    from transformers.dynamic_module_utils import get_relative_imports

    pending = [f"{ref.rsplit('.', 1)[0]}.py" for ref in auto_map.values() if isinstance(ref, str)]
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.append(name)
        source = folder / name if (folder / name).is_file() else REPO_ROOT / name
        if source.is_file():
            pending += [f"{module}.py" for module in get_relative_imports(source)]
    return sorted(found)


def copy_model_files(model_dir: Path, staging: Path) -> dict:
    """Weights, tokenizer and code of `model_dir` into `staging`; returns the config (with auto_map)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; --model-dir must be a save_pretrained folder (e.g. runs/x/best)")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{model_dir}: no {' or '.join(WEIGHT_FILES)}; expected the weights written by save_pretrained")
    config = with_auto_map(read_json(config_path, "model config"), config_path)
    for path in sorted(model_dir.iterdir()):
        hidden = path.name.startswith(".")  # e.g. the marker of the command that wrote model_dir
        if path.is_file() and not hidden and path.name not in (*SKIPPED_FILES, "config.json", "README.md"):
            shutil.copy2(path, staging / path.name)
    # The code saved next to the weights is the code they were trained with; older folders get the project's.
    for name in code_files(config["auto_map"], staging):
        if not (staging / name).is_file():
            if not (REPO_ROOT / name).is_file():
                raise UserError(f"{model_dir}: its auto_map needs {name}, which is neither there nor in this project")
            shutil.copy2(REPO_ROOT / name, staging / name)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def default_results(model_dir: Path) -> list[Path]:
    """The trainer writes train_summary.json next to best/; use it when --card-results is not given."""
    summary = model_dir.parent / "train_summary.json"
    return [summary] if summary.is_file() else []


def push_token() -> str:
    """The token --push will use; checked before anything is written so a push that cannot work fails first."""
    from huggingface_hub import get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push")
    token = get_token()
    if not token:
        raise UserError("--push needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push(folder: Path, repo_id: str, repo_type: str, token: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type, ignore_patterns=[MARKER],
                                   commit_message="Upload with vla-export")
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"--push to {repo_type} repo {repo_id}: {str(err).splitlines()[0]}") from None
    return str(commit.commit_url)


def publish(staging: Path, out: Path, repo_id: str, repo_type: str, token: str | None, cache_dir: Path | None,
            overwrite: bool) -> ExportResult:
    """Rename the finished folder into place, then cache it (and push it when given a token)."""
    publish_dir(staging, out, COMMAND, overwrite)
    snapshot = place_in_hub_cache(out, repo_id, repo_type=repo_type, cache_dir=cache_dir)
    url = push(out, repo_id, repo_type, token) if token else None
    return ExportResult(out, repo_id, repo_type, snapshot, url)


def export_model(model_dir: Path, repo_id: str, out: Path, results_files: Sequence[Path] | None = None,
                 dataset_repo_id: str | None = None, do_push: bool = False, cache_dir: Path | None = None,
                 overwrite: bool = False) -> ExportResult:
    check_repo_id(repo_id)
    token = push_token() if do_push else None
    results = Results.from_files(default_results(model_dir) if results_files is None else results_files)
    check_output_dir(out, COMMAND, overwrite, inputs=[model_dir], flag="--out")
    staging = temp_dir(out)
    try:
        config = copy_model_files(model_dir, staging)
        card = model_card(config, repo_id, results, dataset_repo_id, source=model_dir / "config.json")
        card.save(staging / "README.md")
        return publish(staging, out, repo_id, "model", token, cache_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_datasets_cache(snapshot: Path, repo_id: str, cache_root: Path | None = None) -> Path:
    """Build `datasets`' Arrow cache for `repo_id` from the cached snapshot; returns its folder.

    Offline, `load_dataset("org/name")` cannot ask the Hub which files the repo has; it falls back to
    the prepared Arrow cache `HF_DATASETS_CACHE/org___name/<config>/<version>/<hash>/` (what an online
    `load_dataset` leaves behind). We prepare the snapshot as a local folder under the repo's name
    (Arrow files are named after it), then move it to the repo's cache folder in one rename.
    """
    import datasets.config
    from datasets.load import dataset_module_factory, get_dataset_builder_class

    from common.atomic import replace_dir

    namespace, name = repo_id.split("/")
    cache_root = Path(cache_root or datasets.config.HF_DATASETS_CACHE)
    cache_root.mkdir(parents=True, exist_ok=True)
    module = dataset_module_factory(str(snapshot))
    kwargs = dict(module.builder_kwargs)
    kwargs.pop("dataset_name", None)
    config_name = kwargs.pop("config_name", module.builder_configs_parameters.default_config_name)
    builder_class = get_dataset_builder_class(module, dataset_name=name)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=f".{namespace}___{name}.") as tmp:
        builder = builder_class(cache_dir=tmp, dataset_name=name, config_name=config_name, hash=snapshot.name, **kwargs)
        builder.download_and_prepare()
        prepared = Path(builder.cache_dir).relative_to(Path(tmp) / name)
        final = cache_root / f"{namespace}___{name}"
        replace_dir(Path(tmp) / name, final)
    return final / prepared


def export_dataset(dataset_dir: Path, repo_id: str, out: Path, do_push: bool = False,
                   cache_dir: Path | None = None, datasets_cache_dir: Path | None = None,
                   overwrite: bool = False) -> ExportResult:
    check_repo_id(repo_id)
    token = push_token() if do_push else None
    if not (dataset_dir / "normalization.json").is_file():
        raise UserError(f"{dataset_dir}: no normalization.json; --dataset-dir must be a vla-preprocess output folder")
    card = dataset_card(dataset_dir, repo_id)
    check_output_dir(out, COMMAND, overwrite, inputs=[dataset_dir], flag="--out")
    staging = temp_dir(out)
    try:
        shutil.copytree(dataset_dir, staging, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
        card.save(staging / "README.md")
        result = publish(staging, out, repo_id, "dataset", token, cache_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert result.snapshot is not None
    prepare_datasets_cache(result.snapshot, repo_id, datasets_cache_dir)
    return result


def export_lerobot(dataset_dir: Path, repo_id: str, out: Path, action_column: str = ACTION_COLUMNS[0],
                   tasks: Sequence[str] | None = None, splits: Sequence[str] | None = None,
                   overwrite: bool = False) -> LeRobotExport:
    """`dataset_dir` (a vla-preprocess folder) as a LeRobotDataset folder at `out`, written aside and renamed in."""
    from common.atomic import write_output_dir

    check_repo_id(repo_id)
    result = write_output_dir(
        out, COMMAND, overwrite,
        lambda tmp: write_lerobot_dataset(dataset_dir, repo_id, tmp, action_column, list(tasks) if tasks else None,
                                          list(splits) if splits else None),
        inputs=[dataset_dir],
    )
    return LeRobotExport(out, result.episodes, result.frames, result.tasks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a save_pretrained folder, e.g. runs/x/best")
    source.add_argument("--dataset-dir", type=Path, help="a vla-preprocess output folder")
    parser.add_argument("--repo-id", required=True, help="org/name of the Hub repo")
    parser.add_argument("--card-results", type=Path, nargs="+", default=None,
                        help="train_summary.json / vla-rollout summary.json files for the model card "
                             "(default: train_summary.json next to --model-dir)")
    parser.add_argument("--dataset-repo-id", help="the dataset repo the model was trained on (card metadata)")
    parser.add_argument("--out", type=Path, help="repo folder to write (default: exports/<name>)")
    parser.add_argument("--push", action="store_true", help="also upload to the Hub (needs a token and network)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out written by vla-export")
    lerobot = parser.add_argument_group("--format lerobot (a LeRobotDataset v3.0 of --dataset-dir)")
    lerobot.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                         help="datasets: the Hugging Face datasets repo (default); lerobot: a LeRobotDataset")
    lerobot.add_argument("--action-column", choices=ACTION_COLUMNS, default=ACTION_COLUMNS[0],
                         help="what LeRobot's `action` holds: expert_action (the label our policies learn, default) "
                              "or action (what was executed)")
    lerobot.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    lerobot.add_argument("--splits", nargs="+", choices=LEROBOT_SPLITS, default=list(LEROBOT_SPLITS),
                         help="which splits, in this order (default: train validation; info.json names the ranges)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _main(argv: Sequence[str] | None = None) -> ExportResult | LeRobotExport:
    args = parse_args(argv)
    out = args.out or Path("exports") / args.repo_id.split("/")[-1]
    if args.format == "lerobot":
        return _main_lerobot(args, out)
    if args.tasks or args.splits != list(LEROBOT_SPLITS) or args.action_column != ACTION_COLUMNS[0]:
        raise UserError("--tasks/--splits/--action-column choose what a LeRobotDataset holds: add --format lerobot")
    if args.model_dir is not None:
        result = export_model(args.model_dir, args.repo_id, out, args.card_results, args.dataset_repo_id, args.push,
                              overwrite=args.overwrite)
    else:
        if args.card_results:
            raise UserError("--card-results applies to --model-dir exports only")
        result = export_dataset(args.dataset_dir, args.repo_id, out, args.push, overwrite=args.overwrite)
    print(f"{result.repo_type} repo {result.repo_id}: folder {result.folder}")
    print(f"  local HF cache: {result.snapshot}")
    if result.url:
        print(f"  pushed: {result.url}")
    loader = ("AutoModel.from_pretrained(\"{0}\", trust_remote_code=True)" if result.repo_type == "model"
              else "datasets.load_dataset(\"{0}\")").format(result.repo_id)
    print(f"  load offline: HF_HUB_OFFLINE=1 ... {loader}")
    return result


def _main_lerobot(args: argparse.Namespace, out: Path) -> LeRobotExport:
    if args.dataset_dir is None:
        raise UserError("--format lerobot exports a dataset: give --dataset-dir (a vla-preprocess folder), not --model-dir")
    if args.push or args.card_results:
        raise UserError("--format lerobot writes a local folder only: drop --push/--card-results (upload the folder "
                        "with `hf upload --repo-type dataset` and tag it v3.0, as LeRobot's push_to_hub does)")
    result = export_lerobot(args.dataset_dir, args.repo_id, out, args.action_column, args.tasks, args.splits,
                            args.overwrite)
    print(f"LeRobotDataset {args.repo_id}: folder {result.folder} ({result.episodes} episodes, {result.frames} frames, "
          f"{result.tasks} task strings; action = {args.action_column})")
    print(f'  load: LeRobotDataset("{args.repo_id}", root="{result.folder}")  (lerobot 0.4.x)')
    return result


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(lambda: _main(argv))


if __name__ == "__main__":
    main()
