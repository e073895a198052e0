"""The one way to build a robosuite environment, shared by demo generation and evaluation.

`make_env` uses robomimic's standard low-dim settings (Panda, BASIC composite controller =
OSC_POSE delta arm, 20 Hz, object observations, no cameras, sparse reward) and returns the
`env_args` dict stored in every generated HDF5 (`data.attrs["env_args"]`, robomimic layout), so
a file always records exactly how its environment was made.
"""

from __future__ import annotations

import copy as _copy
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.tasks import get_task

ROBOT = "Panda"
CONTROL_FREQ = 20
ROBOMIMIC_ENV_TYPE = 1  # robomimic.envs.env_base.EnvType.ROBOSUITE_TYPE


class _OnlyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_robosuite() -> None:
    """Drop robosuite's warnings about optional packages (at import) and INFO lines per controller load.

    A filter on its logger, rather than a level, because robosuite resets the level when imported;
    call this before the first `import robosuite` to silence the import-time warnings too.
    """
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _OnlyErrors) for f in logger.filters):
        logger.addFilter(_OnlyErrors())


def standard_env_kwargs(task: str) -> dict[str, Any]:
    """robosuite.make(**kwargs) for `task`, matching robomimic's low-dim datasets (plus the task's own `env_kwargs`)."""
    spec = get_task(task)
    return robomimic_env_kwargs(spec.horizon) | dict(spec.env_kwargs)


def robomimic_env_kwargs(horizon: int) -> dict[str, Any]:
    """robosuite.make(**kwargs) with robomimic's low-dim settings and an episode length of `horizon` steps."""
    quiet_robosuite()
    from robosuite.controllers import load_composite_controller_config

    return {
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,  # episode ends are decided by the caller (success or task horizon)
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": CONTROL_FREQ,
        "horizon": horizon,
        "controller_configs": load_composite_controller_config(controller="BASIC"),
        "robots": [ROBOT],
        "reward_shaping": False,
    }


def env_args_for(task: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """robomimic's `env_args` record: env_name, env_version, type, env_kwargs."""
    return robomimic_env_args(get_task(task).env_name, env_kwargs)


def robomimic_env_args(env_name: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """robomimic's `env_args` record of the robosuite env `env_name` built with `env_kwargs`."""
    import robosuite

    return {
        "env_name": env_name,
        "env_version": robosuite.__version__,
        "type": ROBOMIMIC_ENV_TYPE,
        "env_kwargs": env_kwargs,
    }


@dataclass
class SimEnv:
    """A robosuite env plus the env_args that rebuild it."""

    task: str
    env: Any  # robosuite.environments.ManipulationEnv
    env_args: dict[str, Any]
    sim_success: Callable[[Any], bool] | None = None  # the task's rule in the live env; None: robosuite's own

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Reset to the initial state determined by `seed` alone (independent of earlier episodes)."""
        reseed(self.env, seed)
        self.env.reset()
        # The observation reset() returns was computed before the objects settled into their sampled
        # poses: Can/Square's object-to-eef entries are all zero in it. Observe again.
        return self.env._get_observations(force_update=True)

    def success(self) -> bool:
        return bool(self.sim_success(self.env) if self.sim_success is not None else self.env._check_success())


def reseed(env: Any, seed: int) -> None:
    """Point every random source robosuite uses on reset (object sizes/placements, joint noise) at one fresh RNG.

    robosuite keeps a single `env.rng` but its placement samplers hold their own reference to it,
    so both must be replaced for a reset to depend only on `seed`.
    """
    rng = np.random.default_rng(seed)
    env.rng = rng
    samplers = [env.placement_initializer] if getattr(env, "placement_initializer", None) is not None else []
    while samplers:
        sampler = samplers.pop()
        sampler.rng = rng
        samplers.extend(getattr(sampler, "samplers", {}).values())


class CompiledModels:
    """Compile each distinct MJCF once per process: robosuite recompiles on every construction and reset.

    A robosuite env compiles two MuJoCo models when it is built and again on every (hard) reset: the
    robot alone (`RobotModel.set_mujoco_model`) and the whole scene (`MjSim.from_xml_string`), at
    ~0.1 s each. Their XML repeats: the robot's always, Can/Square's scene for every seed, Lift's
    scene between building and resetting with the same seed (its cube size is drawn per seed).
    Compiling is deterministic, so a stored model is the model a fresh compile would give.

    `copy=True` hands out copies (~30 ms; the meshes make a scene ~70 MB) because robosuite edits
    the scene's model in place (timestep, site colours). The robot-only model is shared: robosuite
    1.5 stores it in `robot_model.mujoco_model` and never reads or writes it afterwards.

    One MuJoCo global depends on parsing: `mj_saveLastXML` (robosuite's `MjModel.get_xml`, which
    robomimic stores as each demo's `model_file`) writes the last XML *parsed*, whichever env that
    was. `compile_models_once` therefore has `get_xml` parse the env's own XML again first.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, xml: str, copy: bool = True) -> Any:
        import mujoco

        model = self.models.get(xml)
        if model is None:
            self.misses += 1
            model = self.models[xml] = mujoco.MjModel.from_xml_string(xml)
            if len(self.models) > self.capacity:
                self.models.popitem(last=False)
        else:
            self.hits += 1
            self.models.move_to_end(xml)
        return _copy.copy(model) if copy else model


COMPILED = CompiledModels()


def compile_models_once() -> None:
    """Route robosuite's two model compilations through `COMPILED` (idempotent)."""
    from robosuite.models.base import MujocoXML
    from robosuite.utils.binding_utils import MjSim

    if getattr(MjSim, "_compiled_once", False):
        return

    import mujoco
    from robosuite.utils.binding_utils import MjModel

    save_last_xml = MjModel.get_xml

    def sim_from_xml_string(cls: type, xml: str) -> Any:
        sim = cls(COMPILED(xml))
        sim.model.source_xml = xml
        return sim

    def get_model(self: Any, mode: str = "mujoco") -> Any:
        if mode != "mujoco":
            raise ValueError(f"Unknown model mode: {mode}. Available options are: mujoco")
        return COMPILED(self.get_xml(), copy=False)

    def get_xml(self: Any) -> str:
        source = getattr(self, "source_xml", None)
        if source is not None:
            mujoco.MjModel.from_xml_string(source)  # make this env's XML the last one parsed (~0.1 s)
        return save_last_xml(self)

    MjSim.from_xml_string = classmethod(sim_from_xml_string)
    MujocoXML.get_model = get_model
    MjModel.get_xml = get_xml
    MjSim._compiled_once = True


def make_env(task: str, seed: int = 0) -> SimEnv:
    """Build the standard robosuite env for `task` (see module docstring), seeded with `seed`."""
    kwargs = standard_env_kwargs(task)
    spec = get_task(task)
    return SimEnv(task=task, env=build_robosuite_env(spec.env_name, kwargs, seed),
                  env_args=env_args_for(task, kwargs), sim_success=spec.sim_success)


def build_robosuite_env(env_name: str, kwargs: dict[str, Any], seed: int) -> Any:
    """robosuite.make(env_name, seed=seed, **kwargs), each MuJoCo model compiled once per process."""
    quiet_robosuite()
    import robosuite

    compile_models_once()
    env = robosuite.make(env_name, seed=seed, **kwargs)
    quiet_robosuite()
    return env
