"""Output folders (common/atomic.py): never over an input, never over what the command did not write (issue 40)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.atomic import MARKER, check_output_dir, publish_dir, temp_dir, write_output_dir, written_by
from common.errors import UserError


def write_file(name: str):
    def write(tmp: Path) -> str:
        (tmp / name).write_text("new")
        return name

    return write


@pytest.mark.parametrize("relation", ["is", "contains", "lies inside"])
def test_output_may_not_overlap_an_input(tmp_path: Path, relation: str) -> None:
    data = tmp_path / "raw"
    data.mkdir()
    (data / "a.hdf5").write_text("input")
    out = {"is": data, "contains": tmp_path, "lies inside": data / "out"}[relation]
    with pytest.raises(UserError, match=f"{relation} the input"):
        check_output_dir(out, "cmd", overwrite=True, inputs=[data / "a.hdf5" if relation == "contains" else data])
    assert (data / "a.hdf5").read_text() == "input"


def test_existing_folder_needs_overwrite_and_the_commands_own_marker(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="pass --overwrite"):
        write_output_dir(out, "cmd", False, write_file("result"))
    with pytest.raises(UserError, match="not written by cmd"):
        write_output_dir(out, "cmd", True, write_file("result"))
    assert (out / "keep.txt").read_text() == "mine"
    (out / MARKER).write_text('{"written_by": "other-cmd"}')
    with pytest.raises(UserError, match="not written by cmd"):
        write_output_dir(out, "cmd", True, write_file("result"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_own_output_is_replaced_with_overwrite_and_an_empty_folder_without(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # empty: nothing to lose
    assert write_output_dir(out, "cmd", False, write_file("first")) == "first"
    assert written_by(out) == "cmd" and (out / "first").is_file()
    write_output_dir(out, "cmd", True, write_file("second"))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_appears_during_the_run_is_never_replaced(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"

    def write(tmp: Path) -> None:
        (tmp / "result").write_text("new")
        out.mkdir()  # another run or a user, while this one writes
        (out / "keep.txt").write_text("mine")

    with pytest.raises(UserError, match="appeared while cmd ran"):
        write_output_dir(out, "cmd", overwrite, write)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_the_later_of_two_concurrent_runs_is_refused_at_the_rename(tmp_path: Path) -> None:
    out = tmp_path / "out"
    check_output_dir(out, "cmd", False)
    first, second = temp_dir(out), out.with_name("out.tmp-second")
    second.mkdir()
    (first / "result").write_text("first")
    (second / "result").write_text("second")
    publish_dir(first, out, "cmd", overwrite=False)
    with pytest.raises(UserError, match="already exists"):
        publish_dir(second, out, "cmd", overwrite=False)
    assert (out / "result").read_text() == "first"


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f"out.tmp-{dead.pid}", tmp_path / f"out.tmp-{host}-{dead.pid}", tmp_path / f".old-out-{dead.pid}"]
    kept = [tmp_path / f"out.tmp-{host}-{os.getppid()}", tmp_path / f"other.tmp-{dead.pid}"]  # a live pid, another name
    for folder in stale + kept:
        folder.mkdir()
    write_output_dir(tmp_path / "out", "cmd", False, write_file("result"))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_an_unwritable_place_is_a_one_line_error(unwritable_folder: Path) -> None:
    with pytest.raises(UserError, match="cannot write there"):
        write_output_dir(unwritable_folder / "vla-test-output", "cmd", False, write_file("result"))
