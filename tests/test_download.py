"""vla-download against a local stand-in for the Hub's resolve endpoint (127.0.0.1 only, no internet)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants

from common.errors import UserError
from data_prep import download as dl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Serves files like huggingface.co/datasets/<repo>/resolve/<rev>/<path>, Range requests included."""

    files: dict[str, bytes] = field(default_factory=dict)  # repo path -> content
    announced_sha: dict[str, str] = field(default_factory=dict)  # override the sha256 the server announces
    ranges: list[str] = field(default_factory=list)  # Range headers received on GET
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _lookup(self) -> tuple[str, bytes] | None:
                prefix = f"/datasets/{dl.HF_REPO_ID}/resolve/main/"
                path = self.path.split("?")[0]
                if not path.startswith(prefix) or path[len(prefix):] not in hub.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                name = path[len(prefix):]
                return name, hub.files[name]

            def do_HEAD(self) -> None:
                found = self._lookup()
                if found:
                    name, body = found
                    sha = hub.announced_sha.get(name, hashlib.sha256(body).hexdigest())
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(body)))
                    self.send_header("ETag", f'"{sha}"')
                    self.end_headers()

            def do_GET(self) -> None:
                found = self._lookup()
                if not found:
                    return
                _, body = found
                start = 0
                if "Range" in self.headers:
                    hub.ranges.append(self.headers["Range"])
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite may run under HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()


def serve_task_file(hub: FakeHub, make_robomimic_file, task: str = "lift") -> tuple[dl.RemoteFile, bytes]:
    remote = dl.RemoteFile(task, "ph", "low_dim")
    content = make_robomimic_file(task, episodes=4, steps=30).read_bytes()
    hub.files[remote.repo_path] = content
    return remote, content


def test_repo_paths_follow_robomimic_registry():
    assert dl.RemoteFile("lift", "ph", "low_dim").repo_path == "v1.5/lift/ph/low_dim_v15.hdf5"
    assert dl.RemoteFile("square", "ph", "low_dim").local_path(Path("d")) == Path("d/square/ph/low_dim_v15.hdf5")


def test_download_verifies_and_places_file(fake_hub, make_robomimic_file, tmp_path, capsys):
    remote, content = serve_task_file(fake_hub, make_robomimic_file)
    out = tmp_path / "robomimic"
    dl.main(["--tasks", "lift", "--out", str(out), "--base-url", fake_hub.url])
    target = out / "lift/ph/low_dim_v15.hdf5"
    assert target.read_bytes() == content
    assert not target.with_name(target.name + ".incomplete").exists()
    assert "lift: downloaded" in capsys.readouterr().out
    dl.main(["--tasks", "lift", "--out", str(out), "--base-url", fake_hub.url])  # second run: no transfer
    assert "lift: already present" in capsys.readouterr().out


def test_download_resumes_partial_file_with_range_request(fake_hub, make_robomimic_file, tmp_path):
    remote, content = serve_task_file(fake_hub, make_robomimic_file)
    out = tmp_path / "robomimic"
    partial = remote.local_path(out).with_name("low_dim_v15.hdf5.incomplete")
    partial.parent.mkdir(parents=True)
    half = len(content) // 2
    partial.write_bytes(content[:half])
    result = dl.download(remote, out, endpoint=fake_hub.url)
    assert fake_hub.ranges == [f"bytes={half}-"]
    assert result.path.read_bytes() == content
    assert result.sha256 == hashlib.sha256(content).hexdigest()
    assert result.num_demos == 4


def test_checksum_mismatch_leaves_no_file(fake_hub, make_robomimic_file, tmp_path, capsys):
    remote, _ = serve_task_file(fake_hub, make_robomimic_file)
    fake_hub.announced_sha[remote.repo_path] = "0" * 64
    out = tmp_path / "robomimic"
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--tasks", "lift", "--out", str(out), "--base-url", fake_hub.url])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err and "does not match" in err
    assert not any(p.is_file() for p in out.rglob("*"))


def test_file_of_wrong_task_is_refused(fake_hub, make_robomimic_file, tmp_path):
    remote = dl.RemoteFile("can", "ph", "low_dim")
    fake_hub.files[remote.repo_path] = make_robomimic_file("lift", episodes=2).read_bytes()
    with pytest.raises(UserError, match="holds task 'lift'.*expected 'can'"):
        dl.download(remote, tmp_path / "robomimic", endpoint=fake_hub.url)
    assert not any(p.is_file() for p in (tmp_path / "robomimic").rglob("*"))


def test_missing_remote_file_is_one_line_error(fake_hub, tmp_path):
    with pytest.raises(UserError, match="cannot fetch file metadata"):
        dl.download(dl.RemoteFile("square", "ph", "low_dim"), tmp_path / "robomimic", endpoint=fake_hub.url)


def test_unreachable_endpoint_is_one_line_error(fake_hub, tmp_path, capsys):
    closed = fake_hub.url.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--tasks", "lift", "--out", str(tmp_path / "robomimic"), "--base-url", closed])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "cannot fetch file metadata" in err


def test_offline_without_local_file_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--tasks", "can", "--out", str(tmp_path / "robomimic"), "--base-url", "http://127.0.0.1:9"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "offline (HF_HUB_OFFLINE=1) and can not in" in err and "vla-generate" in err


def test_offline_with_local_file_uses_it(tmp_path, monkeypatch, make_robomimic_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote = dl.RemoteFile("lift", "ph", "low_dim")
    target = remote.local_path(tmp_path / "robomimic")
    target.parent.mkdir(parents=True)
    target.write_bytes(make_robomimic_file("lift", episodes=3).read_bytes())
    result = dl.download(remote, tmp_path / "robomimic")
    assert not result.fetched and result.num_demos == 3
