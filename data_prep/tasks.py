"""The task registry and the one state layout shared by data, models and environments.

State vector (STATE_DIM = 23), identical for every task so one model serves all three:

    [ robot0_eef_pos (3) | robot0_eef_quat (4) | robot0_gripper_qpos (2) | object (14, zero-padded) ]

Lift's "object" observation is 10-D (cube pos, cube quat, gripper-to-cube pos); Can's and
Square's are 14-D (pos, quat, object-to-eef pos, object-to-eef quat). Narrower object vectors
are zero-padded on the right and `state_mask` marks the real entries (1) vs padding (0).

The object block always follows robomimic's order (position first). robosuite 1.5 concatenates
its "object-state" for Can and Square relative-pose first, so a live observation is rebuilt from
the named per-object keys (`TaskSpec.object_keys`) rather than copied from "object-state".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from data_prep.errors import UserError

ROBOT_KEYS: tuple[str, ...] = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ROBOT_DIMS: tuple[int, ...] = (3, 4, 2)
OBJECT_KEY = "object"
OBJECT_DIM = 14
STATE_KEYS: tuple[str, ...] = (*ROBOT_KEYS, OBJECT_KEY)
STATE_DIM = sum(ROBOT_DIMS) + OBJECT_DIM  # 23
ACTION_DIM = 7  # OSC_POSE delta: dx dy dz dax day daz gripper
# A string stamped into datasets and model configs; two artefacts are compatible iff it matches.
STATE_LAYOUT = "eef_pos3+eef_quat4+gripper_qpos2+object14pad"
INSTRUCTIONS_FILE = Path(__file__).with_name("instructions.json")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # short name used everywhere on the command line: lift, can, square
    env_name: str  # robosuite environment class
    object_dim: int  # width of the unpadded "object" observation
    horizon: int  # max control steps of one episode (robomimic's eval horizon)
    robomimic_name: str  # folder name in robomimic's published datasets
    object_keys: tuple[str, ...]  # robosuite observation keys making up robomimic's "object", in order

    @property
    def instruction(self) -> str:
        return load_instructions()[self.name]["canonical"]


TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("lift", "Lift", 10, 400, "lift", ("cube_pos", "cube_quat", "gripper_to_cube_pos")),
    "can": TaskSpec(
        "can", "PickPlaceCan", 14, 400, "can",
        ("Can_pos", "Can_quat", "Can_to_robot0_eef_pos", "Can_to_robot0_eef_quat"),
    ),
    "square": TaskSpec(
        "square", "NutAssemblySquare", 14, 400, "square",
        ("SquareNut_pos", "SquareNut_quat", "SquareNut_to_robot0_eef_pos", "SquareNut_to_robot0_eef_quat"),
    ),
}
ENV_TO_TASK = {spec.env_name: name for name, spec in TASKS.items()}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


@cache
def load_instructions() -> dict[str, dict]:
    data = json.loads(INSTRUCTIONS_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def instructions_for(task: str, split: str) -> list[str]:
    """Paraphrases of `task` for 'train' or 'validation' (validation ones are never trained on)."""
    get_task(task)
    return list(load_instructions()[task][split])


def object_obs(obs: Mapping[str, np.ndarray], task: str, source: str = "obs") -> np.ndarray:
    """robomimic's "object" vector: the stored one if present, else rebuilt from robosuite's named keys."""
    if OBJECT_KEY in obs:
        return np.asarray(obs[OBJECT_KEY], dtype=np.float32)
    spec = get_task(task)
    missing = [key for key in spec.object_keys if key not in obs]
    if missing:
        raise UserError(f"{source}: missing observation key {OBJECT_KEY!r} (or robosuite keys {missing})")
    return np.concatenate([np.asarray(obs[key], dtype=np.float32) for key in spec.object_keys], axis=-1)


def state_from_obs(obs: Mapping[str, np.ndarray], task: str, source: str = "obs") -> tuple[np.ndarray, np.ndarray]:
    """Build (state, mask) in the shared layout from one observation dict or a batch of them.

    Works on single steps ([D]) and whole episodes ([T, D]). `obs` may be a robomimic HDF5 obs
    group or a robosuite observation dict (see `object_obs` for the object block).
    `source` names where obs came from, for error messages.
    """
    spec = get_task(task)
    parts = []
    for key, dim in zip(STATE_KEYS, (*ROBOT_DIMS, spec.object_dim), strict=True):
        value = object_obs(obs, task, source) if key == OBJECT_KEY else obs.get(key)
        if value is None:
            raise UserError(f"{source}: missing observation key {key!r} (expected keys {list(STATE_KEYS)})")
        value = np.asarray(value, dtype=np.float32)
        if value.shape[-1] != dim:
            raise UserError(f"{source}: observation {key!r} has width {value.shape[-1]}, expected {dim} for task {task!r}")
        parts.append(value)
    pad = OBJECT_DIM - spec.object_dim
    if pad:
        parts.append(np.zeros((*parts[0].shape[:-1], pad), dtype=np.float32))
    state = np.concatenate(parts, axis=-1)
    mask = np.ones(STATE_DIM, dtype=np.float32)
    mask[STATE_DIM - pad :] = 0.0
    return state, np.broadcast_to(mask, state.shape).copy()
