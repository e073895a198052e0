"""The Space answers a dream request over HTTP (gradio_client), with tiny random models and a tiny dataset."""

from __future__ import annotations

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
def space_url(tmp_path: Path, make_robomimic_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from configuration_vla import MLPPolicyConfig, WorldModelConfig
    from data_prep.preprocess import preprocess
    from modeling_vla import MLPPolicy, WorldModel
    from space_app.app import DreamSession, SpaceConfig, build_app

    torch.manual_seed(0)
    WorldModel(WorldModelConfig(hidden_dim=8, token_mlp_dim=8, channel_mlp_dim=8, num_layers=1, num_ensemble=2,
                                tasks=["lift"])).save_pretrained(tmp_path / "world")
    MLPPolicy(MLPPolicyConfig(hidden_dim=8, num_layers=1, chunk_size=2, tasks=["lift"])).save_pretrained(tmp_path / "mlp")
    preprocess([make_robomimic_file("lift", episodes=10)], tmp_path / "dataset")
    session = DreamSession(SpaceConfig(str(tmp_path / "world"), str(tmp_path / "mlp"), str(tmp_path / "dataset")))
    app = build_app(session)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_space_answers_a_dream_request_with_figures(space_url: str) -> None:
    client = gradio_client.Client(space_url, verbose=False)
    trajectory, uncertainty, verdict, comparison = client.predict(
        "please lift the red block", "lift", "held-out episode", 0, 6, False, api_name="/dream"
    )
    for figure in (trajectory, uncertainty):
        assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(figure).stat().st_size > 5_000  # a real plot, not an empty canvas
    assert "Dream (predicted)" in verdict and "please lift the red block" in verdict
    assert not isinstance(comparison, str)  # no robosuite twin (no image path) for a held-out dataset start
    assert "No real rollout" in verdict or "not installed" in verdict


def test_space_reports_a_bad_start_as_a_readable_error(space_url: str) -> None:
    client = gradio_client.Client(space_url, verbose=False)
    with pytest.raises(Exception, match="held-out episodes"):
        client.predict("lift it", "lift", "held-out episode", 99, 5, False, api_name="/dream")
