"""benchmarks/language.py: the instruction conditions of the language benchmark and how goals are read off states."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from data_prep.tasks import ROBOT_DIM, STATE_DIM, get_task, instructions_for, slot_offset, task_names
from evaluation.records import EpisodeRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import language  # noqa: E402


def test_probes_and_controls_are_never_trained_on() -> None:
    trained = {text.lower() for task in task_names() for text in instructions_for(task, "train")}
    for task, probes in language.PROBES.items():
        get_task(task)
        assert probes and not {p.lower() for p in probes} & trained, task
    assert language.NOTHING.lower() not in trained


def test_each_condition_names_what_it_says() -> None:
    assert language.other_task("cubes_red") == "cubes_green" and language.other_task("cubes_green") == "cubes_red"
    assert language.other_task("bins_can") == "bins_milk" and language.other_task("lift") == "can"
    named = language.condition_instructions("cubes_green", "named", 4, seed=0)
    assert named == [*instructions_for("cubes_green", "validation")] * 2  # alternating held-out paraphrases
    assert language.condition_instructions("cubes_red", "other", 2, 0) == ["Lift the green cube"] * 2
    words = language.condition_instructions("cubes_red", "shuffled", 1, 0)[0]
    assert sorted(words.split()) == sorted("Lift the red cube".split()) and words != "Lift the red cube"
    assert language.condition_instructions("lift", "nothing", 1, 0) == ["Do nothing."]
    with pytest.raises(UserError, match="expected NAME=FOLDER"):
        language.named_models(["runs/vla"], "--policy")


def cube_state(red_z: float, green_z: float) -> np.ndarray:
    state = np.zeros(STATE_DIM, np.float32)
    state[:3] = (0.0, 0.0, 1.2)  # the gripper high above
    state[slot_offset(0) : slot_offset(0) + 3] = (0.0, 0.0, red_z)
    state[slot_offset(1) : slot_offset(1) + 3] = (0.1, 0.0, green_z)
    return state


def test_goals_are_read_off_the_states_of_every_step() -> None:
    """The green cube lifted at one step of three: green held, red never (a wrong object for the red goal)."""
    states = np.stack([cube_state(0.82, 0.82), cube_state(0.82, 0.9), cube_state(0.82, 0.82)])
    record = EpisodeRecord("p", "cubes_red", "real", 0, 0, "Lift the red cube", False, 0.0, 2, None, states,
                           np.zeros((2, 7), np.float32))
    assert language.goals_held(record, language.scene_goals("cubes_red")) == {"cubes_red": False, "cubes_green": True}
    record.success = True  # the simulator saw the red cube up as the episode ended (its last observation lagged)
    assert language.goals_held(record, language.scene_goals("cubes_red")) == {"cubes_red": True, "cubes_green": True}
    assert ROBOT_DIM == slot_offset(0)
