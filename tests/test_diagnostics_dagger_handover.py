"""benchmarks/diagnostics/dagger_handover.py on tiny DAgger files whose object heights are set by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV_NAMES, synthetic_episode

from common.errors import UserError
from data_prep.robomimic_io import write_robomimic_hdf5

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_dagger_handover", REPO / "benchmarks" / "diagnostics" / "dagger_handover.py")
bd = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bd)

REST, LIFTED = 0.82, 0.90  # object heights in m
GOAL = np.array([0.2, 0.1])


def dagger_file(path: Path, seeds: list[int], handovers: list[int], lifted_at_start: list[bool],
                task: str = "square") -> Path:
    """DAgger episodes of 10 steps: the object starts resting or lifted (reaching the goal's x-y at steps 3-4), then
    rests on the goal for 5 steps."""
    rng = np.random.default_rng(0)
    episodes = []
    for lifted in lifted_at_start:
        episode = synthetic_episode(task, 10, rng)
        position = np.tile([0.0, -0.1, REST], (10, 1))
        position[:5, 2] = LIFTED if lifted else REST
        position[3:, :2] = GOAL
        episode.obs["object"][:, :3] = position
        episodes.append(episode)
    env_args = {"env_name": ENV_NAMES[task], "type": 1, "env_kwargs": {}}
    attrs = {"demo_seeds": seeds, "driver_policy": "runs/x/best", "handovers": handovers}
    write_robomimic_hdf5(path, episodes, env_args, valid_fraction=0.0, seed=0, attrs=attrs)
    return path


def test_only_the_seeds_every_file_kept_are_compared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = dagger_file(tmp_path / "a.hdf5", [1, 2, 3], [10, 90, 100], [True, True, False])
    b = dagger_file(tmp_path / "b.hdf5", [2, 3, 4], [90, 100, 5], [False, False, True])
    bd.main([str(a), str(b)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "square: 2 seeds kept in every file"
    row_a, row_b = ([c.strip() for c in line.strip("|").split("|")] for line in lines[3:5])
    # seeds 2 and 3: in a, seed 2 starts lifted (5 of 20 steps, 2 of them over the goal); both hand over at >= 80
    assert row_a[1:] == ["1 / 2", "25%", "10%", "1 / 2", "10.0", "10.0"]
    assert row_b[1:] == ["0 / 2", "0%", "0%", "0 / 2", "10.0", "10.0"]


def test_a_plain_demo_file_is_refused_by_name(tmp_path: Path, make_robomimic_file) -> None:
    demos = make_robomimic_file("square")
    with pytest.raises(UserError, match=rf"{demos}: data.attrs has no 'handovers'"):
        bd.main([str(demos), str(demos)])


def test_files_of_different_tasks_are_refused(tmp_path: Path) -> None:
    square = dagger_file(tmp_path / "square.hdf5", [1], [10], [False])
    lift = dagger_file(tmp_path / "lift.hdf5", [1], [10], [False], task="lift")
    with pytest.raises(UserError, match=r"different tasks \(square, lift\)"):
        bd.main([str(square), str(lift)])


def test_files_without_a_common_seed_are_refused(tmp_path: Path) -> None:
    a = dagger_file(tmp_path / "a.hdf5", [1], [10], [False])
    b = dagger_file(tmp_path / "b.hdf5", [2], [10], [False])
    with pytest.raises(UserError, match="share no kept seeds"):
        bd.main([str(a), str(b)])
