"""The shared robosuite env: compiling each MJCF once per process must not change a single number."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.sim import COMPILED, make_env


def _play(task: str, seed: int, clear_between: bool) -> np.ndarray:
    """Build, reset and step an env with fixed actions; return every observed robot/object vector."""
    if clear_between:
        COMPILED.models.clear()
    sim = make_env(task, seed=seed)
    if clear_between:
        COMPILED.models.clear()  # the reset compiles afresh too
    obs = sim.reset(seed)
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(6, 7))
    trace = [np.concatenate([obs["robot0_proprio-state"], obs["object-state"]])]
    for action in actions:
        obs, _, _, _ = sim.env.step(action)
        trace.append(np.concatenate([obs["robot0_proprio-state"], obs["object-state"]]))
    sim.env.close()
    return np.stack(trace)


@pytest.mark.parametrize("task", ["lift", "square"])
def test_reused_compilations_replay_fresh_ones_bit_for_bit(task: str) -> None:
    """Lift's scene differs per seed (a miss), Square's never does (a hit): both must match fresh compiles."""
    make_env(task, seed=0).reset(1)  # warm the cache with this task's robot and scene
    hits = COMPILED.hits
    cached = _play(task, 11, clear_between=False)
    assert COMPILED.hits >= hits + (2 if task == "lift" else 4)  # robot x2 always; the scene too for square
    fresh = _play(task, 11, clear_between=True)
    np.testing.assert_array_equal(cached, fresh)


def test_every_env_gets_its_own_model_copy() -> None:
    """robosuite edits its model in place (timestep, site colours), so two envs must never share one."""
    a, b = make_env("can", seed=0), make_env("can", seed=1)
    assert a.env.sim.model._model is not b.env.sim.model._model
    a.env.sim.model._model.opt.timestep = 0.5
    assert b.env.sim.model._model.opt.timestep == pytest.approx(0.002)
    assert all(m.opt.timestep == pytest.approx(0.002) for m in COMPILED.models.values())


def test_saved_xml_is_the_envs_own_scene_even_after_a_cache_hit() -> None:
    """MuJoCo's `mj_saveLastXML` writes the last *parsed* XML; a reused model must still save its own scene.

    robomimic stores `env.sim.model.get_xml()` as each demo's `model_file`, and
    `reset_from_xml_string(model_file)` must rebuild that very scene, not whichever one was compiled last.
    """
    make_env("lift", seed=0)
    lift = make_env("lift", seed=0)  # every compilation of this env is a hit
    COMPILED.models.clear()
    make_env("can", seed=0)  # the last XML MuJoCo parsed is now Can's scene
    saved = lift.env.sim.model.get_xml()
    assert 'name="cube_g0_vis"' in saved and 'name="Can_g0"' not in saved
    lift.env.reset_from_xml_string(saved)
    assert lift.env.sim.model.geom_name2id("cube_g0_vis") >= 0
