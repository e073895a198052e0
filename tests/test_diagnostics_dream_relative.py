"""benchmarks/diagnostics/dream_relative.py: a dream's object-to-eef block against what its own poses imply."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from data_prep.tasks import STATE_DIM, STATE_SLICES, relative_pose_from_poses
from evaluation.records import EpisodeRecord, write_episodes

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_dream_relative", REPO / "benchmarks" / "diagnostics" / "dream_relative.py")
dr = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(dr)
IDENTITY = np.array([1.0, 0, 0, 0, 1.0, 0])


def episode(env: str, success: bool, block_height_cm: float, close_at: int = 3, steps: int = 6) -> EpisodeRecord:
    """A Square nut 5 cm beside a still, unrotated gripper at its height; the stored block is raised by block_height_cm."""
    states = np.zeros((steps + 1, STATE_DIM), np.float32)
    states[:, STATE_SLICES["eef pos"]] = [0.0, 0.0, 0.83]
    states[:, STATE_SLICES["object pos"]] = [0.05, 0.0, 0.83]
    states[:, STATE_SLICES["eef rot"]] = states[:, STATE_SLICES["object rot"]] = IDENTITY
    states = relative_pose_from_poses(states, states, "square")
    states[:, STATE_SLICES["object-eef pos"].start + 2] += block_height_cm / 100
    actions = np.full((steps, 7), -1.0, np.float32)
    actions[close_at:, 6] = 1.0
    return EpisodeRecord(policy="mlp", task="square", env=env, index=0, seed=7, instruction="Push the square nut",
                         success=success, episode_return=float(success), length=steps, error=None, states=states,
                         actions=actions)


def test_a_consistent_real_episode_has_no_gap_and_a_raised_dream_block_is_reported_at_the_real_grasp(tmp_path):
    real, dream = episode("real", True, 0.0), episode("dream", False, 2.0)
    assert dr.formula_gap_cm(real).max() == pytest.approx(0.0, abs=1e-4)
    np.testing.assert_allclose(dr.formula_gap_cm(dream), 2.0, atol=1e-4)
    step, real_block, dream_block, derived = dr.at_grasp(real, dream)
    assert step == 3
    np.testing.assert_allclose(real_block, [5.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(dream_block, [5.0, 0.0, 2.0], atol=1e-4)
    np.testing.assert_allclose(derived, [5.0, 0.0, 0.0], atol=1e-4)
    write_episodes([real, dream], tmp_path)
    lines = dr.report(dr.read_episodes(tmp_path))
    assert lines[0].startswith("mlp square: dream block vs formula on its poses: mean 2.00 cm")
    assert "real only: 1; mean |height| at the real grasp: dream's block 2.0 cm, formula on the dream's poses 0.0 cm" in lines[-1]


def test_no_real_only_episodes_and_a_policy_that_never_closes_report_no_grasp(tmp_path):
    real, dream = episode("real", True, 0.0, close_at=99), episode("dream", True, 0.0)
    assert dr.at_grasp(real, dream) is None
    write_episodes([real, dream], tmp_path)
    assert len(dr.report(dr.read_episodes(tmp_path))) == 1


def test_a_folder_without_episodes_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="episodes.jsonl: not found"):
        dr.read_episodes(tmp_path)


def carried(env: str, success: bool, close_at: int | None, steps: int = 14) -> EpisodeRecord:
    """A nut placed 6 cm high at reset that settles on the table; closed on at close_at, lifted the next step, let go
    two steps later. close_at None: the gripper never closes and the nut stays on the table."""
    record = episode(env, success, 0.0, close_at=steps, steps=steps)
    height = np.full(steps + 1, 0.83)
    height[0] = 0.89
    if close_at is not None:
        record.actions[close_at:close_at + 2, 6] = 1.0
        height[close_at + 1:] = 0.90
    record.states[:, STATE_SLICES["object pos"].start + 2] = height
    return record


def test_disagreeing_pairs_are_broken_down_by_phase_and_the_reset_drop_is_not_a_lift():
    real, dream = carried("real", True, close_at=10), carried("dream", False, close_at=None)
    assert dr.phases(real) == dr.Phases(close=10, lift=11, release=12, end_object_cm=pytest.approx([5.0, 0.0, 90.0]))
    assert dr.phases(dream) == dr.Phases(close=None, lift=None, release=None, end_object_cm=pytest.approx([5.0, 0.0, 83.0]))
    lines = dr.disagreements([real, dream])
    assert len(lines) == 1
    assert lines[0].startswith("mlp square real only, seed 7 (real / dream): close 10 / -, lift 11 / -, release 12 / -")
    agreeing = carried("dream", True, close_at=10)
    assert dr.disagreements([real, agreeing]) == []
