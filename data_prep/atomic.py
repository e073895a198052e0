"""Replace a folder atomically: datasets, checkpoints, exports and pooled models are written to a temporary
folder first and only then moved into place, so a reader (or a crash) never sees half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`; an existing `final` is swapped aside first and removed after.

    The swapped-aside name is hidden (`.old-<name>-<pid>`) so that folder listings such as the trainer's
    checkpoint scan never take it for a real entry."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
