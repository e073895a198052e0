"""The one robomimic reader/writer: layout, round trip, and one-line errors for bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.errors import UserError
from data_prep.robomimic_io import Episode, read_robomimic_hdf5, write_robomimic_hdf5
from data_prep.tasks import STATE_DIM, STATE_SLICES, state_from_obs

STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")


def test_writer_produces_robomimic_layout(make_robomimic_file):
    path = make_robomimic_file("lift", episodes=12, steps=5, valid_fraction=0.25)
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["env_args"])["env_name"] == "Lift"
        lengths = [data[f"demo_{i}"].attrs["num_samples"] for i in range(12)]
        assert data.attrs["total"] == sum(lengths)
        demo = data["demo_3"]
        assert set(demo) == {"obs", "next_obs", "actions", "rewards", "dones", "states"}
        assert demo["actions"].shape == (lengths[3], 7) and demo["obs/object"].shape == (lengths[3], 10)
        assert demo.attrs["model_file"] == "<mujoco/>"
        train, valid = (list(f[f"mask/{k}"][()]) for k in ("train", "valid"))
    assert all(isinstance(name, bytes) for name in train + valid)
    assert len(valid) == 3 and not set(train) & set(valid)
    assert sorted(train + valid) == sorted(f"demo_{i}".encode() for i in range(12))


def test_round_trip_and_numeric_demo_order(make_robomimic_file):
    source = read_robomimic_hdf5(make_robomimic_file("can", episodes=12, steps=6))
    assert source.task == "can" and source.origin == "generated"
    assert source.demo_names == [f"demo_{i}" for i in range(12)]  # demo_10 after demo_9
    episodes = list(source)
    assert [e.name for e in episodes] == source.demo_names
    again = source.episode("demo_10")
    np.testing.assert_array_equal(again.actions, episodes[10].actions)
    state, mask = source.state(again)
    assert state.shape == (len(again), STATE_DIM) and mask.sum(1).min() == 29  # can's object fills slot 0
    np.testing.assert_allclose(state, state_from_obs(again.obs, "can")[0], rtol=1e-6)
    np.testing.assert_allclose(state[:, STATE_SLICES["object pos"]], again.obs["object"][:, :3], rtol=1e-6)
    np.testing.assert_allclose(source.state(again, "next_obs")[0][:-1], state[1:], rtol=1e-6)


def test_downloaded_style_file_is_read_by_the_same_code(make_downloaded_style_file):
    path = make_downloaded_style_file("lift", episodes=4)
    source = read_robomimic_hdf5(path)
    assert source.task == "lift" and source.origin == "robomimic"
    assert source.env_args["env_version"] == "1.5.1"
    assert source.masks["valid"] == ["demo_0"] and source.masks["20_percent"] == ["demo_0", "demo_1"]
    episode = source.episode("demo_2")
    assert episode.model_file == "<mujoco model='base'/>" and episode.dones.dtype == bool
    state, mask = source.state(episode)
    with h5py.File(path, "r") as f:
        expected, _ = state_from_obs({k: f[f"data/demo_2/obs/{k}"][()] for k in STATE_KEYS}, "lift")
    np.testing.assert_allclose(state, expected, rtol=1e-6)
    padding = STATE_SLICES["object-eef rot"]  # lift has no object-to-eef rotation
    assert (state[:, padding] == 0).all() and (mask[:, padding] == 0).all() and (mask[:, : padding.start] == 1).all()


def test_failed_write_leaves_nothing(tmp_path, make_robomimic_file):
    good = list(read_robomimic_hdf5(make_robomimic_file("lift", episodes=2)))
    bad = Episode(good[0].obs, good[0].next_obs, good[0].actions[:, :6], good[0].rewards, good[0].dones, good[0].states)
    with pytest.raises(UserError, match="expected \\[T, 7\\]"):
        write_robomimic_hdf5(tmp_path / "out.hdf5", [good[1], bad], {"env_name": "Lift"})
    assert list(tmp_path.iterdir()) == []


def copy_and_edit(src: Path, dst_dir: Path, edit) -> Path:
    dst = dst_dir / "edited.hdf5"
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def set_env_name(f: h5py.File, name: str) -> None:
    f["data"].attrs["env_args"] = json.dumps({"env_name": name, "type": 1})


def narrow_actions(f: h5py.File) -> None:
    actions = f["data/demo_3/actions"][()]
    del f["data/demo_3/actions"]
    f["data/demo_3"].create_dataset("actions", data=actions[:, :6])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.__delitem__("data"), "missing 'data' group"),
        (lambda f: set_env_name(f, "Door"), "unknown env_name 'Door'"),
        (lambda f: f["data"].attrs.__delitem__("env_args"), "env_args'] is missing"),
        (lambda f: f.__delitem__("data/demo_2/obs/object"), "data/demo_2/obs: missing observation key 'object'"),
        (narrow_actions, "data/demo_3/actions has width 6, expected 7"),
    ],
)
def test_bad_contents_are_one_line_errors_naming_the_file(tmp_path, make_robomimic_file, edit, message):
    path = copy_and_edit(make_robomimic_file("lift", episodes=5), tmp_path, edit)
    with pytest.raises(UserError) as err:
        list(read_robomimic_hdf5(path))
    text = str(err.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


def test_exact_action_width_message(tmp_path, make_robomimic_file):
    path = copy_and_edit(make_robomimic_file("lift", episodes=5), tmp_path, narrow_actions)
    with pytest.raises(UserError) as err:
        read_robomimic_hdf5(path).episode("demo_3")
    assert str(err.value) == f"{path}: data/demo_3/actions has width 6, expected 7"


def test_missing_corrupt_and_truncated_files(tmp_path, make_robomimic_file):
    with pytest.raises(UserError, match="file not found"):
        read_robomimic_hdf5(tmp_path / "nope.hdf5")
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(UserError, match="cannot read as HDF5"):
        read_robomimic_hdf5(garbage)
    content = make_robomimic_file("lift", episodes=6, steps=40).read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        list(read_robomimic_hdf5(truncated))
    assert str(err.value).startswith(str(truncated)) and "\n" not in str(err.value)
