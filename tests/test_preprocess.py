"""vla-preprocess: robomimic HDF5 -> Hugging Face dataset repo (parquet + card + normalisation)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from datasets import load_dataset

from common.errors import UserError
from data_prep import preprocess as pp
from data_prep.tasks import STATE_DIM, STATE_LAYOUT, STATE_SLICES, instructions_for, state_from_obs

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).with_name("fixtures")


@pytest.fixture(scope="module")
def inputs(make_robomimic_file, make_downloaded_style_file) -> dict[str, Path]:
    return {
        "lift": make_robomimic_file("lift", episodes=10, steps=8, seed=3, valid_fraction=0.2),
        "can": make_downloaded_style_file("can", episodes=6, steps=9),
    }


@pytest.fixture(scope="module")
def converted(inputs, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("converted")
    out = root / "hf_dataset"
    pp.preprocess([inputs["lift"], inputs["can"].parent], out, seed=0, shard_rows=40)
    dataset = load_dataset(str(out), cache_dir=str(root / "cache"))
    return out, {split: dataset[split].with_format("numpy")[:] for split in pp.SPLITS}


def test_repo_layout(converted):
    out, rows = converted
    assert sorted(p.name for p in out.iterdir()) == [".vla-output.json", "README.md", "data", "instructions.json",
                                                     "normalization.json"]  # the first: who wrote it (common/atomic.py)
    n_train = -(-len(rows["train"]["episode"]) // 40)  # shard_rows=40
    assert n_train > 1
    expected = [f"train-{i:05d}-of-{n_train:05d}.parquet" for i in range(n_train)] + ["validation-00000-of-00001.parquet"]
    assert sorted(p.name for p in (out / "data").iterdir()) == expected
    assert json.loads((out / "instructions.json").read_text())["lift"]["validation"] == instructions_for("lift", "validation")
    assert not list(out.parent.glob("hf_dataset.tmp-*"))


def test_rows_match_the_source_files(converted, inputs):
    _, rows = converted
    every = {k: np.concatenate([rows[s][k] for s in pp.SPLITS]) for k in ("task", "state", "state_mask", "action", "source")}
    assert every["state"].shape[1:] == (STATE_DIM,) and every["action"].shape[1:] == (7,)
    lift, can = every["task"] == "lift", every["task"] == "can"
    assert lift.sum() == sum(8 + i % 3 for i in range(10)) and can.sum() == sum(9 + i % 3 for i in range(6))
    lift_mask = np.r_[np.ones(23), np.zeros(STATE_DIM - 23)]  # robot, then slot 0: no object-to-eef rotation
    can_mask = np.r_[np.ones(29), np.zeros(STATE_DIM - 29)]  # robot, then all of slot 0; the other slots are empty
    assert (every["state_mask"][lift] == lift_mask).all() and (every["state_mask"][can] == can_mask).all()
    assert (every["state"][lift][:, STATE_SLICES["object-eef rot"]] == 0).all()
    assert set(every["source"][can]) == {"low_dim_v15.hdf5"}
    # one episode, value by value, against the raw HDF5 arrays
    train = rows["train"]
    first_can = train["episode"][train["task"] == "can"].min()
    rows_of = train["episode"] == first_can
    with h5py.File(inputs["can"], "r") as f:
        demo = f["data/demo_1"]  # demo_0 is the file's validation demo
        keys = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
        for column, group in (("state", "obs"), ("next_state", "next_obs")):
            expected, _ = state_from_obs({k: demo[f"{group}/{k}"][()] for k in keys}, "can")
            np.testing.assert_allclose(train[column][rows_of], expected, rtol=1e-6)
        np.testing.assert_allclose(train["state"][rows_of][:, :3], demo["obs/robot0_eef_pos"][()], rtol=1e-6)
        np.testing.assert_allclose(train["action"][rows_of], demo["actions"][()], rtol=1e-6)
        # robomimic's files hold no expert labels: the executed actions are the labels
        np.testing.assert_array_equal(train["expert_action"][rows_of], train["action"][rows_of])
        np.testing.assert_array_equal(train["done"][rows_of], demo["dones"][()].astype(bool))
    np.testing.assert_array_equal(train["step"][rows_of], np.arange(rows_of.sum()))


def test_expert_labels_become_the_expert_action_column(tmp_path):
    generated = FIXTURES / "tiny_lift.hdf5"  # made before the labels existed: copy it and add them
    path = tmp_path / "labelled.hdf5"
    path.write_bytes(generated.read_bytes())
    labels = {}
    with h5py.File(path, "a") as f:
        for name in ("demo_0", "demo_1"):
            labels[name] = np.random.default_rng(len(name)).uniform(-1, 1, f[f"data/{name}/actions"].shape)
            f[f"data/{name}"].create_dataset("expert_actions", data=labels[name])
    columns = pp.collect([path], seed=0, valid_fraction=0.5).columns
    every = {k: np.concatenate([columns[s][k] for s in pp.SPLITS]) for k in ("episode", "action", "expert_action")}
    for episode, name in enumerate(("demo_0", "demo_1")):  # episode ids follow the file's demo order
        rows = every["episode"] == episode
        np.testing.assert_allclose(every["expert_action"][rows], labels[name], rtol=1e-6)
        assert not np.allclose(every["expert_action"][rows], every["action"][rows])


def test_split_is_by_episode_and_follows_file_masks(converted, inputs):
    _, rows = converted
    train_eps, valid_eps = set(rows["train"]["episode"]), set(rows["validation"]["episode"])
    assert not train_eps & valid_eps
    assert len(train_eps | valid_eps) == 16  # unique episode ids over both files
    for split in pp.SPLITS:
        order = np.lexsort((rows[split]["step"], rows[split]["episode"]))
        assert (order == np.arange(len(order))).all()  # sorted by (episode, step)
    valid = rows["validation"]
    with h5py.File(inputs["lift"], "r") as f:
        lift_valid = len(f["mask/valid"][()])
    assert len(set(valid["episode"][valid["task"] == "lift"])) == lift_valid == 2
    assert len(set(valid["episode"][valid["task"] == "can"])) == 1  # the raw file's mask/valid = [demo_0]


def test_instructions_one_per_episode_and_validation_ones_held_out(converted):
    _, rows = converted
    for split in pp.SPLITS:
        r = rows[split]
        for episode in set(r["episode"]):
            assert len(set(r["instruction"][r["episode"] == episode])) == 1
        for task in ("lift", "can"):
            assert set(r["instruction"][r["task"] == task]) <= set(instructions_for(task, split))
    train_texts = {t for task in ("lift", "can") for t in instructions_for(task, "train")}
    assert not set(rows["validation"]["instruction"]) & train_texts
    assert len(set(rows["train"]["instruction"][rows["train"]["task"] == "lift"])) > 1  # paraphrases actually vary


def test_success_is_sparse_reward(converted):
    _, rows = converted
    for split in pp.SPLITS:
        np.testing.assert_array_equal(rows[split]["success"], rows[split]["reward"] > 0)
        assert rows[split]["success"].any()


def test_normalization_matches_numpy_on_train_rows(converted):
    out, rows = converted
    stats = json.loads((out / "normalization.json").read_text())
    norm = pp.load_normalization(out)
    assert stats["state_layout"] == norm.state_layout == STATE_LAYOUT
    train = rows["train"]
    state, action, can = train["state"].astype(np.float64), train["action"].astype(np.float64), train["task"] == "can"
    real = STATE_SLICES["object-eef rot"].start  # the dims every task fills
    np.testing.assert_allclose(norm.state.mean[:real], state[:, :real].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.state.std[:real], state[:, :real].std(0), rtol=1e-4)
    # the object-to-eef rotation is padding on lift rows: its statistics come from can rows only
    np.testing.assert_allclose(norm.state.mean[real:], state[can][:, real:].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.state.min[real:], state[can][:, real:].min(0), rtol=1e-6)
    np.testing.assert_allclose(norm.action.mean, action.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.action.std, action.std(0), rtol=1e-4)
    np.testing.assert_allclose(norm.action.max, action.max(0), rtol=1e-6)


def test_dimension_stats_floor_and_unseen_padding():
    values = np.array([[1.0, 5.0, 0.0], [1.0, 7.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    stats = pp.dimension_stats(values, mask)
    assert stats["std"][0] == pp.STD_FLOOR  # constant column
    assert stats["mean"][1] == 6.0 and stats["std"][1] == 1.0
    assert stats["mean"][2] == 0.0 and stats["std"][2] == 1.0  # padding everywhere


def test_card_header_and_body(converted):
    out, _ = converted
    text = (out / "README.md").read_text()
    header = text.split("---")[1]
    for needle in ("license: mit", "- robotics", "configs:", "path: data/train-*", "path: data/validation-*"):
        assert needle in header
    for needle in ("| lift | train |", "| can | validation | 1 |", "Hoist the red block into the air",
                   "| `low_dim_v15.hdf5` | can | robomimic |", "| `lift_demo.hdf5` | lift | generated |", f"`float32[{STATE_DIM}]`"):
        assert needle in text


def test_cli_output_loads_offline_in_a_fresh_process(inputs, tmp_path):
    out = tmp_path / "repo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "data_prep.preprocess", "--inputs", str(inputs["lift"]), str(inputs["can"]),
           "--out", str(out), "--seed", "5"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train:" in done.stdout and "wrote" in done.stdout
    check = ("import datasets, sys; d = datasets.load_dataset(sys.argv[1]); "
             "print(sorted(d), len(d['train'][0]['state']), d['validation'].num_rows)")
    loaded = subprocess.run([sys.executable, "-c", check, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[:3] == ["['train',", "'validation']", str(STATE_DIM)]


def test_refuses_existing_output_unless_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "repo"
    pp.main(["--inputs", str(inputs["lift"]), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    (out / "normalization.json").unlink()
    pp.main(["--inputs", str(inputs["lift"]), "--out", str(out), "--overwrite"])  # its own output: replaced
    assert (out / "normalization.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_overwrite_never_replaces_a_folder_it_did_not_write(inputs, tmp_path, capsys):
    """Issue 40, case 1: --overwrite replaced any folder, its unrelated files deleted."""
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 2 and "not written by vla-preprocess" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("relation", ["is", "contains", "lies inside"])
def test_out_overlapping_an_input_is_refused_and_deletes_nothing(relation, tmp_path, capsys):
    """Issue 40, case 1: `--inputs D --out D --overwrite` (or --out a parent of D) deleted the raw inputs."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(FIXTURES / "tiny_lift.hdf5", raw / "tiny_lift.hdf5")
    (tmp_path / "notes.txt").write_text("mine")
    out = {"is": raw, "contains": tmp_path, "lies inside": raw / "dataset"}[relation]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(raw), "--out", str(out), "--overwrite"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and f"{relation} the input" in errors[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_folder_made_at_out_during_the_run_is_kept(inputs, tmp_path, monkeypatch, capsys):
    """Issue 40, case 1: the "already exists" check ran only before reading; what appeared meanwhile was deleted."""
    out = tmp_path / "repo"
    real_write_split = pp.write_split

    def write_split_then_someone_makes_out(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("made while vla-preprocess ran")
        return real_write_split(*args, **kwargs)

    monkeypatch.setattr(pp, "write_split", write_split_then_someone_makes_out)
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), "--out", str(out)])
    assert exit_info.value.code == 2 and "appeared while vla-preprocess ran" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporary folder left


def test_temporary_folders_of_killed_runs_are_removed(inputs, tmp_path):
    """Issue 40, case 1: a SIGKILLed run left <out>.tmp-<pid> behind forever."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"repo.tmp-{dead.pid}"
    (stale / "data").mkdir(parents=True)
    pp.preprocess([inputs["lift"]], tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_unwritable_out_is_one_line(inputs, unwritable_folder, capsys):
    """Issue 40, case 6: a read-only output folder gave a PermissionError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), "--out", str(unwritable_folder / "vla-test-dataset")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write there" in err and "Traceback" not in err


def test_zero_shard_rows_is_one_line(inputs, tmp_path, capsys):
    """Issue 40, case 6: --shard-rows 0 gave a ZeroDivisionError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), "--out", str(tmp_path / "repo"), "--shard-rows", "0"])
    assert exit_info.value.code == 2 and "--shard-rows" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_file_without_masks_gets_seeded_split(make_downloaded_style_file, tmp_path):
    path = make_downloaded_style_file("square", episodes=10, masks=False)
    a = pp.preprocess([path], tmp_path / "a", seed=1)
    b = pp.preprocess([path], tmp_path / "b", seed=1)
    assert a.episodes == b.episodes == {"train": 9, "validation": 1}
    assert (tmp_path / "a/data/validation-00000-of-00001.parquet").read_bytes() == \
        (tmp_path / "b/data/validation-00000-of-00001.parquet").read_bytes()


def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def narrow_actions(f: h5py.File) -> None:
    actions = f["data/demo_1/actions"][()]
    del f["data/demo_1/actions"]
    f["data/demo_1"].create_dataset("actions", data=actions[:, :6])


def set_value(key: str, index: tuple, value: float):
    def edit(f: h5py.File) -> None:
        values = f[key][()]
        values[index] = value
        f[key][...] = values

    return edit


def zero_length_episode(f: h5py.File) -> None:
    demo = f["data/demo_1"]
    for group in ("obs", "next_obs"):
        for key in list(demo[group]):
            width = demo[group][key].shape[1:]
            del demo[group][key]
            demo[group].create_dataset(key, data=np.zeros((0, *width)))
    for key in ("actions", "rewards", "dones", "states"):
        width = demo[key].shape[1:]
        del demo[key]
        demo.create_dataset(key, data=np.zeros((0, *width)))


def string_actions(f: h5py.File) -> None:
    actions = f["data/demo_1/actions"][()]
    del f["data/demo_1/actions"]
    f["data/demo_1"].create_dataset("actions", data=actions.astype(str).astype("S"))


BAD_INPUTS = {
    # issue 40, case 2: non-finite numbers were written into the Parquet rows and normalization.json
    "nan_obs": (set_value("data/demo_1/obs/robot0_eef_pos", (3, 1), np.nan), "data/demo_1/obs/robot0_eef_pos"),
    "inf_actions": (set_value("data/demo_1/actions", (2, 0), -np.inf), "data/demo_1/actions"),
    "nan_next_obs": (set_value("data/demo_1/next_obs/object", (0, 2), np.nan), "data/demo_1/next_obs/object"),
    # issue 40, case 6: tracebacks
    "zero_length": (zero_length_episode, "data/demo_1 has no steps"),
    "string_actions": (string_actions, "data/demo_1/actions is stored as"),
    "missing": (None, "file not found"),
    "corrupt": ("garbage", "cannot read as HDF5"),
    "truncated": ("truncate", "truncated or corrupt"),
    "missing_obs_key": (lambda f: f.__delitem__("data/demo_1/next_obs/robot0_eef_quat"), "missing observation key 'robot0_eef_quat'"),
    "unknown_env": (lambda f: f["data"].attrs.__setitem__("env_args", json.dumps({"env_name": "Door"})), "unknown env_name 'Door'"),
    "action_width": (narrow_actions, "data/demo_1/actions has width 6, expected 7"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, inputs, tmp_path, capsys):
    edit, message = BAD_INPUTS[case]
    bad = tmp_path / "in" / f"{case}.hdf5"
    bad.parent.mkdir()
    if edit == "garbage":
        bad.write_bytes(os.urandom(4096))
    elif edit == "truncate":
        content = inputs["can"].read_bytes()
        bad.write_bytes(content[: len(content) // 2])
    elif edit is not None:
        edited_copy(inputs["can"], bad, edit)
    out = tmp_path / "out" / "repo"
    with pytest.raises(SystemExit) as exit_info:
        pp.main(["--inputs", str(inputs["lift"]), str(bad), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    assert len(errors) == 1 and message in errors[0] and str(bad) in errors[0] and "Traceback" not in err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.hdf5 files"):
        pp.preprocess([tmp_path / "empty"], tmp_path / "out")


@pytest.mark.parametrize("layout", ["something-else", "eef_pos3+eef_rot6+gripper_qpos2+object18pad.rot6"])
def test_layout_mismatch_is_refused(converted, tmp_path, layout):
    """Another layout, the one-object layout before issue 46 included, is refused in one line."""
    out, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stats = json.loads((copy / "normalization.json").read_text())
    stats["state_layout"] = layout
    (copy / "normalization.json").write_text(json.dumps(stats))
    with pytest.raises(UserError, match=f"state_layout '{re.escape(layout)}' does not match"):
        pp.load_vla_dataset(copy)


def test_load_vla_dataset(converted, tmp_path):
    out, rows = converted
    dataset = pp.load_vla_dataset(out, cache_dir=str(tmp_path / "cache"))
    assert dataset["train"].num_rows == len(rows["train"]["episode"])
    assert dataset["validation"].features["state"].length == STATE_DIM


def test_in_memory_load_never_hashes_the_table(converted, tmp_path):
    """Fingerprints come from the shard files: datasets' dill hashing of a table (refused for every test by conftest's
    `datasets_never_hash_tables`; it failed on the H200 image, docs/SCALING.md) is never reached."""
    out, rows = converted
    first, again = pp.load_vla_dataset(out), pp.load_vla_dataset(out)
    assert first["train"].num_rows == len(rows["train"]["episode"])
    assert first["train"]._fingerprint == again["train"]._fingerprint != first["validation"]._fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert pp.load_vla_dataset(copy)["train"]._fingerprint != first["train"]._fingerprint
    # writing a repo does not hash its tables either
    result = pp.preprocess(sorted(FIXTURES.rglob("*.hdf5")), tmp_path / "written")
    assert result.rows["train"] == pp.load_vla_dataset(tmp_path / "written")["train"].num_rows > 0


@pytest.mark.skipif(not list(FIXTURES.rglob("*.hdf5")), reason="no vla-generate fixtures shipped in tests/fixtures")
def test_shipped_generated_fixtures_convert(tmp_path):
    files = sorted(FIXTURES.rglob("*.hdf5"))
    result = pp.preprocess(files, tmp_path / "repo")
    assert result.rows["train"] > 0
    dataset = pp.load_vla_dataset(tmp_path / "repo", cache_dir=str(tmp_path / "cache"))
    tasks = {pp.read_robomimic_hdf5(f).task for f in files}
    assert set(dataset["train"]["task"]) | set(dataset["validation"]["task"]) == tasks


def test_source_labels_tell_same_named_files_apart(tmp_path):
    raw, play, other = (tmp_path / "raw/lift/x.hdf5", tmp_path / "raw_play/lift/x.hdf5", tmp_path / "raw/can/y.hdf5")
    assert pp.source_labels([raw, play, other]) == {raw: "raw/lift/x.hdf5", play: "raw_play/lift/x.hdf5", other: "y.hdf5"}
    can = tmp_path / "raw/can/x.hdf5"
    assert pp.source_labels([raw, can]) == {raw: "lift/x.hdf5", can: "can/x.hdf5"}


def test_demos_and_play_data_merge_into_one_dataset(tmp_path):
    """`vla-preprocess --inputs raw raw_play`: both sources, unique episode ids, failures never successful."""
    from conftest import ENV_NAMES, synthetic_episode

    from data_prep.robomimic_io import write_robomimic_hdf5

    rng = np.random.default_rng(0)
    env_args = {"env_name": ENV_NAMES["lift"], "type": 1, "env_kwargs": {}}
    demos = [synthetic_episode("lift", 6, rng) for _ in range(3)]
    failures = [synthetic_episode("lift", 7, rng) for _ in range(2)]
    for episode in failures:  # play data: ran to the horizon without success
        episode.rewards[:] = 0
        episode.dones[:] = 0
    write_robomimic_hdf5(tmp_path / "raw/lift/low_dim_generated.hdf5", demos, env_args, valid_fraction=0.34)
    write_robomimic_hdf5(tmp_path / "raw_play/lift/low_dim_generated.hdf5", [demos[0], *failures], env_args,
                         valid_fraction=0.34)
    result = pp.preprocess([tmp_path / "raw", tmp_path / "raw_play"], tmp_path / "merged")
    rows = pp.load_vla_dataset(tmp_path / "merged")
    every = {k: np.concatenate([rows[s].with_format("numpy")[k] for s in pp.SPLITS]) for k in ("episode", "source", "success", "done")}
    assert sum(result.episodes.values()) == len(np.unique(every["episode"])) == 6
    play = every["source"] == "raw_play/lift/low_dim_generated.hdf5"
    assert set(every["source"]) == {"raw/lift/low_dim_generated.hdf5", "raw_play/lift/low_dim_generated.hdf5"}
    assert play.sum() == 6 + 2 * 7 and (~play).sum() == 3 * 6
    for episode in np.unique(every["episode"][play]):
        rows_of = every["episode"] == episode
        solved = every["success"][rows_of].any()
        assert every["done"][rows_of].sum() == int(solved)  # the copied demo is done once, failures never
    assert (~every["success"][play]).sum() >= 2 * 7
    card = (tmp_path / "merged/README.md").read_text()
    lines = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| `raw")}
    assert lines["raw/lift/low_dim_generated.hdf5"].startswith("| `raw/lift/low_dim_generated.hdf5` | lift | generated |")
    assert lines["raw/lift/low_dim_generated.hdf5"].endswith("| 0 |")  # failed episodes
    assert lines["raw_play/lift/low_dim_generated.hdf5"].endswith("| 2 |")


def test_linked_task_folders_are_searched(tmp_path):
    # a build that reuses another build's task folders by linking them must not silently lose those tasks
    (tmp_path / "raw" / "lift").mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny_lift.hdf5", tmp_path / "raw" / "lift" / "low_dim_generated.hdf5")
    (tmp_path / "raw_v2" / "square").mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny_square.hdf5", tmp_path / "raw_v2" / "square" / "low_dim_generated.hdf5")
    os.symlink("../raw/lift", tmp_path / "raw_v2" / "lift")
    os.symlink("..", tmp_path / "raw_v2" / "square" / "loop")  # a cycle ends the walk instead of recursing forever
    found = pp.find_inputs([tmp_path / "raw_v2"])
    assert sorted(p.parent.name for p in found) == ["lift", "square"]


def test_relabel_goals_shows_the_world_model_each_episode_under_every_goal_of_its_scene(tmp_path):
    """Issue 46, point 4: two red-cube demos become four episodes: succeeding for the red goal's instructions, never
    for the green goal's; the states are the same, the labels come from each goal's rule on the recorded states."""
    fixture = FIXTURES / "tiny_cubes_red.hdf5"
    pp.preprocess([fixture], tmp_path / "plain", seed=0)
    pp.preprocess([fixture], tmp_path / "relabelled", seed=0, relabel_goals=True)
    plain, relabelled = (pp.load_vla_dataset(tmp_path / name) for name in ("plain", "relabelled"))
    rows = {split: relabelled[split].with_format("numpy")[:] for split in pp.SPLITS}
    every = {k: np.concatenate([rows[s][k] for s in pp.SPLITS]) for k in ("task", "instruction", "episode", "success",
                                                                           "reward", "state")}
    assert len(set(every["episode"])) == 2 * sum(len(set(plain[s]["episode"])) for s in pp.SPLITS) == 4
    red, green = every["task"] == "cubes_red", every["task"] == "cubes_green"
    np.testing.assert_array_equal(every["state"][red], every["state"][green])  # the same steps, twice
    assert every["success"][red].any() and not every["success"][green].any()
    np.testing.assert_array_equal(every["reward"], every["success"].astype(np.float32))
    plain_success = np.concatenate([plain[s].with_format("numpy")[:]["success"] for s in pp.SPLITS])
    assert np.sum(plain_success != every["success"][red]) <= 1  # pose rule vs simulator: a threshold step at most
    assert set(every["instruction"][green]) <= set(instructions_for("cubes_green", "train")
                                                   + instructions_for("cubes_green", "validation"))


def test_every_rows_mask_is_the_one_a_policy_reads_off_its_state(converted):
    """Acting, a policy sees only the state (modeling_geometry.layout_mask); training rows carry the dataset's mask."""
    import torch

    from modeling_geometry import layout_mask

    _, rows = converted
    for split in pp.SPLITS:
        state, mask = rows[split]["state"], rows[split]["state_mask"]
        np.testing.assert_array_equal(layout_mask(torch.as_tensor(state)).numpy(), mask)
