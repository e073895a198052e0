"""The Space answers a dream request over HTTP (gradio_client), with tiny random models and a tiny dataset."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

gradio_client = pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets keys a local folder's Arrow cache by folder name, not path: keep ours out of the shared cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


@pytest.fixture
def session(tmp_path: Path, make_robomimic_file: Callable[..., Path]):
    from configuration_vla import MLPPolicyConfig, WorldModelConfig
    from data_prep.preprocess import preprocess
    from modeling_vla import MLPPolicy, WorldModel
    from space_app.app import DreamSession, SpaceConfig

    torch.manual_seed(0)
    WorldModel(WorldModelConfig(hidden_dim=8, token_mlp_dim=8, channel_mlp_dim=8, num_layers=1, num_ensemble=2,
                                tasks=["lift"])).save_pretrained(tmp_path / "world")
    MLPPolicy(MLPPolicyConfig(hidden_dim=8, num_layers=1, chunk_size=2, tasks=["lift"])).save_pretrained(tmp_path / "mlp")
    preprocess([make_robomimic_file("lift", episodes=10)], tmp_path / "dataset")
    return DreamSession(SpaceConfig(str(tmp_path / "world"), str(tmp_path / "mlp"), str(tmp_path / "dataset")))


@pytest.fixture
def space_url(session, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from space_app.app import build_app

    app = build_app(session)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_space_answers_a_dream_request_with_figures(space_url: str) -> None:
    client = gradio_client.Client(space_url, verbose=False)
    trajectory, uncertainty, verdict, comparison, video = client.predict(
        "please lift the red block", "lift", "held-out episode", 0, 6, False, api_name="/dream"
    )
    for figure in (trajectory, uncertainty):
        assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(figure).stat().st_size > 5_000  # a real plot, not an empty canvas
    assert "Dream (predicted)" in verdict and "please lift the red block" in verdict
    assert not isinstance(comparison, str)  # no robosuite twin (no image path) for a held-out dataset start
    assert "No real rollout" in verdict or "not installed" in verdict
    if "dream video skipped" in verdict:  # no OpenGL here: the figures come all the same
        return
    assert "dream video written: dream_lift_seed" in verdict, verdict  # the dream drawn in MuJoCo (seed: episode id)
    film = Path(video["value"] if isinstance(video, dict) else video)
    assert film.read_bytes()[4:8] == b"ftyp" and film.stat().st_size > 5_000  # an MP4 with frames in it


def test_space_reports_a_bad_start_as_a_readable_error(space_url: str) -> None:
    client = gradio_client.Client(space_url, verbose=False)
    with pytest.raises(Exception, match="held-out episodes"):
        client.predict("lift it", "lift", "held-out episode", 99, 5, False, api_name="/dream")


def raw_request(url: str, body: str) -> tuple[str, str]:
    """POST a raw JSON body (NaN and Infinity as such) to the /dream endpoint; (event, data) of its answer."""
    import urllib.request

    request = urllib.request.Request(f"{url}gradio_api/call/dream", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=60).read())["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/dream/{event_id}", timeout=120).read().decode()
    events = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line.startswith("event:")]
    data = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line.startswith("data:")]
    answer = next(i for i, event in enumerate(events) if event != "heartbeat")
    return events[answer], data[answer]


@pytest.mark.parametrize(("values", "message"), [
    ('"lift it", "lift", "held-out episode", NaN, 5, false', "must be a whole number, got 'nan'"),
    ('"lift it", "lift", "held-out episode", "abc", 5, false', "must be a whole number, got 'abc'"),
    ('"lift it", "lift", "held-out episode", 0, Infinity, false', "max steps must be a whole number, got 'inf'"),
    ('"lift it", "lift", "held-out episode", 1.5, 5, false', "must be a whole number, got '1.5'"),
    ('"lift it", ["lift"], "held-out episode", 0, 5, false', "task must be one of"),
    ('"lift it", "lift", "held-out episode", 0, 5, "yes"', "checkbox must be true or false"),
    (f'"{"x" * 100_000}", "lift", "held-out episode", 0, 5, false', "instruction has 100000 characters; at most 512"),
])
def test_raw_http_values_get_a_readable_error(space_url: str, values: str, message: str) -> None:
    """Issue 40, case 5: NaN / Infinity / non-numeric numbers over raw HTTP returned {"error": null} with a server
    traceback, and a 1 MB instruction was drawn into the figure title (155 s, 532 MB)."""
    event, data = raw_request(space_url, f'{{"data": [{values}]}}')
    assert event == "error"
    assert message in (json.loads(data) or {}).get("error", ""), data


def test_figure_title_is_bounded_and_figures_leave_no_files(session, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 40, case 5: the instruction went whole into the title; the figure folder was never cleaned."""
    import tempfile

    import space_app.app as space

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    titles = []
    real_plot = space.plot_trajectories_3d
    monkeypatch.setattr(space, "plot_trajectories_3d", lambda records, path, title: titles.append(title) or real_plot(records, path, title))
    session = space.DreamSession(session.config)
    instruction = "lift " * 102  # 510 characters: allowed, but not into a title
    for _ in range(2):
        outcome = session.run(space.check_request(instruction, "lift", space.HELD_OUT, 0, 4, False))
        assert outcome.trajectory.size[0] > 100 and outcome.uncertainty.size[0] > 100  # images, in memory
    assert all(len(title) < 100 for title in titles), titles
    assert list(temp.iterdir()) == []


def test_only_the_tasks_both_models_know_are_offered(session) -> None:
    """A multi-object scene's goals (registered tasks) appear once the Space's models were trained on them."""
    import space_app.app as space
    from common.errors import UserError

    assert session.tasks() == ["lift"]
    with pytest.raises(UserError, match=r"task 'cubes_red': the models were trained on \['lift'\]"):
        session.run(space.check_request("Lift the red cube", "cubes_red", space.SEED, 0, 4, False))
