"""The task registry and the one state layout shared by data, models and environments.

State vector (STATE_DIM = 83), identical for every task so one model serves them all:

    [ eef_pos (3) | eef_rot6 (6) | gripper_qpos (2) | slot 0 (18) | slot 1 (18) | slot 2 (18) | slot 3 (18) ]

One slot per object, zero-padded, in a fixed order per scene (`TaskSpec.slot_widths`): Lift / Can / Square fill slot
0 (its offsets are those of the single-object layout before it, docs/experiments/044), the multi-object scenes of
`data_prep.scenes` two or four slots. The state never says which object the instruction names (issue 46).

Every orientation is stored as the first two columns of its rotation matrix (the continuous 6-D
representation of Zhou et al., CVPR 2019) instead of robosuite's quaternion: a quaternion and its
negation are the same rotation, and robosuite's matrix-to-quaternion conversion jumps between the two
from one step to the next (such jumps made most of the first world model's one-step error,
docs/experiments/003). Rotation-matrix columns have no such branch, so equal poses give equal states.

Each slot follows robomimic's "object" observation of one object with each quaternion replaced by its 6-D
form: Lift's cube (and each cube of the cubes scene) -> pos 3 | rot6 6 | gripper-to-cube pos 3 (12, then 6 zeros of
padding); Can's, Square's and the nuts' and bins' objects -> pos 3 | rot6 6 | object-to-eef pos 3 | object-to-eef
rot6 6 (18). `state_mask` marks the real entries (1) vs padding (0).

robosuite 1.5 concatenates its "object-state" for Can and Square relative-pose first, so a live
observation is rebuilt in robomimic's order from the named per-object keys (`TaskSpec.object_keys`)
rather than copied from "object-state".

Each task is one `TaskSpec` entry (`register_task`): its environment, scripted expert, success rule (in the live
simulator and on a state), instructions and play-data burst chance. Every other part reads it through `get_task` and
`task_names`. A task defined outside this file registers from a plugin module (`VLA_PLUGINS`, common/plugins.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError
from common.plugins import load_plugins
from data_prep import scenes

ROBOT_KEYS: tuple[str, ...] = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ROBOT_DIMS: tuple[int, ...] = (3, 4, 2)  # widths of the raw observations (quaternion: x y z w)
OBJECT_KEY = "object"
STATE_KEYS: tuple[str, ...] = (*ROBOT_KEYS, OBJECT_KEY)
QUAT_DIM, ROT6_DIM = 4, 6
SLOT_DIM = 18  # one object's block (Can, Square: the widest), after quaternion -> rot6
MAX_SLOTS = 4  # the most objects a scene holds (bins: milk, bread, cereal, can)
ROBOT_DIM = 3 + ROT6_DIM + 2  # 11
OBJECT_DIM = SLOT_DIM * MAX_SLOTS  # 72
STATE_DIM = ROBOT_DIM + OBJECT_DIM  # 83
ACTION_DIM = 7  # OSC_POSE delta: dx dy dz dax day daz gripper
# A string stamped into datasets and model configs; two artefacts are compatible iff it matches.
STATE_LAYOUT = "eef_pos3+eef_rot6+gripper_qpos2+slots4x18pad.rot6"
# Named blocks of the state, for plots, metrics and per-block error breakdowns (slot 0's blocks by name).
STATE_SLICES: dict[str, slice] = {
    "eef pos": slice(0, 3),
    "eef rot": slice(3, 9),
    "gripper": slice(9, 11),
    "object pos": slice(11, 14),
    "object rot": slice(14, 20),
    "object-eef pos": slice(20, 23),
    "object-eef rot": slice(23, 29),  # Lift: padding
    "other objects": slice(29, STATE_DIM),  # slots 1-3 (multi-object scenes)
}


def slot_offset(slot: int) -> int:
    """Where object slot `slot` starts in the state."""
    return ROBOT_DIM + SLOT_DIM * slot
INSTRUCTIONS_COMMENT = (  # the head of a dataset's instructions.json
    "Instruction text per task. 'canonical' is the original project's phrase; 'train' paraphrases are seen during "
    "training, 'validation' paraphrases are held out and used only on validation episodes."
)


@dataclass(frozen=True)
class Instructions:
    """A task's words: the canonical instruction, the paraphrases trained on, and held-out validation paraphrases
    (only on validation episodes, never trained on)."""

    canonical: str
    train: tuple[str, ...]
    validation: tuple[str, ...]


@dataclass(frozen=True)
class SuccessRule:
    """robosuite's `_check_success` for our single-object tasks, read off a state instead of the simulator.

    The object's position must lie strictly inside the box low..high, and for Can and Square the gripper must
    have let go: robosuite requires 1 - tanh(10 d) < 0.6 for the eef-object distance d, i.e. d > atanh(0.4) / 10.
    The constants are those of `data_prep.sim.make_env`'s standard envs (checked against live robosuite in
    tests/test_tasks.py). Dreams use this to score the imagined states with the simulator's own rule.
    """

    low: tuple[float, float, float]
    high: tuple[float, float, float]
    min_eef_distance: float = 0.0

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """[..., STATE_DIM] states -> [...] bool."""
        states = np.asarray(states)
        position = states[..., STATE_SLICES["object pos"]]
        inside = np.all((position > np.asarray(self.low)) & (position < np.asarray(self.high)), axis=-1)
        distance = np.linalg.norm(states[..., STATE_SLICES["object-eef pos"]], axis=-1)
        return inside & (distance > self.min_eef_distance)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One task, registered once (`register_task`); everything the project knows about it is read from here.

    The environment: robosuite's `env_name` with robomimic's low-dim settings, `horizon` and `env_kwargs`
    (`data_prep.sim.make_env`; tasks that share an env and its construction differ in the rest). Success: in the live
    simulator `sim_success(env)` (None: robosuite's own `_check_success()`), and read off a state `success_rule`
    (dreams and recorded episodes; it must agree with the simulator's). `expert(seed=, noise=)` builds its scripted
    expert; `play_perturb_prob` is the per-step burst chance of its play data (`vla-generate`).
    """

    name: str  # short name used everywhere on the command line: lift, can, square
    env_name: str  # robosuite environment class
    horizon: int  # max control steps of one episode (robomimic's eval horizon)
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)  # robosuite.make arguments beyond robomimic's settings
    robomimic_name: str | None = None  # folder name in robomimic's published datasets (None: it has none)
    object_dim: int  # width of the unpadded "object" observation
    object_keys: tuple[str, ...]  # robosuite observation keys making up robomimic's "object", in order
    object_quats: tuple[int, ...]  # offsets of the quaternions inside robomimic's "object" vector
    # Widths of the objects in robomimic's "object" vector, in slot order (empty: one object, the whole vector).
    slot_widths: tuple[int, ...] = ()
    # How robosuite observes the object-to-eef block (configuration_vla.RELATIVE_POSE_FRAMES): "world" (Lift:
    # cube - eef, world frame) or "eef_lagged" (the object's pose in the eef frame, one control step late).
    relative_pose_frame: str = "eef_lagged"
    instructions: Instructions
    success_rule: Callable[[np.ndarray], np.ndarray]  # [..., STATE_DIM] states -> [...] bool
    sim_success: Callable[[Any], bool] | None = None  # live robosuite env -> bool; None: its `_check_success()`
    expert: Callable[..., Any]  # (seed=None, noise=0.05) -> a scripted expert (`.reset(env)`, `.act(obs)`): a class or factory
    # Per-step chance of a random-action burst in play data, so that roughly 30-60 % of its episodes fail
    # (docs/experiments/004): the longer and more precise the task, the fewer bursts it takes.
    play_perturb_prob: float
    default: bool = True  # among the tasks the commands run when told none (the robomimic three; scenes are opt-in)

    @property
    def instruction(self) -> str:
        return self.instructions.canonical

    @property
    def slots(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """Each object's (start, end) in robomimic's "object" vector and its quaternions' offsets within it."""
        bounds, start = [], 0
        for width in self.slot_widths or (self.object_dim,):
            quats = tuple(q - start for q in self.object_quats if start <= q < start + width)
            bounds.append((start, start + width, quats))
            start += width
        return bounds

    @property
    def state_slot_dims(self) -> list[int]:
        """Width of each object's slot in the state before padding (each quaternion becomes 6 numbers)."""
        return [end - start + (ROT6_DIM - QUAT_DIM) * len(quats) for start, end, quats in self.slots]


# ----- the registry ------------------------------------------------------------------------------------------------
_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task under a name of its own (a plugin module registers on import: common/plugins.py)."""
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is registered already")
    if spec.slot_widths and sum(spec.slot_widths) != spec.object_dim:
        raise ValueError(f"task {spec.name!r}: slot_widths {spec.slot_widths} do not add up to object_dim {spec.object_dim}")
    if len(spec.state_slot_dims) > MAX_SLOTS or max(spec.state_slot_dims) > SLOT_DIM:
        raise ValueError(f"task {spec.name!r}: its objects ({spec.state_slot_dims}) do not fit the state's {MAX_SLOTS} "
                         f"object slots of {SLOT_DIM}")
    _TASKS[spec.name] = spec
    return spec


def task_names() -> list[str]:
    """Every registered task, in registration order (the three robomimic tasks first)."""
    load_plugins()
    return list(_TASKS)


def default_tasks() -> list[str]:
    """The tasks the commands run when told none: Lift / Can / Square (the multi-object scenes are opt-in)."""
    return [name for name in task_names() if _TASKS[name].default]


def get_task(name: str) -> TaskSpec:
    load_plugins()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; expected one of {sorted(_TASKS)}")
    return _TASKS[name]


def task_of_env(env_name: str) -> str | None:
    """The task a robomimic file of robosuite's `env_name` holds when the file names none (robomimic's own files): the
    first registered task of that env."""
    return next((name for name in task_names() if _TASKS[name].env_name == env_name), None)


def scripted_expert(name: str) -> Callable[..., Any]:
    """The class `name` of data_prep.experts as a task's `expert`, imported when first built: the experts need scipy,
    which the dream-only Space does without."""

    def build(seed: int | None = None, noise: float = 0.05) -> Any:
        from data_prep import experts

        return getattr(experts, name)(seed=seed, noise=noise)

    return build


def make_expert(task: str, seed: int | None = None, noise: float = 0.05) -> Any:
    """The scripted expert for `task`; call `.reset(env)` then `.act(obs)` (or `expert(obs)`)."""
    return get_task(task).expert(seed=seed, noise=noise)


def success_from_state(states: np.ndarray, task: str) -> np.ndarray:
    """Whether robosuite would call each state of `task` a success ([..., 29] -> [...] bool)."""
    return get_task(task).success_rule(states)


def instructions_for(task: str, split: str) -> list[str]:
    """Paraphrases of `task` for 'train' or 'validation' (validation ones are never trained on)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split {split!r}: expected 'train' or 'validation'")
    return list(getattr(get_task(task).instructions, split))


def load_instructions() -> dict[str, dict]:
    """task -> {"canonical", "train", "validation"} for every registered task (a dataset's instructions.json)."""
    words = {name: get_task(name).instructions for name in task_names()}
    return {name: {"canonical": w.canonical, "train": list(w.train), "validation": list(w.validation)}
            for name, w in words.items()}


def instructions_json() -> str:
    """The instructions.json that `vla-preprocess` writes next to a dataset."""
    return json.dumps({"_comment": INSTRUCTIONS_COMMENT, **load_instructions()}, indent=2, ensure_ascii=False) + "\n"


# ----- the robomimic tasks ----------------------------------------------------------------------------------------
_LET_GO = float(np.arctanh(0.4) / 10.0)  # 0.042 m
register_task(TaskSpec(
    name="lift", env_name="Lift", horizon=400, robomimic_name="lift",
    object_dim=10, object_keys=("cube_pos", "cube_quat", "gripper_to_cube_pos"), object_quats=(3,),
    relative_pose_frame="world",
    instructions=Instructions(
        "Lift the red cube",
        train=("Lift the red cube", "Pick up the red block", "Raise the red cube off the table",
               "Grab the small red cube and lift it up", "Pick the red cube up from the table"),
        validation=("Hoist the red block into the air", "Take hold of the red cube and raise it"),
    ),
    # cube more than 4 cm above the table top (table_offset z = 0.8)
    success_rule=SuccessRule(low=(-np.inf, -np.inf, 0.84), high=(np.inf, np.inf, np.inf)),
    expert=scripted_expert("LiftExpert"),
    play_perturb_prob=0.06,
))
register_task(TaskSpec(
    name="can", env_name="PickPlaceCan", horizon=400, robomimic_name="can",
    object_dim=14, object_keys=("Can_pos", "Can_quat", "Can_to_robot0_eef_pos", "Can_to_robot0_eef_quat"),
    object_quats=(3, 10),
    instructions=Instructions(
        "Pick up the coke can",
        train=("Pick up the coke can", "Grab the soda can and put it in its bin", "Move the coke can to the target bin",
               "Pick the red can up and place it in the bin", "Transfer the can into the correct compartment"),
        validation=("Put the cola can into its container", "Carry the soda tin over to the bin"),
    ),
    # can inside the quarter of bin 2 assigned to it (bin2_pos (0.1, 0.28, 0.8), bin_size 0.39 x 0.49), < 10 cm up
    success_rule=SuccessRule(low=(0.1, 0.28, 0.8), high=(0.1 + 0.39 / 2, 0.28 + 0.49 / 2, 0.9), min_eef_distance=_LET_GO),
    expert=scripted_expert("CanExpert"),
    play_perturb_prob=0.02,
))
register_task(TaskSpec(
    name="square", env_name="NutAssemblySquare", horizon=400, robomimic_name="square",
    object_dim=14,
    object_keys=("SquareNut_pos", "SquareNut_quat", "SquareNut_to_robot0_eef_pos", "SquareNut_to_robot0_eef_quat"),
    object_quats=(3, 10),
    instructions=Instructions(
        "Push the square nut",
        train=("Push the square nut", "Put the square nut onto the square peg", "Fit the square nut over its peg",
               "Pick up the square nut and slide it onto the peg", "Place the square ring on the matching peg"),
        validation=("Thread the square nut down onto the post", "Mount the square washer on its rod"),
    ),
    # square nut within 3 cm of peg 1 (0.23, 0.10) in x and y, and below table_offset z 0.82 + 5 cm
    success_rule=SuccessRule(low=(0.2, 0.07, -np.inf), high=(0.26, 0.13, 0.87), min_eef_distance=_LET_GO),
    expert=scripted_expert("SquareExpert"),
    play_perturb_prob=0.01,
))


# ----- the multi-object scenes (issue 46): one task per (scene, goal), the goal named only by the instruction -------
@dataclass(frozen=True)
class GoalRule:
    """A scene goal's rule (`data_prep.scenes`) read off a state: the named object's slot and the eef position."""

    scene: str
    goal: str
    slot: int

    def __call__(self, states: np.ndarray) -> np.ndarray:
        """[..., STATE_DIM] states -> [...] bool."""
        states = np.asarray(states)
        position = states[..., slot_offset(self.slot) : slot_offset(self.slot) + 3]
        return scenes.get_goal(self.scene, self.goal).rule(position, states[..., STATE_SLICES["eef pos"]])


@dataclass(frozen=True)
class GoalInSim:
    """The same goal in the live simulator, with robosuite's own per-object checks (`scenes.goal_success`)."""

    scene: str
    goal: str

    def __call__(self, env: Any) -> bool:
        return scenes.goal_success(env, self.scene, self.goal)


def scene_expert(scene: str, goal: str) -> Callable[..., Any]:
    """A scene goal's scripted expert (data_prep.experts_multi), imported when first built (it needs scipy)."""

    def build(seed: int | None = None, noise: float = 0.05) -> Any:
        from data_prep.experts_multi import make_scene_expert

        return make_scene_expert(scene, goal, seed=seed, noise=noise)

    return build


def register_scene(scene: scenes.SceneSpec) -> None:
    """Register every goal of `scene` as the task "<scene>_<goal>" (the same env, state and expert code per goal)."""
    keys = [scene.object_keys(slot) for slot in scene.slots]
    flat = [key for slot_keys in keys for key in slot_keys]
    key_widths = [QUAT_DIM if key.endswith("_quat") else 3 for key in flat]  # positions 3, quaternions 4
    offsets = np.cumsum([0, *key_widths[:-1]])
    quats = tuple(int(offset) for offset, key in zip(offsets, flat, strict=True) if key.endswith("_quat"))
    widths = [sum(QUAT_DIM if key.endswith("_quat") else 3 for key in slot_keys) for slot_keys in keys]
    for goal in scene.goals.values():
        register_task(TaskSpec(
            name=f"{scene.name}_{goal.name}", env_name=scene.env_name, horizon=scene.horizon,
            env_kwargs=dict(scene.env_kwargs), object_dim=sum(widths), object_keys=tuple(flat),
            object_quats=quats, slot_widths=tuple(widths), relative_pose_frame=scene.relative_pose_frame,
            instructions=Instructions(goal.instruction, train=goal.train, validation=goal.validation),
            success_rule=GoalRule(scene.name, goal.name, scene.slots.index(goal.slot)),
            sim_success=GoalInSim(scene.name, goal.name), expert=scene_expert(scene.name, goal.name),
            play_perturb_prob=scene.play_perturb_prob, default=False,
        ))


for _scene in scenes.SCENES.values():
    register_scene(_scene)


def rot6_to_matrix(rot6: np.ndarray) -> np.ndarray:
    """6-D rotations [..., 6] -> rotation matrices [..., 3, 3] (Gram-Schmidt, so imagined columns need not be exact).

    numpy in, numpy out (float64) around `modeling_geometry.rot6_to_matrix`, the one implementation.
    """
    import torch

    from modeling_geometry import rot6_to_matrix as rot6_to_matrix_torch

    return rot6_to_matrix_torch(torch.as_tensor(np.asarray(rot6, dtype=np.float64))).numpy()


def relative_pose_from_poses(states: np.ndarray, prev_states: np.ndarray, task: str) -> np.ndarray:
    """`states` with the object-to-eef block recomputed from the absolute poses, as robosuite observes it.

    The relative block is a function of the eef and object poses, not a quantity of its own, so a dream can
    derive it instead of imagining it (a world model that predicts it separately can imagine the nut beside the
    fingers while the poses put it under them). The formula is robosuite 1.5's, checked against live simulators
    in tests/test_tasks.py: Lift's gripper-to-cube position is cube - eef in the world frame; Can's and Square's
    object-to-eef pose is the object's pose in the eef frame, R_eef^T (p_obj - p_eef) and R_eef^T R_obj, where the
    object pose is the one of the *previous* control step (robosuite's sensors read the object from the
    observation cache before updating it). `prev_states` holds those previous states; at a reset pass `states`.
    numpy around `modeling_geometry.relative_pose_from_poses` (computed in float64), which world models with
    `derive_relative_pose` also train through.
    """
    import torch

    from modeling_geometry import relative_pose_from_poses as relative_pose_torch

    spec = get_task(task)
    derived = relative_pose_torch(
        torch.as_tensor(np.asarray(states, dtype=np.float64)),
        torch.as_tensor(np.asarray(prev_states, dtype=np.float64)),
        torch.tensor(spec.relative_pose_frame == "eef_lagged"),
    )
    return (derived.numpy() * state_mask(task)).astype(np.float32)  # empty slots stay 0


def object_obs(obs: Mapping[str, np.ndarray], task: str, source: str = "obs") -> np.ndarray:
    """robomimic's "object" vector: the stored one if present, else rebuilt from robosuite's named keys."""
    if OBJECT_KEY in obs:
        return np.asarray(obs[OBJECT_KEY], dtype=np.float32)
    spec = get_task(task)
    missing = [key for key in spec.object_keys if key not in obs]
    if missing:
        raise UserError(f"{source}: missing observation key {OBJECT_KEY!r} (or robosuite keys {missing})")
    return np.concatenate([np.asarray(obs[key], dtype=np.float32) for key in spec.object_keys], axis=-1)


def quat_to_rot6(quat: np.ndarray) -> np.ndarray:
    """x y z w quaternions [..., 4] -> the first two rotation-matrix columns [..., 6] (col 0, then col 1).

    q and -q give the same output. A zero quaternion (robosuite reports one for a relative pose it has
    not computed yet) maps to the identity rather than NaN.
    """
    quat = np.asarray(quat, dtype=np.float64)
    norm = np.linalg.norm(quat, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(quat / np.maximum(norm, 1e-12), -1, 0)
    columns = (
        1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y),
        2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x),
    )
    return np.stack(columns, axis=-1).astype(np.float32)


def quats_to_rot6(vector: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """Replace the quaternions starting at `offsets` of the last axis by their 6-D form."""
    parts, start = [], 0
    for offset in offsets:
        parts += [vector[..., start:offset], quat_to_rot6(vector[..., offset : offset + QUAT_DIM])]
        start = offset + QUAT_DIM
    parts.append(vector[..., start:])
    return np.concatenate(parts, axis=-1)


def state_mask(task: str) -> np.ndarray:
    """1 for the state dims `task` fills, 0 for its object padding and empty slots (models keep those at 0)."""
    mask = np.zeros(STATE_DIM, dtype=np.float32)
    mask[:ROBOT_DIM] = 1.0
    for slot, width in enumerate(get_task(task).state_slot_dims):
        mask[slot_offset(slot) : slot_offset(slot) + width] = 1.0
    return mask


def state_from_obs(obs: Mapping[str, np.ndarray], task: str, source: str = "obs") -> tuple[np.ndarray, np.ndarray]:
    """Build (state, mask) in the shared layout from one observation dict or a batch of them.

    Works on single steps ([D]) and whole episodes ([T, D]). `obs` may be a robomimic HDF5 obs
    group or a robosuite observation dict (see `object_obs` for the object block).
    `source` names where obs came from, for error messages.
    """
    spec = get_task(task)
    raw = {}
    for key, dim in zip(STATE_KEYS, (*ROBOT_DIMS, spec.object_dim), strict=True):
        value = object_obs(obs, task, source) if key == OBJECT_KEY else obs.get(key)
        if value is None:
            raise UserError(f"{source}: missing observation key {key!r} (expected keys {list(STATE_KEYS)})")
        value = np.asarray(value, dtype=np.float32)
        if value.shape[-1] != dim:
            raise UserError(f"{source}: observation {key!r} has width {value.shape[-1]}, expected {dim} for task {task!r}")
        raw[key] = value
    eef_pos, eef_quat, gripper, objects = (raw[key] for key in STATE_KEYS)
    state = np.zeros((*eef_pos.shape[:-1], STATE_DIM), dtype=np.float32)
    state[..., :ROBOT_DIM] = np.concatenate([eef_pos, quat_to_rot6(eef_quat), gripper], axis=-1)
    for slot, (start, end, quats) in enumerate(spec.slots):
        block = quats_to_rot6(objects[..., start:end], quats)
        state[..., slot_offset(slot) : slot_offset(slot) + block.shape[-1]] = block
    return state, np.broadcast_to(state_mask(task), state.shape).copy()
