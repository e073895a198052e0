"""benchmarks/dream_ik.py: the share of dreamed frames the dream videos can draw the arm at."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.sim import make_env
from data_prep.tasks import STATE_SLICES, state_from_obs
from evaluation.records import EpisodeRecord, write_episodes

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_dream_ik", REPO / "benchmarks" / "dream_ik.py")
dik = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(dik)


def test_counts_reached_frames_per_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = make_env("lift", 5)
    start = state_from_obs(sim.reset(5), "lift")[0]
    sim.env.close()
    states = np.stack([start] * 4)
    states[2, STATE_SLICES["eef pos"]] += (0.0, 1.0, 0.0)  # one frame out of the arm's reach
    dream = EpisodeRecord("mlp", "lift", "dream", 0, 5, "lift", False, 0.0, 3, None, states, np.zeros((3, 7)))
    real = EpisodeRecord("mlp", "lift", "real", 0, 5, "lift", False, 0.0, 3, None, states, np.zeros((3, 7)))
    write_episodes([dream, real], tmp_path)
    dik.main([str(tmp_path), "--json", str(tmp_path / "ik.json")])
    (row,) = json.loads((tmp_path / "ik.json").read_text())
    assert (row["task"], row["dreams"], row["frames"], row["reached"]) == ("lift", 1, 4, 3)  # real episodes not posed
    assert row["position_cm"][2] > 10  # the unreachable frame's error, in cm (the arm stretched towards it)
    assert row["reached_by_random_restart"] == 0  # the warm start reaches the others; no restart reaches the far one
    assert "| lift | 1 | 4 | 3 (75.0 %) | 0 | 1 |" in capsys.readouterr().out


def test_a_folder_without_dreams_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    real = EpisodeRecord("mlp", "lift", "real", 0, 5, "lift", False, 0.0, 0, None, np.zeros((1, 83)), np.zeros((0, 7)))
    write_episodes([real], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        dik.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no dreamed episodes" in err and len(err.strip().splitlines()) == 1
