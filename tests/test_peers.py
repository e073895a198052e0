"""benchmarks/peers/: the pipe protocol, `PeerPolicy` and its replay validation, on the project's own Python (no
peer virtualenv: the servers here are tiny scripts speaking the same protocol), and the BC-RNN's training file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "benchmarks" / "peers"
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(PEERS))

import harness  # noqa: E402
import robomimic_bc_rnn  # noqa: E402
from adapter import PeerPolicy, lerobot_observer, lerobot_recorded, robomimic_recorded  # noqa: E402
from conftest import synthetic_episode  # noqa: E402
from protocol import PeerError, PeerServer  # noqa: E402

from common.errors import UserError  # noqa: E402
from data_prep.robomimic_io import write_robomimic_hdf5  # noqa: E402
from data_prep.tasks import get_task  # noqa: E402

SERVER = f"""
import os, sys, time, json
sys.path.insert(0, {str(PEERS)!r})
from protocol import protocol_stdout, serve
from replay_server import ReplayServer

replies = protocol_stdout()
if sys.argv[1] == "replay":
    shapes = {{k: tuple(v) for k, v in json.loads(sys.argv[2]).items()}}
    server = ReplayServer(shapes, float)
    serve({{"reset": server.reset, "act": server.act}}, replies)
else:
    def noisy(request):
        print("a library printing to stdout")  # must not reach the protocol stream
        os.write(1, b"and one writing to fd 1\\n")
        return {{"ok": True, "n": len(request["obs"])}}

    def fixed(request):
        return {{"actions": [[float("nan")] * 7, None, [0.5] * 7, [0.1] * 3], "errors": [None, None, None, None]}}

    def fail(request):
        raise ValueError("bad request")

    def die(request):
        os._exit(3)

    def sleep(request):
        time.sleep(60)

    def reset(request):
        return {{"ok": True}}

    act = noisy if sys.argv[1] == "plain" else fixed
    serve({{"reset": reset, "act": act, "fail": fail, "die": die, "sleep": sleep}}, replies)
"""
LEROBOT_SHAPES = {"observation.state": [11], "observation.environment_state": [72]}


def robomimic_shapes(task: str) -> dict[str, list[int]]:
    return {"robot0_eef_pos": [3], "robot0_eef_quat": [4], "robot0_gripper_qpos": [2], "object": [get_task(task).object_dim]}


@pytest.fixture(scope="module")
def server_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("peer") / "server.py"
    path.write_text(SERVER)
    return path


def test_protocol_round_trip_survives_library_prints(server_script: Path, tmp_path: Path) -> None:
    with PeerServer([sys.executable, str(server_script), "plain"], tmp_path / "log") as server:
        assert server.request({"op": "act", "obs": [None, {}]}) == {"ok": True, "n": 2}
        assert server.request({"op": "act", "obs": []})["n"] == 0  # the stream is still in step
    assert "a library printing to stdout" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("op, message", [
    ("fail", "failed on 'fail': ValueError: bad request"),
    ("die", "gave no answer to 'die' \\(exit code 3\\)"),
    ("nope", "unknown op 'nope'"),
])
def test_protocol_failures_are_peer_errors(server_script: Path, tmp_path: Path, op: str, message: str) -> None:
    with PeerServer([sys.executable, str(server_script), "plain"], tmp_path / "log") as server:
        with pytest.raises(PeerError, match=message):
            server.request({"op": op})


def test_a_silent_server_is_given_up(server_script: Path, tmp_path: Path) -> None:
    with PeerServer([sys.executable, str(server_script), "plain"], tmp_path / "log", timeout_s=1) as server:
        with pytest.raises(PeerError, match="no reply within 1 s"):
            server.request({"op": "sleep"})
        assert server.proc.poll() is not None  # killed, not left behind


def test_peer_policy_ends_episodes_whose_action_is_unusable(server_script: Path, tmp_path: Path) -> None:
    with PeerServer([sys.executable, str(server_script), "fixed"], tmp_path / "log") as server:
        policy = PeerPolicy(server, "peer", lerobot_observer)
        policy.reset(4)
        actions = policy.act(np.zeros((4, 83), np.float32), [""] * 4, np.array([True, True, True, True]))
    assert "not 7 finite floats" in policy.errors[0] and "no action" in policy.errors[1]
    assert policy.errors[2] is None and "not 7 finite floats" in policy.errors[3]
    np.testing.assert_array_equal(actions[2], [0.5] * 7)
    np.testing.assert_array_equal(actions[[0, 1, 3]], 0)


def replay_peer(server_script: Path, observer: str, shapes: dict) -> harness.Peer:
    return harness.Peer("replay", observer, lambda task, ckpt: [sys.executable, str(server_script), "replay",
                                                                  json.dumps(shapes)])


@pytest.mark.parametrize("task", ["lift", "can"])
@pytest.mark.parametrize("observer, recorded", [("robomimic", robomimic_recorded), ("lerobot", lerobot_recorded)])
def test_replayed_demos_succeed_and_show_the_recorded_observations(server_script: Path, tmp_path: Path, task: str,
                                                                   observer: str, recorded) -> None:
    """The committed vla-generate demos, played back through PeerPolicy and the real simulator from their seeds."""
    peer = replay_peer(server_script, observer, robomimic_shapes(task) if observer == "robomimic" else LEROBOT_SHAPES)
    command = peer.serve(task, None)
    result = harness.validate_replay(peer, task, FIXTURES / f"tiny_{task}.hdf5", command, recorded, tmp_path,
                                     workers=1, limit=None, progress=False)
    assert result["successes"] == result["demos"] >= 1 and result["passed"]
    assert result["start_obs_error"] <= harness.OBS_TOLERANCE


def test_replay_catches_an_observation_one_step_late(server_script: Path, tmp_path: Path) -> None:
    """An adapter that hands the peer the previous step's observation fails its validation, though the recorded
    actions still solve the task."""

    class Late(harness.Peer):
        def policy(self, server, env, name):
            policy = super().policy(server, env, name)
            observe, previous = policy.observe, {}

            def late(states, active):
                obs, errors = observe(states, active)
                shown = [previous.get(i, o) for i, o in enumerate(obs)]
                previous.update({i: o for i, o in enumerate(obs) if o is not None})
                return shown, errors

            policy.observe = late
            return policy

    peer = Late("late", "robomimic", replay_peer(server_script, "robomimic", robomimic_shapes("lift")).serve)
    result = harness.validate_replay(peer, "lift", FIXTURES / "tiny_lift.hdf5", peer.serve("lift", None),
                                     robomimic_recorded, tmp_path, workers=1, limit=None, progress=False)
    assert result["successes"] == result["demos"]
    assert result["start_obs_error"] > harness.OBS_TOLERANCE and not result["passed"]


def test_bc_rnn_trains_on_the_expert_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode("lift", 6 + i, rng) for i in range(4)]
    for episode in episodes:
        episode.expert_actions = np.clip(episode.actions * 0.5, -1, 1)
    source = tmp_path / "demos.hdf5"
    write_robomimic_hdf5(source, episodes, {"env_name": "Lift", "type": 1, "env_kwargs": {}}, valid_fraction=0.25)
    before = source.read_bytes()
    target = tmp_path / "prepared" / "lift.hdf5"
    robomimic_bc_rnn.labelled_file(source, target)
    assert source.read_bytes() == before
    with h5py.File(source) as original, h5py.File(target) as labelled:
        for name in original["data"]:
            demo, copy = original["data"][name], labelled["data"][name]
            np.testing.assert_array_equal(copy["actions"][()], demo["expert_actions"][()])
            np.testing.assert_array_equal(copy["executed_actions"][()], demo["actions"][()])
            assert not np.allclose(copy["actions"][()], demo["actions"][()])
            np.testing.assert_array_equal(copy["obs/object"][()], demo["obs/object"][()])
        assert list(labelled["mask/train"][()]) == list(original["mask/train"][()])


def test_files_without_expert_labels_keep_their_actions(tmp_path: Path) -> None:
    """robomimic's own files (and ours from before the column existed): the executed actions are the labels."""
    target = tmp_path / "lift.hdf5"
    robomimic_bc_rnn.labelled_file(FIXTURES / "tiny_lift.hdf5", target)
    with h5py.File(FIXTURES / "tiny_lift.hdf5") as original, h5py.File(target) as labelled:
        for name in original["data"]:
            np.testing.assert_array_equal(labelled["data"][name]["actions"][()], original["data"][name]["actions"][()])
            assert "executed_actions" not in labelled["data"][name]


def test_one_file_per_task(tmp_path: Path) -> None:
    assert harness.task_files(FIXTURES, ["lift", "can"]) == {"lift": FIXTURES / "tiny_lift.hdf5",
                                                              "can": FIXTURES / "tiny_can.hdf5"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lift.hdf5").write_bytes((FIXTURES / "tiny_lift.hdf5").read_bytes())
    with pytest.raises(UserError, match="expected one HDF5 file of task 'lift', found 2"):
        harness.task_files(tmp_path, ["lift"])


def test_checkpoint_candidates_are_evenly_spaced_and_end_with_the_last() -> None:
    saved = list(range(50, 2001, 50))  # robomimic's 40 checkpoints of a 2000-epoch run
    picked = harness.spaced(saved, 10)
    assert len(picked) == 10 and picked[-1] == 2000 and set(np.diff(picked)) == {200}
    assert harness.spaced(saved[:3], 10) == saved[:3]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--candidates", "0"], "--candidates must be >= 1, got 0"),
    (["train", "--part-epochs", "0"], "--part-epochs must be >= 1, got 0"),
    (["evaluate", "--select-episodes", "-1"], "--select-episodes must be >= 0, got -1"),
])
def test_bad_counts_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        robomimic_bc_rnn.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
