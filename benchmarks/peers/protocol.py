"""The pipe protocol between the rollout loop (project venv) and a peer's policy server (the peer's own venv).

A peer pins other versions of torch and huggingface-hub than the project, so its policy runs in a child process
started with the peer's Python. They speak one JSON object per line, request then reply:

    {"op": "reset", "n": N, ...}                 -> {"ok": true}
    {"op": "act", "obs": [dict | null] * N}      -> {"actions": [[7 floats] | null] * N, "errors": [str | null] * N}
    {"op": "close"}                              -> {"ok": true}, then the server exits

`obs[i]` is episode i's observation in the peer's own keys (null: the episode is over); any reply may add fields
(a replay's observation mismatch). A failure to handle a request is answered {"error": "one line"}. This file
runs on both sides, so it needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO


class PeerError(RuntimeError):
    """The peer's server failed or died; the message names why (with the end of its log)."""


# ------------------------------------------------------------------------------------------------ server side


def protocol_stdout() -> TextIO:
    """The real stdout for replies; fd 1 itself goes to stderr so that anything a library prints (robomimic prints
    its config, C code may write too) can never corrupt the protocol stream."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def serve(handlers: dict[str, Callable[[dict], dict]], replies: TextIO | None = None) -> None:
    """Answer requests from stdin with `handlers[op](request)` until "close" or the end of stdin."""
    replies = replies or protocol_stdout()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "close":
            replies.write(json.dumps({"ok": True}) + "\n")
            return
        try:
            if op not in handlers:
                raise ValueError(f"unknown op {op!r}; expected one of {sorted(handlers)}")
            reply = handlers[op](request)
        except Exception as err:  # noqa: BLE001 - every failure becomes a one-line answer; the client decides
            frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
            traceback.print_exc()  # the whole story goes to the server's log
            reply = {"error": f"{type(err).__name__}: {err}{where}".replace("\n", " ")}
        replies.write(json.dumps(reply) + "\n")


# ------------------------------------------------------------------------------------------------ client side


class PeerServer:
    """A running peer server: `request(message) -> reply`. Its stderr goes to `log`; a reply that does not come
    within `timeout_s`, a dead server or an {"error"} reply raise PeerError with the end of the log."""

    def __init__(self, command: Sequence[str], log: Path, timeout_s: float = 1800.0, env: dict[str, str] | None = None):
        self.command = list(command)
        self.log = Path(log)
        self.timeout_s = timeout_s
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log_file, env=env, text=True, bufsize=1)
        except OSError as err:
            self._log_file.close()
            raise PeerError(f"cannot start the peer server {self.command[0]}: {err}") from None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise PeerError(f"peer server exited with code {self.proc.returncode}: {self.log_tail()}")
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise PeerError(f"peer server closed its input (exit code {self.proc.poll()}): {self.log_tail()}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if ready:  # the server closed its output: it is exiting, so its exit code is at hand
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            reason = f"no reply within {self.timeout_s:.0f} s" if not ready else f"exit code {self.proc.poll()}"
            self.kill()
            raise PeerError(f"peer server gave no answer to {message.get('op')!r} ({reason}): {self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"peer server failed on {message.get('op')!r}: {reply['error']}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"op": "close"})
                self.proc.wait(timeout=30)
            except (PeerError, subprocess.TimeoutExpired):
                self.kill()
        self._log_file.close()

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
