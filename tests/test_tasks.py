"""The shared state layout: robomimic's object order, padding, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import UserError
from data_prep.tasks import OBJECT_DIM, STATE_DIM, TASKS, state_from_obs


@pytest.mark.parametrize("task", ["lift", "can", "square"])
def test_live_robosuite_observation_follows_robomimic_object_order(task: str) -> None:
    """robosuite 1.5 orders Can/Square's "object-state" relative-pose first; our state must not."""
    from data_prep.sim import make_env

    sim = make_env(task, seed=0)
    obs = sim.reset(7)
    state, mask = state_from_obs(obs, task)
    position_key = TASKS[task].object_keys[0]
    np.testing.assert_allclose(state[9:12], obs[position_key], rtol=0, atol=1e-6)
    relative = TASKS[task].object_keys[2]
    np.testing.assert_allclose(state[16:19], obs[relative], rtol=0, atol=1e-6)
    assert np.abs(obs[relative]).sum() > 0, "object-to-eef entries must be observed after reset, not zeros"
    assert state.shape == mask.shape == (STATE_DIM,)
    assert mask.sum() == STATE_DIM - (OBJECT_DIM - TASKS[task].object_dim)


def test_lift_object_is_zero_padded_and_masked() -> None:
    obs = {"robot0_eef_pos": np.ones(3), "robot0_eef_quat": np.ones(4), "robot0_gripper_qpos": np.ones(2),
           "object": np.full(10, 2.0)}
    state, mask = state_from_obs(obs, "lift")
    assert np.all(state[19:] == 0) and np.all(mask[19:] == 0) and np.all(mask[:19] == 1)


def test_bad_observations_name_the_key_and_the_expected_width() -> None:
    obs = {"robot0_eef_pos": np.ones(3), "robot0_eef_quat": np.ones(4), "robot0_gripper_qpos": np.ones(2)}
    with pytest.raises(UserError, match="missing observation key 'object'"):
        state_from_obs(obs, "can", source="f.hdf5")
    with pytest.raises(UserError, match="'object' has width 9, expected 14"):
        state_from_obs({**obs, "object": np.ones(9)}, "can")
    with pytest.raises(UserError, match="unknown task 'stack'"):
        state_from_obs(obs, "stack")
