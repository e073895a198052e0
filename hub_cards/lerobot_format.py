"""A `vla-preprocess` folder -> a LeRobotDataset folder (format v3.0, what lerobot 0.4.x reads), without lerobot.

    vla-export --dataset-dir runs/pipeline/dataset --format lerobot --repo-id local/dreaming-vla-lerobot

LeRobot users train on its own dataset class; this writes the files that class expects (read from lerobot 0.4.4's
`lerobot/datasets/lerobot_dataset.py` and `utils.py`, which `tests/test_lerobot_export.py` loads it with when a
lerobot virtualenv exists):

    meta/info.json                              codebase_version "v3.0", fps, features (dtype, shape, names), totals
    meta/stats.json                             per feature: min max mean std count q01 q10 q50 q90 q99
    meta/tasks.parquet                          one row per task string (index) with its task_index
    meta/episodes/chunk-000/file-000.parquet    per episode: tasks, length, where its frames are, its own stats
    data/chunk-000/file-000.parquet             the frames, in (episode_index, frame_index) order
    README.md                                   a card whose `configs:` point the Hub viewer at the frames

Features of a frame: `observation.state` (the robot block of our state: eef position, eef rotation as 6 numbers,
gripper fingers; 11), `observation.environment_state` (the object block, 18, zero-padded for Lift: LeRobot's
Diffusion Policy needs it to accept state-only inputs), `action` (7; `--action-column expert_action`, the label our
policies learn, or `action`, what was executed), and LeRobot's own `timestamp` (step / 20 Hz), `frame_index`,
`episode_index`, `index`, `task_index`. The task string of an episode is its instruction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from data_prep.tasks import ACTION_DIM, STATE_DIM, STATE_SLICES, get_task

CODEBASE_VERSION = "v3.0"  # lerobot 0.4.x's dataset format
FPS = 20  # data_prep.sim.CONTROL_FREQ: one frame per control step
ROBOT_TYPE = "panda"
CHUNKS_SIZE = 1000  # lerobot's DEFAULT_CHUNK_SIZE: files per chunk folder
DATA_FILE_SIZE_IN_MB = 100  # lerobot's DEFAULT_DATA_FILE_SIZE_IN_MB: a data file is closed past this size
VIDEO_FILE_SIZE_IN_MB = 200  # lerobot's default, recorded in info.json though there are no videos
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # lerobot's DEFAULT_QUANTILES, stored as q01 q10 q50 q90 q99
ACTION_COLUMNS = ("expert_action", "action")
SPLITS = ("train", "validation")
ROBOT_BLOCK = slice(STATE_SLICES["eef pos"].start, STATE_SLICES["gripper"].stop)  # 0..10
OBJECT_BLOCK = slice(STATE_SLICES["object pos"].start, STATE_DIM)  # 11..28
ACTION_NAMES = ["dx", "dy", "dz", "dax", "day", "daz", "gripper"]


def block_names(block: slice) -> list[str]:
    """Per-dimension names of a block of the state, from `STATE_SLICES` ("eef pos" -> eef_pos_0, eef_pos_1, ...)."""
    names = []
    for name, part in STATE_SLICES.items():
        if part.start >= block.start and part.stop <= block.stop:
            names += [f"{name.replace(' ', '_').replace('-', '_')}_{i}" for i in range(part.stop - part.start)]
    return names


def lerobot_observation(states: np.ndarray) -> dict[str, np.ndarray]:
    """Our [..., 83] states -> LeRobot's `observation.state` [..., 11] and `observation.environment_state` [..., 72].

    The one mapping: the export writes it and the Diffusion Policy adapter feeds a live state through it."""
    states = np.asarray(states, dtype=np.float32)
    return {"observation.state": states[..., ROBOT_BLOCK], "observation.environment_state": states[..., OBJECT_BLOCK]}


VECTOR_FEATURES = {
    "observation.state": block_names(ROBOT_BLOCK),
    "observation.environment_state": block_names(OBJECT_BLOCK),
    "action": ACTION_NAMES,
}
INDEX_FEATURES = {  # lerobot's DEFAULT_FEATURES, appended after the dataset's own
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}


def info_features() -> dict[str, dict]:
    features = {key: {"dtype": "float32", "shape": [len(names)], "names": names} for key, names in VECTOR_FEATURES.items()}
    features |= {key: {"dtype": dtype, "shape": [1], "names": None} for key, dtype in INDEX_FEATURES.items()}
    return features


def frame_schema() -> pa.Schema:
    """The data files' Arrow schema, as lerobot writes it through `datasets` (features in the schema metadata)."""
    from datasets import Features, List, Value

    features = {key: List(Value("float32"), length=len(names)) for key, names in VECTOR_FEATURES.items()}
    features |= {key: Value(dtype) for key, dtype in INDEX_FEATURES.items()}
    return Features(features).arrow_schema


# --------------------------------------------------------------------------------------------- statistics


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """lerobot's per-feature statistics of [n, d] values: min max mean std count and the quantiles, each [d]."""
    values = np.asarray(values, dtype=np.float64)
    stats = {
        "min": values.min(axis=0),
        "max": values.max(axis=0),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0),
        "count": np.array([len(values)]),
    }
    for q, level in zip(QUANTILES, np.quantile(values, QUANTILES, axis=0), strict=True):
        stats[f"q{round(q * 100):02d}"] = level
    return stats


def frame_stats(frames: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Statistics of every numeric feature ([n] index columns are treated as [n, 1], as lerobot stores them)."""
    return {key: feature_stats(values.reshape(len(values), -1)) for key, values in frames.items()}


def plain_stats(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    return {key: {name: value.tolist() for name, value in per.items()} for key, per in stats.items()}


# --------------------------------------------------------------------------------------------- reading our data


@dataclass
class Episodes:
    """The selected rows of a `vla-preprocess` folder, in export order, as LeRobot columns."""

    frames: dict[str, np.ndarray]  # LeRobot column -> [rows, ...]
    starts: np.ndarray  # first row of each episode, [episodes + 1] with the end appended
    tasks: list[str]  # task string of each episode (its instruction)
    splits: dict[str, str]  # split -> "from:to" episode range


def select_rows(dataset_dir: Path, action_column: str, tasks: list[str] | None, splits: list[str]) -> Episodes:
    from data_prep.preprocess import load_vla_dataset

    if action_column not in ACTION_COLUMNS:
        raise UserError(f"--action-column {action_column!r}: expected one of {list(ACTION_COLUMNS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise UserError(f"--splits {unknown[0]!r}: expected some of {list(SPLITS)}")
    data = load_vla_dataset(dataset_dir)
    columns = ["task", "instruction", "episode", "step", "state", action_column]
    parts, split_ranges, first_episode = [], {}, 0
    for split in dict.fromkeys(splits):
        table = data[split].select_columns(columns).with_format("numpy")[:]
        keep = np.ones(len(table["episode"]), bool) if tasks is None else np.isin(table["task"], tasks)
        rows = {key: np.asarray(table[key])[keep] for key in columns}
        order = np.lexsort((rows["step"], rows["episode"]))  # vla-preprocess sorts so already; cheap to make sure
        rows = {key: value[order] for key, value in rows.items()}
        count = len(np.unique(rows["episode"]))
        split_ranges[split] = f"{first_episode}:{first_episode + count}"
        first_episode += count
        parts.append(rows)
    rows = {key: np.concatenate([p[key] for p in parts]) for key in columns}
    if not len(rows["episode"]):
        raise UserError(f"{dataset_dir}: no rows of tasks {tasks} in splits {splits}")
    # Episode ids are unique over the whole repo, so a new id (or a new split) starts a new episode.
    new = np.r_[True, rows["episode"][1:] != rows["episode"][:-1]]
    starts = np.r_[np.flatnonzero(new), len(new)]
    episode_index = np.cumsum(new) - 1
    steps = rows["step"].astype(np.int64)
    expected = np.arange(len(steps)) - starts[episode_index]
    if not np.array_equal(steps, expected):
        bad = rows["episode"][np.flatnonzero(steps != expected)[0]]
        raise UserError(f"{dataset_dir}: episode {bad} does not hold steps 0, 1, 2, ... in order")
    state = np.stack(rows["state"]).astype(np.float32)
    action = np.stack(rows[action_column]).astype(np.float32)
    for name, values in (("state", state), (action_column, action)):
        if not np.isfinite(values).all():
            bad = rows["episode"][np.flatnonzero(~np.isfinite(values).all(axis=1))[0]]
            raise UserError(f"{dataset_dir}: column {name!r} of episode {bad} holds non-finite values")
    if state.shape[1:] != (STATE_DIM,) or action.shape[1:] != (ACTION_DIM,):
        raise UserError(f"{dataset_dir}: state/action widths {state.shape[1:]}/{action.shape[1:]}, expected {STATE_DIM}/{ACTION_DIM}")
    task_strings = [str(rows["instruction"][i]) for i in starts[:-1]]
    unique_tasks = list(dict.fromkeys(task_strings))
    frames = {
        **lerobot_observation(state),
        "action": action,
        "timestamp": (steps / FPS).astype(np.float32),
        "frame_index": steps,
        "episode_index": episode_index.astype(np.int64),
        "index": np.arange(len(steps), dtype=np.int64),
        "task_index": np.array([unique_tasks.index(task_strings[e]) for e in episode_index], dtype=np.int64),
    }
    return Episodes(frames, starts, task_strings, split_ranges)


# --------------------------------------------------------------------------------------------- writing


def data_files(episodes: Episodes) -> list[tuple[int, int, int, int]]:
    """(chunk, file, first row, end row) of each data file: whole episodes, at most DATA_FILE_SIZE_IN_MB each."""
    row_bytes = sum(v.reshape(len(v), -1).shape[1] * v.itemsize for v in episodes.frames.values())
    rows_per_file = max(1, int(DATA_FILE_SIZE_IN_MB * 1024**2 // row_bytes))
    files, first, number = [], 0, 0
    for start, end in zip(episodes.starts[:-1], episodes.starts[1:], strict=True):
        if end - first > rows_per_file and start > first:  # this episode would overfill the file: start a new one
            files.append((number // CHUNKS_SIZE, number % CHUNKS_SIZE, first, int(start)))
            number, first = number + 1, int(start)
    files.append((number // CHUNKS_SIZE, number % CHUNKS_SIZE, first, int(episodes.starts[-1])))
    return files


def write_frames(episodes: Episodes, root: Path) -> list[tuple[int, int]]:
    """Write the data files; returns each episode's (chunk, file)."""
    schema = frame_schema()
    where = []
    for chunk, file, first, end in data_files(episodes):
        path = root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {}
        for key, field in zip(schema.names, schema, strict=True):
            values = episodes.frames[key][first:end]
            if values.ndim == 2:
                columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])
            else:
                columns[key] = pa.array(values, field.type)
        pq.write_table(pa.table(columns, schema=schema), path, compression="snappy", use_dictionary=True)
        where += [(chunk, file)] * int(np.sum((episodes.starts[:-1] >= first) & (episodes.starts[:-1] < end)))
    return where


def write_episodes_meta(episodes: Episodes, where: list[tuple[int, int]], root: Path) -> None:
    """meta/episodes: one row per episode, columns in the order lerobot's `save_episode` writes them."""
    rows: dict[str, list] = {}

    def add(key: str, value) -> None:
        rows.setdefault(key, []).append(value)

    for e, (first, end) in enumerate(zip(episodes.starts[:-1], episodes.starts[1:], strict=True)):
        add("episode_index", e)
        add("tasks", [episodes.tasks[e]])
        add("length", int(end - first))
        add("data/chunk_index", where[e][0])
        add("data/file_index", where[e][1])
        add("dataset_from_index", int(first))
        add("dataset_to_index", int(end))
        stats = frame_stats({key: values[first:end] for key, values in episodes.frames.items()})
        for key, per in stats.items():
            for name, value in per.items():
                add(f"stats/{key}/{name}", value.tolist())
        add("meta/episodes/chunk_index", 0)
        add("meta/episodes/file_index", 0)
    path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(rows), path, compression="snappy", use_dictionary=True)


def write_tasks(episodes: Episodes, root: Path) -> None:
    """meta/tasks.parquet as lerobot writes it: a pandas frame indexed by the task string, column task_index."""
    import pandas as pd

    unique = list(dict.fromkeys(episodes.tasks))
    pd.DataFrame({"task_index": range(len(unique))}, index=unique).to_parquet(root / "meta" / "tasks.parquet")


def info_json(episodes: Episodes) -> dict:
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": ROBOT_TYPE,
        "total_episodes": len(episodes.tasks),
        "total_frames": int(episodes.starts[-1]),
        "total_tasks": len(set(episodes.tasks)),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": VIDEO_FILE_SIZE_IN_MB,
        "fps": FPS,
        "splits": episodes.splits,
        "data_path": DATA_PATH,
        "video_path": None,
        "features": info_features(),
    }


def card(repo_id: str, dataset_dir: Path, action_column: str, episodes: Episodes) -> str:
    return "\n".join([
        "---",
        "license: mit",
        "task_categories:",
        "- robotics",
        "tags:",
        "- LeRobot",
        "- robomimic",
        "- robosuite",
        "configs:",
        "- config_name: default",
        "  data_files: data/*/*.parquet",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A LeRobotDataset (format {CODEBASE_VERSION}, lerobot 0.4.x) exported by `vla-export --format lerobot` of the "
        f"dreaming-vla project from `{dataset_dir.name}`: {len(episodes.tasks)} episodes, {int(episodes.starts[-1])} "
        f"frames at {FPS} Hz of a simulated Panda arm in robosuite (low-dimensional states, no images).",
        "",
        "- `observation.state` (11): end-effector position, rotation (first two columns of its rotation matrix), "
        "gripper finger positions.",
        "- `observation.environment_state` (18): the object's position and rotation, then its pose relative to the "
        "end effector (Lift: 12 values, then 6 zeros).",
        f"- `action` (7): OSC_POSE delta in [-1, 1], last = gripper; from the column `{action_column}`"
        + (" (the scripted expert's noise-free action, what the project's policies learn)." if action_column ==
           "expert_action" else " (the action executed in the simulator)."),
        "- the task string of each episode is its language instruction.",
        "",
        "```python",
        "from lerobot.datasets.lerobot_dataset import LeRobotDataset",
        f'dataset = LeRobotDataset("{repo_id}", root="<this folder>")',
        "```",
        "",
    ])


@dataclass(frozen=True)
class LeRobotExport:
    folder: Path
    episodes: int
    frames: int
    tasks: int


def write_lerobot_dataset(dataset_dir: Path, repo_id: str, folder: Path, action_column: str = "expert_action",
                          tasks: list[str] | None = None, splits: list[str] | None = None) -> LeRobotExport:
    """Write the LeRobotDataset of `dataset_dir` (a vla-preprocess folder) into the new folder `folder`.

    Everything is read and checked before the first file is written; `vla-export` writes into a staging folder
    and renames it into place."""
    for task in tasks or []:
        get_task(task)
    episodes = select_rows(Path(dataset_dir), action_column, tasks, list(splits or SPLITS))
    (folder / "meta").mkdir(parents=True)
    where = write_frames(episodes, folder)
    write_episodes_meta(episodes, where, folder)
    write_tasks(episodes, folder)
    (folder / "meta" / "stats.json").write_text(json.dumps(plain_stats(frame_stats(episodes.frames)), indent=4))
    (folder / "meta" / "info.json").write_text(json.dumps(info_json(episodes), indent=4))
    (folder / "README.md").write_text(card(repo_id, Path(dataset_dir), action_column, episodes))
    return LeRobotExport(folder, len(episodes.tasks), int(episodes.starts[-1]), len(set(episodes.tasks)))
