"""`vla-preprocess`: robomimic HDF5 files -> one Hugging Face `datasets` repo folder.

Output (docs/DESIGN.md, "Dataset repo"):

    <out>/README.md             dataset card; its YAML `configs:` let `datasets.load_dataset(<out>)` find the splits
    <out>/data/train-XXXXX-of-YYYYY.parquet
    <out>/data/validation-XXXXX-of-YYYYY.parquet
    <out>/normalization.json    per-dimension statistics of the train split
    <out>/instructions.json     the instruction paraphrases used

Every input is read and validated before anything is written, the repo is assembled in
`<out>.tmp-<host>-<pid>` and renamed into place, so a bad input leaves nothing behind. `--out` may not be, hold or
lie inside an input, and `--overwrite` replaces only a dataset that vla-preprocess wrote (common/atomic.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset as HFDataset
from datasets import DatasetDict, DatasetInfo, Features, List, Value, load_dataset
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from common.atomic import check_output_dir, publish_dir, temp_dir
from common.errors import UserError, run_cli
from data_prep.robomimic_io import Episode, RobomimicFile, read_robomimic_hdf5, split_demo_names
from data_prep.tasks import (
    ACTION_DIM,
    MAX_SLOTS,
    OBJECT_DIM,
    SLOT_DIM,
    STATE_DIM,
    STATE_LAYOUT,
    STATE_SLICES,
    get_task,
    instructions_for,
    instructions_json,
)

COMMAND = "vla-preprocess"  # the name in the marker of the folders it writes
SPLITS = ("train", "validation")
ROBOMIMIC_MASK = {"train": "train", "validation": "valid"}  # our split name -> robomimic's filter key
STD_FLOOR = 1e-3  # a dimension (nearly) constant over the train split is scaled as if std were this
DEFAULT_SHARD_ROWS = 250_000  # ~80 MB of parquet per shard

FEATURES = Features(
    {
        "task": Value("string"),
        "instruction": Value("string"),
        "episode": Value("int64"),
        "step": Value("int32"),
        "state": List(Value("float32"), length=STATE_DIM),
        "state_mask": List(Value("float32"), length=STATE_DIM),
        "action": List(Value("float32"), length=ACTION_DIM),
        "expert_action": List(Value("float32"), length=ACTION_DIM),
        "next_state": List(Value("float32"), length=STATE_DIM),
        "reward": Value("float32"),
        "done": Value("bool"),
        "success": Value("bool"),
        "source": Value("string"),
    }
)
FEATURE_DOCS = {
    "task": "short task name (`lift`, `can`, `square`, or a scene goal such as `cubes_red`); bookkeeping only, no model reads it",
    "instruction": "language goal; a train paraphrase on train rows, a held-out paraphrase on validation rows",
    "episode": "episode id, unique over the whole repo",
    "step": "control step within the episode (0-based)",
    "state": f"s_t, {STATE_DIM} floats in the shared layout (below)",
    "state_mask": "1 where `state` holds a real value, 0 where it is padding",
    "action": f"a_t as executed, {ACTION_DIM} floats, OSC_POSE delta in [-1, 1]; last = gripper (-1 open, +1 close)",
    "expert_action": "the scripted expert's noise-free action at s_t, what the policies learn (robomimic's files "
    "have none: `action` is copied); differs from `action` by the expert's noise, and where a random burst (play "
    "data) or a learner (DAgger data) drove",
    "next_state": "s_{t+1}, same layout as `state`",
    "reward": "robomimic's sparse reward after the step",
    "done": "robomimic's done flag",
    "success": "task solved after the step (`reward > 0`)",
    "source": "HDF5 file the row came from: its name, with as many parent folders as it takes to tell the inputs apart",
}


# --------------------------------------------------------------------------------------------- reading


def hdf5_files_under(folder: Path) -> list[Path]:
    """*.hdf5 below `folder`, through linked folders too (Path.rglob does not descend into those by default, so a task
    folder linked in from another build, e.g. raw_v2/lift -> ../raw/lift, would silently drop out)."""
    matches, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link cycle
            dirs.clear()
            continue
        seen.add(real)
        matches += [Path(root) / name for name in files if name.endswith(".hdf5")]
    return sorted(matches)


def find_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, directories searched recursively for *.hdf5; duplicates dropped, order kept."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            matches = hdf5_files_under(path)
            if not matches:
                raise UserError(f"{path}: directory holds no *.hdf5 files")
            found.extend(matches)
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path}: file not found (expected a robomimic HDF5 file or a directory of them)")
    unique = {p.resolve(): p for p in reversed(found)}
    return [p for p in found if unique.get(p.resolve()) is p]


def source_labels(paths: list[Path]) -> dict[Path, str]:
    """Each input's shortest trailing path that no other input shares: `lift/low_dim_generated.hdf5`
    when raw/lift and raw/can hold files of the same name, `raw_play/lift/...` next to `raw/lift/...`."""
    parts = {path: path.resolve().parts for path in paths}
    labels = {}
    for path, own in parts.items():
        others = [p for q, p in parts.items() if q is not path]
        depth = next(n for n in range(1, len(own) + 1) if all(p[-n:] != own[-n:] for p in others) or n == len(own))
        labels[path] = "/".join(own[-depth:]).lstrip("/")
    return labels


def episode_splits(source: RobomimicFile, valid_fraction: float, seed: int) -> dict[str, str]:
    """demo name -> split. The file's own `mask/valid` decides when present (robomimic's published split);
    otherwise a seeded split of the file's demos."""
    valid_mask = source.masks.get(ROBOMIMIC_MASK["validation"])
    if valid_mask is not None:
        unknown = sorted(set(valid_mask) - set(source.demo_names))
        if unknown:
            raise UserError(f"{source.path}: mask/valid names {unknown[:3]} which are not episodes in 'data'")
        valid = set(valid_mask)
    else:
        _, valid_names = split_demo_names(source.demo_names, valid_fraction, seed)
        valid = set(valid_names)
    return {name: ("validation" if name in valid else "train") for name in source.demo_names}


def pick_instruction(task: str, split: str, episode_id: int, seed: int) -> str:
    """One paraphrase per episode, reproducible from (seed, episode id)."""
    options = instructions_for(task, split)
    return options[int(np.random.default_rng([seed, episode_id]).integers(len(options)))]


def episode_rows(
    source: RobomimicFile, label: str, episode: Episode, episode_id: int, split: str, seed: int
) -> dict[str, np.ndarray]:
    state, mask = source.state(episode, "obs")
    next_state, _ = source.state(episode, "next_obs")
    steps = len(episode)
    rewards = episode.rewards.astype(np.float32)
    return {
        "task": np.full(steps, source.task, dtype=object),
        "instruction": np.full(steps, pick_instruction(source.task, split, episode_id, seed), dtype=object),
        "episode": np.full(steps, episode_id, dtype=np.int64),
        "step": np.arange(steps, dtype=np.int32),
        "state": state,
        "state_mask": mask,
        "action": episode.actions.astype(np.float32),
        "expert_action": episode.labels.astype(np.float32),
        "next_state": next_state,
        "reward": rewards,
        "done": episode.dones.astype(bool),
        "success": rewards > 0,
        "source": np.full(steps, label, dtype=object),
    }


def goal_relabelled_rows(rows: dict[str, np.ndarray], first_id: int, split: str, seed: int) -> list[dict[str, np.ndarray]]:
    """A scene episode once per goal of its scene (issue 46, world-model data only): the same steps with that goal's
    instruction and its success read off the recorded next states by the goal's rule (the named goal's own labels
    too, so no copy mixes the simulator's reward with the pose rule: docs/experiments/042). Episode ids first_id..."""
    from data_prep.scenes import GOAL_TASKS, get_scene

    scene = GOAL_TASKS[str(rows["task"][0])][0]
    copies = []
    for offset, goal in enumerate(get_scene(scene).goals):
        task = f"{scene}_{goal}"
        success = np.asarray(get_task(task).success_rule(rows["next_state"]), dtype=bool)
        steps = len(success)
        copies.append({**rows, "task": np.full(steps, task, dtype=object),
                       "instruction": np.full(steps, pick_instruction(task, split, first_id + offset, seed), dtype=object),
                       "episode": np.full(steps, first_id + offset, dtype=np.int64),
                       "reward": success.astype(np.float32), "success": success})
    return copies


@dataclass
class SourceSummary:
    path: Path
    label: str  # the `source` column's value for its rows
    task: str
    origin: str
    episodes: Counter = field(default_factory=Counter)  # split -> count
    failed: int = 0  # episodes not solved at their last step (play data made with `vla-generate play`)


@dataclass
class Collected:
    columns: dict[str, dict[str, np.ndarray]]  # split -> column -> array (rows sorted by episode, step)
    sources: list[SourceSummary]


def collect(paths: list[Path], seed: int, valid_fraction: float, relabel_goals: bool = False) -> Collected:
    """Read and validate every input file; rows of all files grouped by split (with `relabel_goals`, every episode of
    a multi-object scene once per goal of its scene: `goal_relabelled_rows`)."""
    from data_prep.scenes import GOAL_TASKS

    sources = [read_robomimic_hdf5(p) for p in paths]  # validates headers before the long read
    labels = source_labels(paths)
    parts: dict[str, list[dict[str, np.ndarray]]] = {split: [] for split in SPLITS}
    summaries = []
    episode_id = 0
    with tqdm(total=sum(len(s) for s in sources), desc="episodes", unit="ep") as progress:
        for path, source in zip(paths, sources, strict=True):
            summary = SourceSummary(source.path, labels[path], source.task, source.origin)
            splits = episode_splits(source, valid_fraction, seed)
            for episode in source:
                split = splits[episode.name]
                rows = episode_rows(source, labels[path], episode, episode_id, split, seed)
                copies = goal_relabelled_rows(rows, episode_id, split, seed) if (
                    relabel_goals and source.task in GOAL_TASKS) else [rows]
                parts[split] += copies
                summary.episodes[split] += len(copies)
                summary.failed += int(episode.rewards[-1] <= 0)
                episode_id += len(copies)
                progress.update()
            summaries.append(summary)
    columns = {}
    for split, rows in parts.items():
        if not rows:
            raise UserError(f"{', '.join(map(str, paths))}: no {split} episodes (need at least one per split)")
        columns[split] = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    return Collected(columns, summaries)


# --------------------------------------------------------------------------------------------- statistics


def dimension_stats(values: np.ndarray, mask: np.ndarray | None = None) -> dict[str, list[float]]:
    """mean/std/min/max per column over rows where mask is 1; a column never observed gets mean 0, std 1."""
    mask = np.ones_like(values, dtype=bool) if mask is None else mask.astype(bool)
    count = mask.sum(axis=0)
    seen = count > 0
    safe = np.maximum(count, 1)
    values = values.astype(np.float64)
    mean = np.where(mask, values, 0).sum(axis=0) / safe
    var = np.where(mask, (values - mean) ** 2, 0).sum(axis=0) / safe
    std = np.maximum(np.sqrt(var), STD_FLOOR)
    low = np.where(mask, values, np.inf).min(axis=0)
    high = np.where(mask, values, -np.inf).max(axis=0)
    return {
        "mean": np.where(seen, mean, 0.0).tolist(),
        "std": np.where(seen, std, 1.0).tolist(),
        "min": np.where(seen, low, 0.0).tolist(),
        "max": np.where(seen, high, 0.0).tolist(),
    }


def normalization_stats(train: dict[str, np.ndarray]) -> dict:
    return {
        "state_layout": STATE_LAYOUT,
        "std_floor": STD_FLOOR,
        "num_rows": int(len(train["action"])),
        "state": dimension_stats(train["state"], train["state_mask"]),
        "action": dimension_stats(train["action"]),
    }


@dataclass(frozen=True)
class Stats:
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray


@dataclass(frozen=True)
class Normalization:
    state_layout: str
    state: Stats
    action: Stats


def load_normalization(path: str | os.PathLike) -> Normalization:
    """Read `normalization.json` (or the one inside a dataset folder); refuses another state layout."""
    path = Path(path)
    if path.is_dir():
        path = path / "normalization.json"
    try:
        raw = json.loads(path.read_text())
        stats = {
            part: Stats(**{k: np.asarray(raw[part][k], dtype=np.float32) for k in ("mean", "std", "min", "max")})
            for part in ("state", "action")
        }
        layout = raw["state_layout"]
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (expected a dataset folder made by vla-preprocess)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a valid normalization file ({type(err).__name__}: {err})") from None
    if layout != STATE_LAYOUT:
        raise UserError(f"{path}: state_layout {layout!r} does not match this code's {STATE_LAYOUT!r}")
    for part, dim in (("state", STATE_DIM), ("action", ACTION_DIM)):
        if stats[part].mean.shape != (dim,):
            raise UserError(f"{path}: {part} statistics have shape {stats[part].mean.shape}, expected ({dim},)")
    return Normalization(layout, stats["state"], stats["action"])


# --------------------------------------------------------------------------------------------- writing


def to_arrow(values: np.ndarray) -> pa.Array:
    """Column -> Arrow without a Python loop per row ([N, D] floats become fixed-size lists)."""
    if values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.array(values.tolist() if values.dtype == object else values)


def write_split(columns: dict[str, np.ndarray], split: str, data_dir: Path, shard_rows: int) -> int:
    table = pa.table({k: to_arrow(v) for k, v in columns.items()}).cast(FEATURES.arrow_schema)
    # A fingerprint of our own: datasets would otherwise hash the whole table with dill (see shard_fingerprint).
    fingerprint = hashlib.sha256(f"{data_dir.resolve()}|{split}|{len(table)}".encode()).hexdigest()[:16]
    dataset = HFDataset(table, info=DatasetInfo(features=FEATURES), split=split, fingerprint=fingerprint)
    num_shards = max(1, math.ceil(len(dataset) / shard_rows))
    for index in range(num_shards):
        shard = dataset.shard(num_shards, index, contiguous=True)
        shard.to_parquet(str(data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"))
    return num_shards


def split_counts(collected: Collected) -> dict[str, dict[str, dict[str, int]]]:
    """task -> split -> {episodes, steps, successful_steps}."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for split, columns in collected.columns.items():
        for task in sorted(set(columns["task"])):
            rows = columns["task"] == task
            counts.setdefault(task, {})[split] = {
                "episodes": len(np.unique(columns["episode"][rows])),
                "steps": int(rows.sum()),
                "success_steps": int(columns["success"][rows].sum()),
            }
    return counts


def dataset_card(collected: Collected, seed: int) -> DatasetCard:
    counts = split_counts(collected)
    total_rows = sum(len(c["episode"]) for c in collected.columns.values())
    size = "n<1K" if total_rows < 1_000 else "1K<n<10K" if total_rows < 10_000 else "10K<n<100K" if total_rows < 100_000 else "100K<n<1M"
    data = DatasetCardData(
        license="mit",
        task_categories=["robotics"],
        language=["en"],
        tags=["robomimic", "robosuite", "vision-language-action", "low-dim", "world-model"],
        pretty_name="Dreaming VLA: robomimic low-dim demonstrations with language instructions",
        size_categories=[size],
        configs=[{"config_name": "default", "data_files": [{"split": s, "path": f"data/{s}-*"} for s in SPLITS]}],
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(collected, counts, seed)}")


def feature_type(feature) -> str:
    """`Value('float32')` -> `float32`, `List(Value('float32'), length=23)` -> `float32[23]`."""
    if isinstance(feature, List):
        return f"{feature.feature.dtype}[{feature.length}]"
    return feature.dtype


def card_body(collected: Collected, counts: dict, seed: int) -> str:
    lines = [
        "# Dreaming VLA demonstrations",
        "",
        "Low-dimensional robosuite Panda demonstrations in robomimic format, flattened to one row per control step "
        "and paired with a language instruction. Made by `vla-preprocess` of the dreaming-vla project; load with "
        "`datasets.load_dataset(<this folder>)`.",
        "",
        "## Features",
        "",
        "| column | type | meaning |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{name}` | `{feature_type(FEATURES[name])}` | {doc} |" for name, doc in FEATURE_DOCS.items()]
    lines += ["", "Rows are sorted by (`episode`, `step`); the train/validation split is by episode.", "", "## Tasks", ""]
    for task in counts:
        spec = get_task(task)
        lines += [
            f"### `{task}` (robosuite `{spec.env_name}`)",
            "",
            f"- train instructions: {'; '.join(repr(i) for i in instructions_for(task, 'train'))}",
            f"- validation instructions (held out, never on train rows): "
            f"{'; '.join(repr(i) for i in instructions_for(task, 'validation'))}",
            "",
        ]
    lines += ["## Counts", "", "| task | split | episodes | steps | steps with success |", "| --- | --- | ---: | ---: | ---: |"]
    for task, per_split in counts.items():
        for split, c in per_split.items():
            lines.append(f"| {task} | {split} | {c['episodes']} | {c['steps']} | {c['success_steps']} |")
    lines += [
        "",
        "## State layout and padding",
        "",
        f"`state` and `next_state` have {STATE_DIM} floats, identical for every task (layout id `{STATE_LAYOUT}`):",
        "",
        "| index | content |",
        "| --- | --- |",
        *(f"| {block.start}-{block.stop - 1} | {name} |" for name, block in STATE_SLICES.items()),
        "",
        "Orientations are the first two columns of the rotation matrix (6 numbers; robosuite's xyzw quaternions "
        "converted), which, unlike quaternions, never jump between equivalent values from one step to the next. "
        f"The object block ({OBJECT_DIM} floats) holds {MAX_SLOTS} slots of {SLOT_DIM}, one per object in a fixed "
        "order per scene: each is robomimic's `object` observation of that object with its quaternions converted that "
        "way. A cube's slot is 12 wide (cube position, rotation, gripper-to-cube vector), every other object's 18 "
        "(object position and rotation, then its pose relative to the end effector). Lift, Can and Square fill slot 0 "
        "(slot 0's blocks are named above, slots 1-3 are 'other objects'). Each slot is padded with zeros on the right, "
        "empty slots are zeros, and `state_mask` marks real entries with 1 and padding with 0, so models can ignore the "
        "padding. Which object the instruction names is in the instruction alone.",
        "",
        "`normalization.json` holds mean/std/min/max per state and action dimension over the **train** split only; "
        "state statistics count only unpadded entries, a dimension that is padding on every train row gets mean 0 and "
        f"std 1, and std is floored at {STD_FLOOR}.",
        "",
        "## How it was made",
        "",
        f"Converted with `vla-preprocess --seed {seed}` from these robomimic HDF5 files (`generated` = scripted-expert "
        "demos made by `vla-generate demos` in robosuite; `generated (play)` = its play data, `vla-generate play`; "
        "`generated (DAgger)` = its DAgger data, `vla-generate dagger`: the expert finishing from where a trained policy "
        "left the robot; `generated (policy)` = a trained policy's own roll-outs, `vla-generate rollouts` (world-model data: their "
        "labels are the policy's actions); `robomimic` = robomimic's published files, e.g. from `vla-download`). An episode not solved at its "
        "last step is a failure: its `done` is never set.",
        "",
        "| file | task | origin | train episodes | validation episodes | failed episodes |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for s in collected.sources:
        lines.append(
            f"| `{s.label}` | {s.task} | {s.origin} | {s.episodes['train']} | {s.episodes['validation']} | {s.failed} |"
        )
    lines += [
        "",
        "The split follows each file's `mask/valid` filter key when it has one (robomimic's published split), "
        "otherwise a seeded 90/10 split of its episodes. Each episode gets one instruction paraphrase, drawn with "
        "a seed made of (`--seed`, episode id). `success` is robomimic's sparse reward > 0. `instructions.json` "
        "lists every paraphrase.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class PreprocessResult:
    out: Path
    rows: dict[str, int]
    episodes: dict[str, int]
    shards: dict[str, int]


def preprocess(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
    valid_fraction: float = 0.1,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    relabel_goals: bool = False,
) -> PreprocessResult:
    """Convert robomimic HDF5 files (or folders of them) into the dataset repo at `out`."""
    out = Path(out)
    if shard_rows < 1:
        raise UserError(f"--shard-rows {shard_rows}: expected a positive number of rows per Parquet file")
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction {valid_fraction}: expected a share in [0, 1)")
    given = [Path(p) for p in inputs]
    found = find_inputs(given)
    check_output_dir(out, COMMAND, overwrite, inputs=[*given, *found])
    collected = collect(found, seed, valid_fraction, relabel_goals)
    tmp = temp_dir(out)
    try:
        (tmp / "data").mkdir()
        shards = {split: write_split(collected.columns[split], split, tmp / "data", shard_rows) for split in SPLITS}
        stats = normalization_stats(collected.columns["train"])
        (tmp / "normalization.json").write_text(json.dumps(stats, indent=2) + "\n")
        (tmp / "instructions.json").write_text(instructions_json())
        dataset_card(collected, seed).save(tmp / "README.md")
        publish_dir(tmp, out, COMMAND, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreprocessResult(
        out=out,
        rows={s: len(c["episode"]) for s, c in collected.columns.items()},
        episodes={s: len(np.unique(c["episode"])) for s, c in collected.columns.items()},
        shards=shards,
    )


def load_vla_dataset(path: str | os.PathLike, cache_dir: str | None = None) -> DatasetDict:
    """Load a repo written by `vla-preprocess` (train + validation) after checking its state layout.

    The Parquet shards are read straight into memory-backed Arrow tables: `datasets`' shared cache
    keys folders by name, so two different repos called "ds" (or one rewritten with --overwrite)
    could otherwise come back as each other. `datasets.load_dataset(path)` remains the public way in.
    With `cache_dir`, the documented `load_dataset` route is taken instead.
    """
    load_normalization(path)
    if cache_dir is not None:
        return load_dataset(str(path), cache_dir=cache_dir)
    import pyarrow.parquet as pq

    splits = {}
    for split in SPLITS:
        files = sorted((Path(path) / "data").glob(f"{split}-*.parquet"))
        if not files:
            raise UserError(f"{path}: no data/{split}-*.parquet shards; expected a folder written by vla-preprocess")
        table = pa.concat_tables([pq.read_table(f) for f in files])
        if "expert_action" not in table.column_names:  # a repo made before the column existed: executed = label
            table = table.add_column(table.column_names.index("action") + 1, "expert_action", table["action"])
        splits[split] = HFDataset(table.cast(FEATURES.arrow_schema), info=DatasetInfo(features=FEATURES),
                                  fingerprint=shard_fingerprint(files))
    return DatasetDict(splits)


def shard_fingerprint(files: list[Path]) -> str:
    """A `datasets` fingerprint from the shards' paths, sizes and modification times.

    Without one, `Dataset(table)` hashes the whole in-memory table with dill, which reads every byte and fails on some
    environments: on the H200 image (Python 3.12.3) dill could not pickle pyarrow's MonthDayNano (docs/SCALING.md).
    """
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", type=Path, required=True, help="robomimic HDF5 files or folders of them")
    parser.add_argument("--out", type=Path, default=Path("data/hf_dataset"))
    parser.add_argument("--seed", type=int, default=0, help="seeds instruction choice and splits of mask-less files")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="validation share for files without mask/valid")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="max rows per parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out written by vla-preprocess")
    parser.add_argument("--relabel-goals", action="store_true",
                        help="world-model data only: every multi-object scene episode once per goal of its scene, with "
                             "that goal's instruction and success (never for policy data: it pairs instructions with "
                             "episodes that do something else)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        result = preprocess(args.inputs, args.out, args.seed, args.overwrite, args.valid_fraction, args.shard_rows,
                            args.relabel_goals)
        for split in SPLITS:
            print(f"{split}: {result.episodes[split]} episodes, {result.rows[split]} rows, {result.shards[split]} shard(s)")
        print(f"wrote {result.out}")

    run_cli(run)


if __name__ == "__main__":
    main()
