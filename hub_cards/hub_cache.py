"""Place a local repo folder into the Hugging Face cache exactly as `hf_hub_download` would have left it.

With the folder in the cache, `AutoModel.from_pretrained("org/name", trust_remote_code=True)` and
`hf_hub_download(...)` resolve it under `HF_HUB_OFFLINE=1` in a fresh process, as if it had been
downloaded from the Hub. The layout (huggingface_hub's `file_download.py`, checked against 2.4.0):

    <HF_HUB_CACHE>/<models|datasets>--org--name/
        blobs/<etag>                          file contents, named by the Hub's etag: the sha256 of
                                              LFS files, the git blob sha1 of small text files
        snapshots/<commit>/<relative path>    relative symlink to ../../blobs/<etag> (copy when the
                                              filesystem has no symlinks)
        refs/main                             the commit hash, no trailing newline

An offline lookup reads refs/main, then takes the file under snapshots/<that commit>/. The commit
hash here is a local content hash (the real one exists only after a push), which is enough because
nothing offline checks it against the Hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

# Files the Hub stores through LFS (its default .gitattributes patterns we produce) and the size above
# which it always does; their etag is the sha256 of the content instead of the git blob sha1.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".h5", ".hdf5", ".npy", ".npz", ".zip")
LFS_MIN_BYTES = 10 * 1024 * 1024


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: sha1 over 'blob <size>\\0' + content (what the Hub uses as etag)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_etag(path: Path) -> str:
    is_lfs = path.suffix in LFS_SUFFIXES or path.stat().st_size >= LFS_MIN_BYTES
    return sha256_file(path) if is_lfs else git_blob_sha1(path)


def repo_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` (relative paths, sorted), skipping hidden ones such as .cache/."""
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def local_commit_hash(etags: dict[Path, str]) -> str:
    """A 40-hex id that changes whenever any file's path or content changes (stands in for the Hub commit)."""
    digest = hashlib.sha1()
    for rel, etag in sorted(etags.items()):
        digest.update(f"{rel.as_posix()}\0{etag}\n".encode())
    return digest.hexdigest()


def _atomic_copy(src: Path, dst: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=dst.parent, prefix=f".{dst.name}.", suffix=".incomplete", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        shutil.copyfile(src, tmp_path)
        os.replace(tmp_path, dst)
    finally:
        tmp_path.unlink(missing_ok=True)


def _link_or_copy(blob: Path, pointer: Path) -> None:
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # filesystems without symlinks: huggingface_hub also falls back to copies
        shutil.copyfile(blob, pointer)


def place_in_hub_cache(folder: Path, repo_id: str, repo_type: str = "model", cache_dir: Path | None = None) -> Path:
    """Copy `folder` into the hub cache as the `main` revision of `repo_id`; returns the snapshot folder.

    Re-running with the same content is a no-op; new content becomes a new snapshot and `refs/main`
    moves to it last, so a concurrent reader sees either the old or the new revision, never a mix.
    """
    cache_dir = Path(cache_dir or constants.HF_HUB_CACHE)
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "snapshots").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)

    etags = {rel: hub_etag(folder / rel) for rel in repo_files(folder)}
    commit = local_commit_hash(etags)
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        staging = Path(tempfile.mkdtemp(dir=storage / "snapshots", prefix=f".{commit}."))
        try:
            for rel, etag in etags.items():
                blob = storage / "blobs" / etag
                if not blob.exists():
                    _atomic_copy(folder / rel, blob)
                pointer = staging / rel
                pointer.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(blob, pointer)
            # Symlinks are relative to the pointer's own folder, so they stay valid after the rename.
            os.replace(staging, snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    ref = storage / "refs" / "main"
    tmp_ref = ref.with_name(f".main.{os.getpid()}.tmp")
    tmp_ref.write_text(commit)
    os.replace(tmp_ref, ref)
    return snapshot
