"""Multi-object scenes where the instruction names the goal: env construction, object slots, per-goal success.

Three robosuite environments with every object present (robomimic's low-dim settings, as `data_prep.sim`):

    scene   robosuite env                        slots (fixed order)               goals
    cubes   Stack (red cubeA, green cubeB)       red_cube, green_cube              red, green: lift that cube
    nuts    NutAssembly, single_object_mode=0    square_nut, round_nut             square, round: that nut on its peg
    bins    PickPlace, single_object_mode=0      milk, bread, cereal, can          milk, bread, cereal, can: into its bin

The goal lives only in the instruction: the env, its reset and its observations do not depend on it (same seed,
any goal: bit-identical initial state). robosuite's own `_check_success` in these envs needs *every* object
placed (Stack: cube A stacked on B), so each goal has its own rule, in two equivalent forms:

* `goal_success(env, scene, goal)`: from the live simulator, with robosuite's per-object checks (`on_peg`,
  `not_in_bin`, and the let-go test of their `_check_success`; Lift's "4 cm above the table" for the cubes);
* `success_from_poses(scene, goal, poses, eef_pos)`: the same rule as a function of recorded object poses and the
  eef position alone, so a recorded episode can be relabelled under every goal of its scene.

Each (scene, goal) is a task of the task registry, "<scene>_<goal>" (`data_prep.tasks` registers them from `SCENES`;
build one with `data_prep.sim.make_env("cubes_red")`). Only pure functions of poses and the live env live here, so
the registry can import this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError

# robosuite's "the gripper has let go" test: 1 - tanh(10 d) < 0.6 for the eef-object distance d.
LET_GO_DISTANCE = float(np.arctanh(0.4) / 10.0)  # 0.042 m
LIFT_MARGIN = 0.04  # Lift's rule: the cube's centre more than 4 cm above the table top
STACK_TABLE_Z = 0.8  # Stack's table_offset z (fixed in robosuite 1.5's Stack)
PEG_XY = ((0.23, 0.10), (0.23, -0.10))  # NutAssembly's peg1 (square) and peg2 (round), PegsArena
PEG_HALF_WIDTH = 0.03  # NutAssembly.on_peg: |dx|, |dy| < 3 cm
PEG_MAX_Z = 0.82 + 0.05  # NutAssembly.on_peg: nut centre below table_offset z + 5 cm
BIN2_POS = (0.1, 0.28, 0.8)  # PickPlace's target bin
BIN_SIZE = (0.39, 0.49)  # PickPlace's bin_size (its arena's table_full_size), x and y


@dataclass(frozen=True)
class PoseBox:
    """Success as a box on the object's centre (strict bounds), optionally with the gripper let go."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]
    let_go: bool = False

    def __call__(self, pos: np.ndarray, eef_pos: np.ndarray) -> np.ndarray:
        """[..., 3] object centres and eef positions -> [...] bool."""
        pos = np.asarray(pos, dtype=np.float64)
        inside = np.all((pos > np.asarray(self.low)) & (pos < np.asarray(self.high)), axis=-1)
        if not self.let_go:
            return inside
        distance = np.linalg.norm(pos - np.asarray(eef_pos, dtype=np.float64), axis=-1)
        return inside & (distance > LET_GO_DISTANCE)


def bin_box(index: int) -> PoseBox:
    """PickPlace.not_in_bin's quadrant `index` of bin 2 (0 milk, 1 bread, 2 cereal, 3 can), up to 10 cm high."""
    x_low, y_low, z = BIN2_POS
    if index in (0, 2):
        x_low -= BIN_SIZE[0] / 2
    if index < 2:
        y_low -= BIN_SIZE[1] / 2
    return PoseBox((x_low, y_low, z), (x_low + BIN_SIZE[0] / 2, y_low + BIN_SIZE[1] / 2, z + 0.1), let_go=True)


def peg_box(index: int) -> PoseBox:
    x, y = PEG_XY[index]
    return PoseBox((x - PEG_HALF_WIDTH, y - PEG_HALF_WIDTH, -np.inf), (x + PEG_HALF_WIDTH, y + PEG_HALF_WIDTH, PEG_MAX_Z),
                   let_go=True)


LIFTED = PoseBox((-np.inf, -np.inf, STACK_TABLE_Z + LIFT_MARGIN), (np.inf, np.inf, np.inf))


@dataclass(frozen=True)
class GoalSpec:
    name: str  # short name within its scene: red, square, milk, ...
    slot: str  # the object the instruction names (one of the scene's slots)
    instruction: str  # canonical wording (issue 46)
    kind: str  # "lifted" | "on_peg" | "in_bin"
    index: int = 0  # robosuite's index of the peg / bin quadrant (and of the object in env.nuts / env.objects)
    train: tuple[str, ...] = ()  # paraphrases trained on (the canonical one first)
    validation: tuple[str, ...] = ()  # held-out paraphrases (validation episodes only)

    @property
    def rule(self) -> PoseBox:
        return {"lifted": lambda: LIFTED, "on_peg": lambda: peg_box(self.index),
                "in_bin": lambda: bin_box(self.index)}[self.kind]()


@dataclass(frozen=True)
class SceneSpec:
    name: str
    env_name: str  # robosuite environment class
    slots: tuple[str, ...]  # fixed object order of the scene
    objects: tuple[str, ...]  # robosuite object name of each slot (its observation keys' prefix)
    goals: dict[str, GoalSpec]
    horizon: int  # max control steps of one episode
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # beyond robomimic's settings
    # How robosuite observes each object relative to the gripper: "world" (Stack, as Lift: object - eef position)
    # or "eef_lagged" (NutAssembly, PickPlace, as Can / Square: the object's pose in the eef frame, one step late).
    relative_pose_frame: str = "eef_lagged"
    play_perturb_prob: float = 0.02  # per-step burst chance of play data (data_prep.tasks.TaskSpec)

    def object_name(self, slot: str) -> str:
        return self.objects[self.slots.index(slot)]

    def object_keys(self, slot: str) -> tuple[str, ...]:
        """robosuite's observation keys of one object, in the order of a single-object task's "object" vector."""
        name = self.object_name(slot)
        if self.relative_pose_frame == "world":
            return f"{name}_pos", f"{name}_quat", f"gripper_to_{name}"
        return f"{name}_pos", f"{name}_quat", f"{name}_to_robot0_eef_pos", f"{name}_to_robot0_eef_quat"


def _goals(*goals: GoalSpec) -> dict[str, GoalSpec]:
    return {goal.name: goal for goal in goals}


def _cube(name: str, colour: str) -> GoalSpec:
    return GoalSpec(
        name, f"{colour}_cube", f"Lift the {colour} cube", "lifted",
        train=(f"Lift the {colour} cube", f"Pick up the {colour} block", f"Raise the {colour} cube off the table",
               f"Grab the {colour} cube and lift it up", f"Pick the {colour} block up from the table"),
        validation=(f"Hoist the {colour} block into the air", f"Take hold of the {colour} cube and raise it"),
    )


def _nut(name: str, index: int) -> GoalSpec:
    return GoalSpec(
        name, f"{name}_nut", f"Put the {name} nut on the {name} peg", "on_peg", index,
        train=(f"Put the {name} nut on the {name} peg", f"Fit the {name} nut over its peg",
               f"Pick up the {name} nut and slide it onto its peg", f"Place the {name} nut on the matching peg",
               f"Move the {name} nut onto the {name} peg"),
        validation=(f"Thread the {name} nut down onto its post", f"Mount the {name} ring on the {name} rod"),
    )


def _bin_goal(name: str, thing: str, index: int, other_words: tuple[str, str]) -> GoalSpec:
    return GoalSpec(
        name, name, f"Put the {thing} in its bin", "in_bin", index,
        train=(f"Put the {thing} in its bin", f"Move the {thing} to its bin", f"Pick up the {thing} and drop it in "
               "its bin", f"Place the {thing} in the matching bin", f"Transfer the {thing} into its compartment"),
        validation=(f"Carry the {other_words[0]} over to its container", f"Drop the {other_words[1]} into its slot"),
    )


SCENES: dict[str, SceneSpec] = {
    "cubes": SceneSpec(
        "cubes", "Stack", ("red_cube", "green_cube"), ("cubeA", "cubeB"),
        _goals(_cube("red", "red"), _cube("green", "green")),
        horizon=400, relative_pose_frame="world", play_perturb_prob=0.06,
    ),
    "nuts": SceneSpec(
        "nuts", "NutAssembly", ("square_nut", "round_nut"), ("SquareNut", "RoundNut"),
        _goals(_nut("square", 0), _nut("round", 1)),
        horizon=400, env_kwargs={"single_object_mode": 0}, play_perturb_prob=0.01,
    ),
    "bins": SceneSpec(
        "bins", "PickPlace", ("milk", "bread", "cereal", "can"), ("Milk", "Bread", "Cereal", "Can"),
        _goals(_bin_goal("milk", "milk carton", 0, ("milk carton", "milk")),
               _bin_goal("bread", "bread", 1, ("loaf of bread", "bread")),
               _bin_goal("cereal", "cereal box", 2, ("cereal box", "cereal")),
               _bin_goal("can", "coke can", 3, ("coke can", "soda can"))),
        horizon=500, env_kwargs={"single_object_mode": 0}, play_perturb_prob=0.02,
    ),
}
ENV_TO_SCENE = {spec.env_name: name for name, spec in SCENES.items()}
# Each (scene, goal) is one task: "<scene>_<goal>", e.g. "cubes_red" (its registry name and the expert's task).
GOAL_TASKS: dict[str, tuple[str, str]] = {f"{scene}_{goal}": (scene, goal) for scene, spec in SCENES.items()
                                          for goal in spec.goals}


def get_scene(name: str) -> SceneSpec:
    if name not in SCENES:
        raise UserError(f"unknown scene {name!r}; expected one of {sorted(SCENES)}")
    return SCENES[name]


def get_goal(scene: str, goal: str) -> GoalSpec:
    spec = get_scene(scene)
    if goal not in spec.goals:
        raise UserError(f"unknown goal {goal!r} for scene {scene!r}; expected one of {sorted(spec.goals)}")
    return spec.goals[goal]


def scene_of(env: Any) -> str:
    """The scene a live robosuite env belongs to (from its class)."""
    name = type(env).__name__
    if name not in ENV_TO_SCENE:
        raise UserError(f"robosuite env {name!r} is not a multi-object scene; expected one of {sorted(ENV_TO_SCENE)}")
    return ENV_TO_SCENE[name]


# ----- object poses ------------------------------------------------------------------------------------------------
Pose = tuple[np.ndarray, np.ndarray]  # position [..., 3], quaternion x y z w [..., 4] (robosuite's observation order)


def object_body_id(env: Any, name: str) -> int:
    """MuJoCo body id of the robosuite object `name` (cubeA, SquareNut, Milk, ...)."""
    return int(env.sim.model.body_name2id(f"{name}_main"))


def object_poses(env: Any) -> dict[str, Pose]:
    """Every object's pose in the live env, keyed by slot in the scene's fixed order (as robosuite observes them)."""
    from robosuite.utils.transform_utils import convert_quat

    spec = get_scene(scene_of(env))
    poses = {}
    for slot, name in zip(spec.slots, spec.objects, strict=True):
        body = object_body_id(env, name)
        poses[slot] = (np.array(env.sim.data.body_xpos[body]), convert_quat(np.array(env.sim.data.body_xquat[body]),
                                                                            to="xyzw"))
    return poses


def object_poses_from_obs(obs: Mapping[str, np.ndarray], scene: str, source: str = "obs") -> dict[str, Pose]:
    """The same dict from robosuite's observation keys (`<name>_pos`, `<name>_quat`), one step [D] or many [T, D]."""
    spec = get_scene(scene)
    poses = {}
    for slot, name in zip(spec.slots, spec.objects, strict=True):
        keys = (f"{name}_pos", f"{name}_quat")
        missing = [key for key in keys if key not in obs]
        if missing:
            raise UserError(f"{source}: missing observation keys {missing} for slot {slot!r} of scene {scene!r}")
        poses[slot] = tuple(np.asarray(obs[key], dtype=np.float64) for key in keys)
    return poses


# ----- success -----------------------------------------------------------------------------------------------------
def success_from_poses(scene: str, goal: str, poses: Mapping[str, Pose], eef_pos: np.ndarray) -> np.ndarray:
    """Whether `goal` holds, from the object poses and the eef position alone ([..., 3] -> [...] bool)."""
    spec = get_goal(scene, goal)
    return spec.rule(poses[spec.slot][0], eef_pos)


def successes_from_poses(scene: str, poses: Mapping[str, Pose], eef_pos: np.ndarray) -> dict[str, np.ndarray]:
    """Every goal of `scene` at once (relabelling one recorded episode under each goal)."""
    return {goal: success_from_poses(scene, goal, poses, eef_pos) for goal in get_scene(scene).goals}


def goal_success(env: Any, scene: str, goal: str) -> bool:
    """Whether `goal` holds in the live simulator, by robosuite's own per-object checks."""
    spec = get_goal(scene, goal)
    pos = np.array(env.sim.data.body_xpos[object_body_id(env, get_scene(scene).object_name(spec.slot))])
    if spec.kind == "lifted":
        return bool(pos[2] > env.table_offset[2] + LIFT_MARGIN)
    robot = env.robots[0]
    distance = min(np.linalg.norm(env.sim.data.site_xpos[robot.eef_site_id[arm]] - pos) for arm in robot.arms)
    let_go = 1 - np.tanh(10.0 * distance) < 0.6  # as in their _check_success
    placed = env.on_peg(pos, spec.index) if spec.kind == "on_peg" else not env.not_in_bin(pos, spec.index)
    return bool(placed and let_go)


def eef_pos(env: Any) -> np.ndarray:
    """The eef site position (robosuite's `robot0_eef_pos`)."""
    robot = env.robots[0]
    return np.array(env.sim.data.site_xpos[robot.eef_site_id[robot.arms[0]]])
