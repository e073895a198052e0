"""`vla-export --format lerobot`: the files of a LeRobotDataset v3.0 (always checked), and lerobot 0.4.4's own
`LeRobotDataset` reading them (where a lerobot virtualenv exists: `python benchmarks/peers/lerobot_diffusion.py
install` builds it; PEERS_LEROBOT_PYTHON points at another)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ENV_NAMES, synthetic_episode

from common.errors import UserError
from data_prep.preprocess import load_vla_dataset, preprocess
from data_prep.robomimic_io import write_robomimic_hdf5
from hub_cards.export import _main as export_main
from hub_cards.export import export_lerobot

REPO = Path(__file__).resolve().parent.parent
LEROBOT_PYTHON = Path(os.environ.get("PEERS_LEROBOT_PYTHON", REPO / ".venv-peers" / "lerobot" / "bin" / "python"))
INDEX_COLUMNS = ["timestamp", "frame_index", "episode_index", "index", "task_index"]
COLUMNS = ["observation.state", "observation.environment_state", "action", *INDEX_COLUMNS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vla-preprocess folder of two tasks whose expert labels differ from the executed actions."""
    folder = tmp_path_factory.mktemp("lerobot_source")
    rng = np.random.default_rng(3)
    files = []
    for task, count in (("lift", 5), ("can", 4)):
        episodes = [synthetic_episode(task, 6 + i % 3, rng) for i in range(count)]
        for episode in episodes:
            episode.expert_actions = np.clip(episode.actions * 0.5 + 0.1, -1, 1)
        path = folder / task / f"{task}.hdf5"
        write_robomimic_hdf5(path, episodes, {"env_name": ENV_NAMES[task], "type": 1, "env_kwargs": {}},
                             valid_fraction=0.25, seed=0)
        files.append(path)
    preprocess(files, folder / "dataset")
    return folder / "dataset"


@pytest.fixture(scope="module")
def exported(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lerobot_export") / "tiny"
    export_lerobot(dataset, "local/tiny", out)
    return out


def source_rows(dataset: Path, splits=("train", "validation"), task: str | None = None) -> dict[str, np.ndarray]:
    """Our rows in export order (splits in order, then episode, step)."""
    parts = []
    for split in splits:
        table = load_vla_dataset(dataset)[split].with_format("numpy")[:]
        keep = np.ones(len(table["episode"]), bool) if task is None else table["task"] == task
        parts.append({k: np.asarray(table[k])[keep] for k in ("task", "instruction", "episode", "step")}
                     | {k: np.stack(table[k])[keep] for k in ("state", "action", "expert_action")})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def frames(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / "data").glob("chunk-*/file-*.parquet"))])


def column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_pylist())


def test_info_describes_a_v3_dataset(exported: Path, dataset: Path) -> None:
    rows = source_rows(dataset)
    info = json.loads((exported / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and info["video_path"] is None
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["total_frames"] == len(rows["step"])
    assert info["total_episodes"] == len(np.unique(rows["episode"]))
    assert info["total_tasks"] == len(set(rows["instruction"]))
    shapes = {k: v["shape"] for k, v in info["features"].items()}
    assert shapes == {"observation.state": [11], "observation.environment_state": [72], "action": [7],
                      **{k: [1] for k in INDEX_COLUMNS}}
    assert len(info["features"]["observation.state"]["names"]) == 11
    train = len(np.unique(source_rows(dataset, ("train",))["episode"]))
    assert info["splits"] == {"train": f"0:{train}", "validation": f"{train}:{info['total_episodes']}"}


def test_frames_are_our_rows_in_lerobots_columns(exported: Path, dataset: Path) -> None:
    rows = source_rows(dataset)
    table = frames(exported)
    assert table.column_names == COLUMNS
    assert b"huggingface" in table.schema.metadata  # as lerobot writes its frames, through `datasets`
    assert table.schema.field("observation.state").type == pa.list_(pa.float32(), 11)
    assert table.schema.field("frame_index").type == pa.int64()
    np.testing.assert_array_equal(column(table, "observation.state"), rows["state"][:, :11])
    np.testing.assert_array_equal(column(table, "observation.environment_state"), rows["state"][:, 11:])
    np.testing.assert_array_equal(column(table, "action"), rows["expert_action"])  # the policies' labels...
    assert not np.allclose(column(table, "action"), rows["action"])  # ... not the executed actions
    np.testing.assert_array_equal(column(table, "frame_index"), rows["step"])
    np.testing.assert_allclose(column(table, "timestamp"), rows["step"] / 20, rtol=1e-6)
    np.testing.assert_array_equal(column(table, "index"), np.arange(len(rows["step"])))
    new_episode = np.r_[True, rows["episode"][1:] != rows["episode"][:-1]]
    np.testing.assert_array_equal(column(table, "episode_index"), np.cumsum(new_episode) - 1)


def test_tasks_and_episodes_metadata(exported: Path, dataset: Path) -> None:
    rows = source_rows(dataset)
    table = frames(exported)
    tasks = pd.read_parquet(exported / "meta" / "tasks.parquet")
    assert list(tasks.index) == list(dict.fromkeys(rows["instruction"]))  # task strings, first seen first
    task_of_frame = np.asarray(tasks.index)[column(table, "task_index")]
    np.testing.assert_array_equal(task_of_frame, rows["instruction"])
    episodes = pq.read_table(exported / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    episode_index = column(table, "episode_index")
    assert [e["episode_index"] for e in episodes] == list(range(episode_index.max() + 1))
    for e in episodes:
        where = np.flatnonzero(episode_index == e["episode_index"])
        assert (e["dataset_from_index"], e["dataset_to_index"], e["length"]) == (where[0], where[-1] + 1, len(where))
        assert e["tasks"] == [rows["instruction"][where[0]]]
        assert (e["data/chunk_index"], e["data/file_index"]) == (0, 0)
        np.testing.assert_allclose(e["stats/action/mean"], rows["expert_action"][where].mean(axis=0), rtol=1e-5)
        assert e["stats/frame_index/count"] == [len(where)]


def test_stats_cover_every_feature(exported: Path, dataset: Path) -> None:
    rows = source_rows(dataset)
    stats = json.loads((exported / "meta" / "stats.json").read_text())
    assert set(stats) == set(COLUMNS)
    for per in stats.values():
        assert set(per) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert stats["action"]["count"] == [len(rows["step"])]
    np.testing.assert_allclose(stats["action"]["min"], rows["expert_action"].min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["max"], rows["state"][:, :11].max(axis=0), rtol=1e-6)
    assert stats["episode_index"]["mean"] == [pytest.approx(column(frames(exported), "episode_index").mean())]


def test_cli_selects_tasks_splits_and_the_action_column(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "can_train"
    export_main(["--dataset-dir", str(dataset), "--format", "lerobot", "--repo-id", "local/can", "--out", str(out),
                 "--tasks", "can", "--splits", "train", "--action-column", "action"])
    rows = source_rows(dataset, ("train",), task="can")
    table = frames(out)
    np.testing.assert_array_equal(column(table, "action"), rows["action"])
    np.testing.assert_array_equal(column(table, "observation.state"), rows["state"][:, :11])
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["splits"] == {"train": f"0:{info['total_episodes']}"}
    assert info["total_episodes"] == len(np.unique(rows["episode"]))


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "stack"], "unknown task 'stack'"),
    (["--push"], "--format lerobot writes a local folder only"),
])
def test_bad_requests_are_one_line_errors_that_write_nothing(dataset: Path, tmp_path: Path, argv: list[str],
                                                             message: str) -> None:
    out = tmp_path / "never"
    with pytest.raises(UserError, match=message):
        export_main(["--dataset-dir", str(dataset), "--format", "lerobot", "--repo-id", "local/x", "--out", str(out),
                     *argv])
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_a_model_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="give --dataset-dir"):
        export_main(["--model-dir", str(tmp_path), "--format", "lerobot", "--repo-id", "local/x"])


def test_lerobot_options_need_the_lerobot_format(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="add --format lerobot"):
        export_main(["--dataset-dir", str(dataset), "--repo-id", "local/x", "--out", str(tmp_path / "x"),
                     "--tasks", "lift"])
    assert not (tmp_path / "x").exists()


def test_lerobots_own_dataset_class_reads_the_export(exported: Path, dataset: Path) -> None:
    if not LEROBOT_PYTHON.is_file():
        pytest.skip(f"no lerobot virtualenv at {LEROBOT_PYTHON}: build it with "
                    "`python benchmarks/peers/lerobot_diffusion.py install` (or set PEERS_LEROBOT_PYTHON)")
    rows = source_rows(dataset)
    last = len(rows["step"]) - 1
    done = subprocess.run([str(LEROBOT_PYTHON), str(REPO / "benchmarks" / "peers" / "lerobot_side.py"), "check",
                           "--root", str(exported), "--repo-id", "local/tiny", "--items", "0", "5", str(last)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    episodes = len(np.unique(rows["episode"]))
    assert (seen["codebase_version"], seen["fps"], seen["num_episodes"], seen["num_frames"]) == (
        "v3.0", 20, episodes, len(rows["step"]))
    assert seen["features"]["observation.environment_state"] == [18]
    assert seen["tasks"] == list(dict.fromkeys(rows["instruction"]))
    np.testing.assert_allclose(seen["action_mean"], rows["expert_action"].mean(axis=0), rtol=1e-4)
    for index, item in zip((0, 5, last), seen["items"], strict=True):
        np.testing.assert_allclose(item["observation.state"], rows["state"][index, :11], rtol=1e-6)
        np.testing.assert_allclose(item["observation.environment_state"], rows["state"][index, 11:], rtol=1e-6)
        assert item["task"] == rows["instruction"][index]
        assert item["frame_index"] == rows["step"][index]
        # the action chunk lerobot's delta timestamps ask for: 4 steps from this frame, padded past the episode end
        same = rows["episode"] == rows["episode"][index]
        ahead = [min(index + k, np.flatnonzero(same)[-1]) for k in range(4)]
        np.testing.assert_allclose(item["action"], rows["expert_action"][ahead], rtol=1e-6)
        assert item["action_is_pad"] == [index + k > np.flatnonzero(same)[-1] for k in range(4)]
