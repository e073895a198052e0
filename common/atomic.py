"""Output folders that appear atomically and never replace what the command did not write.

Datasets, results, pooled models, exports and trained models are written to a temporary folder next to the
output and only then renamed into place, so a reader (or a crash) never sees half of one. A marker file in
every finished folder names the command that wrote it; `--overwrite` replaces only a folder with that
command's marker, and nothing replaces a folder that appeared while the command ran:

    check_output_dir(out, "vla-preprocess", overwrite, inputs)   # before any work: one-line refusals
    tmp = temp_dir(out)                                          # <out>.tmp-<host>-<pid>; stale ones removed
    ... write into tmp ...
    publish_dir(tmp, out, "vla-preprocess", overwrite)           # marker, the same checks again, rename
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from common.errors import UserError

MARKER = ".vla-output.json"  # hidden: dataset loaders, uploads and the hub cache skip dot files


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`; an existing `final` is swapped aside first and removed after.

    For folders the caller owns outright (checkpoints, the hub cache). The swapped-aside name is hidden
    (`.old-<name>-<pid>`) so that folder listings such as the trainer's checkpoint scan never take it for a real entry."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def written_by(folder: Path) -> str | None:
    """The command named by `folder`'s marker, None without a readable one."""
    try:
        value = json.loads((folder / MARKER).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _overlap(out: Path, path: Path) -> str | None:
    out, path = out.resolve(), path.resolve()
    if out == path:
        return "is"
    if out in path.parents:
        return "contains"
    if path in out.parents:
        return "lies inside"
    return None


def _refusal(out: Path, command: str, overwrite: bool, flag: str) -> str | None:
    """Why `out` may not be replaced now, or None (absent, an empty folder, or this command's own with --overwrite)."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir() or out.is_symlink():
        return f"{flag} {out}: exists and is not a folder; pick another {flag}"
    if not any(out.iterdir()):
        return None
    if not overwrite:
        return f"{flag} {out}: already exists; pass --overwrite to replace it"
    if written_by(out) != command:
        return (f"{flag} {out}: not written by {command} (no {MARKER} of its own), so --overwrite will not replace it; "
                f"move it away yourself or pick another {flag}")
    return None


def check_output_dir(out: Path, command: str, overwrite: bool, inputs: Iterable[Path] = (), flag: str = "--out") -> None:
    """Refuse, before any work, an output that is, contains or lies inside an input, or that may not be replaced."""
    out = Path(out)
    for path in inputs:
        relation = _overlap(out, Path(path))
        if relation:
            raise UserError(f"{flag} {out} {relation} the input {path}; write the output somewhere else")
    reason = _refusal(out, command, overwrite, flag)
    if reason:
        raise UserError(reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(out: Path) -> None:
    """Temporary folders of `out` left by processes of this host that no longer run (a SIGKILL, a power cut)."""
    host = re.escape(socket.gethostname())
    name = re.escape(out.name)
    # <out>.tmp-<host>-<pid>, <out>.tmp-<pid> (before the host was in the name) and replace_dir's .old-<out>-<pid>
    pattern = re.compile(rf"(?:{name}\.tmp-(?:{host}-)?|\.old-{name}-)(\d+)")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            pid = int(match.group(1))
            if pid == os.getpid() or not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


def temp_dir(out: Path, flag: str = "--out") -> Path:
    """A fresh, empty `<out>.tmp-<host>-<pid>` beside `out` (its parents made); one-line error if it cannot be made."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot write there ({err.strerror or err})") from None
    return tmp


def mark(folder: Path, command: str) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": command}) + "\n")


def publish_dir(tmp: Path, out: Path, command: str, overwrite: bool, flag: str = "--out") -> None:
    """Mark the finished `tmp` as `command`'s and rename it to `out`, checking again at the rename.

    A folder that appeared at `out` while the command ran (another run, a user) is never replaced unless it is
    this command's own and `overwrite` is set: the kernel's rename refuses to replace a non-empty folder, so a
    folder that appears between the check and the rename is not lost either."""
    out = Path(out)
    mark(tmp, command)
    reason = _refusal(out, command, overwrite, flag)
    if reason:
        raise UserError(f"{reason} (it appeared while {command} ran)")
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    try:
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)
            if written_by(old) != command:  # swapped in by someone else since the check: put it back
                os.replace(old, out)
                raise UserError(f"{flag} {out}: replaced by another process while {command} ran; left as it is")
        os.rename(tmp, out)
    except OSError as err:
        where = f"; the previous folder is kept at {old}" if old.exists() else ""
        raise UserError(f"{flag} {out}: appeared while {command} ran, left as it is ({err.strerror}){where}") from None
    shutil.rmtree(old, ignore_errors=True)


def write_output_dir(out: Path, command: str, overwrite: bool, write, inputs: Iterable[Path] = (),
                     flag: str = "--out"):
    """check_output_dir, temp_dir, `write(tmp)`, publish_dir; the temporary folder never outlives the call.
    Returns what `write` returns."""
    check_output_dir(out, command, overwrite, inputs, flag)
    tmp = temp_dir(out, flag)
    try:
        result = write(tmp)
        publish_dir(tmp, out, command, overwrite, flag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
