"""`vla-download`: fetch robomimic's published low-dim demonstration datasets from the Hugging Face Hub.

Since robomimic v0.3 the datasets live in the Hub dataset repo `robomimic/robomimic_datasets`
(robomimic's `DATASET_REGISTRY`: `v1.5/<task>/<type>/low_dim_v15.hdf5`). We fetch them with
huggingface_hub's HTTP machinery rather than `hf_hub_download`, because its download is not
resumable across runs (a killed 50 MB download starts over) and we want robomimic's folder layout:

    <out>/<task>/<type>/low_dim_v15.hdf5             complete, verified file
    <out>/<task>/<type>/low_dim_v15.hdf5.incomplete  partial download, resumed with an HTTP Range request

Checks, in order: the size the Hub announces (Content-Length / X-Linked-Size); the SHA-256 the Hub
announces for LFS files (its `X-Linked-Etag` is the LFS object id, i.e. the SHA-256 of the file;
robomimic publishes no checksums of its own); the file opens as a robomimic file of the right task.
A file failing any check is deleted. `--base-url` (or HF_ENDPOINT) points at another endpoint,
HF_HUB_OFFLINE=1 forbids network access.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get

from common.errors import UserError, first_line, run_cli
from data_prep.robomimic_io import read_robomimic_hdf5
from data_prep.tasks import get_task, task_names

HF_REPO_ID = "robomimic/robomimic_datasets"
DATASET_VERSION = "v1.5"
# Dataset types robomimic publishes with low-dim observations for lift / can / square (ph: proficient human,
# mh: multi-human). Other hdf5 types ("raw" = states only, "image") have no observations this project can use.
RELEASED = {"ph": ("low_dim",), "mh": ("low_dim",)}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

try:  # huggingface_hub >= 2 does its HTTP with its own httpx fork, older versions with httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http
NETWORK_ERRORS = (HfHubHTTPError, _http.HTTPError, OSError)


@dataclass(frozen=True)
class RemoteFile:
    task: str
    dataset_type: str
    hdf5_type: str

    @property
    def repo_path(self) -> str:
        """Path inside the Hub repo, as in robomimic's DATASET_REGISTRY."""
        folder = get_task(self.task).robomimic_name
        return f"{DATASET_VERSION}/{folder}/{self.dataset_type}/{self.hdf5_type}_v15.hdf5"

    def local_path(self, out: Path) -> Path:
        return out / self.task / self.dataset_type / Path(self.repo_path).name


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    num_demos: int
    fetched: bool  # False when the file was already present


def is_offline() -> bool:
    # huggingface_hub freezes HF_HUB_OFFLINE at import; also read the variable now, in case it was set since.
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(
    remote: RemoteFile, out: Path, endpoint: str | None = None, revision: str = "main", force: bool = False
) -> Downloaded:
    """Download one dataset file into `out` (resuming a partial download) and verify it; see module doc."""
    target = remote.local_path(out)
    if target.exists() and not force:
        return Downloaded(target, target.stat().st_size, sha256_of(target), _validate(target, remote), fetched=False)
    if is_offline():
        raise UserError(
            f"offline (HF_HUB_OFFLINE=1) and {remote.task} not in {out} (expected {target}); "
            "run vla-generate to make demos locally or unset HF_HUB_OFFLINE"
        )
    url = hf_hub_url(HF_REPO_ID, remote.repo_path, repo_type="dataset", revision=revision, endpoint=endpoint)
    location, size, expected_sha = _remote_metadata(url)
    partial = target.with_name(target.name + ".incomplete")
    target.parent.mkdir(parents=True, exist_ok=True)
    if force or (partial.exists() and size is not None and partial.stat().st_size > size):
        partial.unlink(missing_ok=True)  # stale or longer than the file: cannot be a prefix of it
    _fetch(location, partial, size)  # on failure the partial file stays, for the next run to resume
    try:
        got_sha = _verify(partial, size, expected_sha, url)
        num_demos = _validate(partial, remote)
    except UserError:
        partial.unlink(missing_ok=True)  # complete but wrong: no use resuming from it
        raise
    os.replace(partial, target)
    return Downloaded(target, target.stat().st_size, got_sha, num_demos, fetched=True)


def _remote_metadata(url: str) -> tuple[str, int | None, str | None]:
    """(url to GET after the Hub's redirect, size, sha256 or None when the file is not an LFS object)."""
    try:
        meta = get_hf_file_metadata(url)
    except NETWORK_ERRORS as err:
        raise UserError(f"{url}: cannot fetch file metadata: {first_line(err)}") from None
    etag = (meta.etag or "").strip('"').lower()
    return meta.location or url, meta.size, (etag if _SHA256.match(etag) else None)


def _fetch(url: str, partial: Path, size: int | None) -> None:
    resume = partial.stat().st_size if partial.exists() else 0
    try:
        with partial.open("ab") as f:  # append: http_get writes from the current position after a Range request
            http_get(url, f, resume_size=resume, expected_size=size, displayed_filename=partial.name[: -len(".incomplete")])
    except NETWORK_ERRORS as err:
        raise UserError(f"{url}: download interrupted ({first_line(err)}); run again to resume") from None


def _verify(path: Path, size: int | None, expected_sha: str | None, url: str) -> str:
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise UserError(f"{path}: downloaded {got_size} bytes, expected {size} (from {url})")
    got_sha = sha256_of(path)
    if expected_sha is not None and got_sha != expected_sha:
        raise UserError(f"{path}: sha256 {got_sha} does not match the Hub's {expected_sha} (from {url})")
    return got_sha


def _validate(path: Path, remote: RemoteFile) -> int:
    """Open with the project's one reader; the file must hold demos of the task we asked for."""
    source = read_robomimic_hdf5(path)
    if source.task != remote.task:
        raise UserError(f"{path}: holds task {source.task!r} (env {source.env_args.get('env_name')!r}), expected {remote.task!r}")
    return len(source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-download", description=__doc__.split("\n\n")[0])
    published = [name for name in task_names() if get_task(name).robomimic_name]  # tasks robomimic released data of
    parser.add_argument("--tasks", nargs="+", default=published, choices=published)
    parser.add_argument("--dataset-type", default="ph", choices=list(RELEASED))
    parser.add_argument("--hdf5-type", default="low_dim", choices=sorted({t for types in RELEASED.values() for t in types}))
    parser.add_argument("--out", type=Path, default=Path("data/robomimic"))
    parser.add_argument("--base-url", default=None, help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the Hub repo")
    parser.add_argument("--force", action="store_true", help="download again even if the file is present")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hdf5_type not in RELEASED[args.dataset_type]:
        parser.error(f"--hdf5-type {args.hdf5_type} is not published for --dataset-type {args.dataset_type}")
    return args


def main(argv: list[str] | None = None) -> None:
    def run() -> None:
        args = parse_args(argv)
        endpoint = args.base_url or os.environ.get("HF_ENDPOINT") or None
        for task in args.tasks:
            remote = RemoteFile(task, args.dataset_type, args.hdf5_type)
            result = download(remote, args.out, endpoint=endpoint, revision=args.revision, force=args.force)
            state = "downloaded" if result.fetched else "already present"
            print(f"{task}: {state} {result.path} ({result.size} bytes, {result.num_demos} demos, sha256 {result.sha256})")

    run_cli(run)


if __name__ == "__main__":
    main()
