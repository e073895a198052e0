"""One-line user-facing errors shared by every command-line entry point.

Every CLI wraps its `main` in `run_cli`: a `UserError` (bad file, bad field, bad config)
becomes one line on stderr and exit code 2, never a traceback from deep inside h5py or torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """An error caused by the user's input; its message must name the file/field and what was expected."""


def run_cli(main: Callable[[], T]) -> T:
    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines), for one-line UserErrors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
