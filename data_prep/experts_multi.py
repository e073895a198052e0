"""Scripted experts for the multi-object scenes (`data_prep.scenes`): the goal (ground truth) says which object.

Each is the single-object expert of `data_prep.experts` (same phases, servo, restart on slip or stall) pointed at
the named object, plus what the other objects need: among the grasp yaws the object allows, the gripper turns to one
whose open fingers and 20 cm hand come down clear of the other objects and the bin walls (`clearest_yaw`), and in
the bins scene it moves over the start bin high, carries the object above everything and sets it down near the
target bin's floor.

    expert = make_scene_expert("cubes", "green", seed=0)
    expert.reset(env)
    action = expert.act(obs)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.experts import (
    GRIPPER_OPEN,
    WRIST_YAW_RANGE,
    CanExpert,
    Goal,
    LiftExpert,
    Phase,
    ScriptedExpert,
    SquareExpert,
    nearest_symmetric_yaw,
    wrap_angle,
    yaw_of,
)
from data_prep.scenes import get_goal, get_scene, object_body_id

# The open Panda gripper seen from the eef site (measured on its collision meshes): along the fingers' closing axis,
# fingertips out to 5 cm, from 1 cm below the site; the hand out to 10 cm and 3.5 cm across, from 2.9 cm above it.
FINGER_REACH, FINGER_BELOW = 0.05, 0.01
HAND_REACHES, HAND_ACROSS, HAND_ABOVE = (0.05, 0.075, 0.1), 0.035, 0.029
WIDTH_WEIGHT = 0.5  # weight of the clearance of the hand's full width, next to that of its centre line
CLEARANCE = 0.02  # m of free space around the fingers and hand that counts as clear of obstacles
TURN_COST = 0.01  # m of clearance a quarter turn of the wrist is worth (prefer small turns among clear yaws)
FREE_STEP = np.pi / 8  # rad between the candidate yaws of an object that fits the fingers at any yaw
OFF_FACE_COST = 0.02  # m of clearance per rad that a grasp between an object's faces costs


def closing_axis(yaw: float) -> np.ndarray:
    """World xy direction along which the fingers close for gripper yaw `yaw` (experts.GRIPPER_DOWN: -y at 0)."""
    return np.array([np.sin(yaw), -np.cos(yaw)])


@dataclass(frozen=True)
class Block:
    """An obstacle: an upright box (xy centre, heading, xy half sizes) reaching up to height `top`."""

    centre: np.ndarray
    yaw: float
    half: np.ndarray
    top: float

    def gap(self, point: np.ndarray) -> float:
        """Distance from an xy point to the box's footprint (negative inside)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        d = point - self.centre
        outside = np.abs([c * d[0] + s * d[1], -s * d[0] + c * d[1]]) - self.half
        return float(np.linalg.norm(np.maximum(outside, 0.0))) if np.any(outside > 0) else float(np.max(outside))


@dataclass(frozen=True)
class Walls:
    """The inside of a bin: xy low and high corners, walls up to height `top`."""

    low: np.ndarray
    high: np.ndarray
    top: float

    def gap(self, point: np.ndarray) -> float:
        return float(np.min(np.concatenate([point - self.low, self.high - point])))


def clearance(grasp: np.ndarray, yaw: float, blocks: list[Block], walls: Walls | None = None,
              across: float = 0.0) -> float:
    """Smallest gap between the open gripper at eef position `grasp` (xyz, yaw) and the obstacles tall enough to reach
    its fingertips or its hand; `across`: also probe the hand that far to each side of the closing axis."""
    along, side_axis = closing_axis(yaw), closing_axis(yaw + np.pi / 2)
    probes = [(FINGER_REACH * along, grasp[2] - FINGER_BELOW)]
    probes += [(reach * along + offset * side_axis, grasp[2] + HAND_ABOVE)
               for reach in HAND_REACHES for offset in sorted({-across, 0.0, across})]
    gaps = []
    for side in (-1.0, 1.0):
        for offset, z in probes:
            point = grasp[:2] + side * offset
            gaps += [block.gap(point) for block in blocks if block.top > z]
            if walls is not None and walls.top > z:
                gaps.append(walls.gap(point))
    return min(gaps, default=np.inf)


def clearest_yaw(eef_yaw: float, object_yaw: float, period: float, grasp: np.ndarray, blocks: list[Block],
                 walls: Walls | None = None, free: bool = False,
                 yaw_range: tuple[float, float] = WRIST_YAW_RANGE) -> float:
    """Among the grasp yaws `object_yaw + k period` in `yaw_range`, the one whose gripper comes down clear of the
    other objects and the walls (a small turn preferred among clear ones; the clearest one if none is clear).

    `free`: the object also fits the fingers across its faces (its diagonal is narrower than the open gripper), so
    yaws between the faces, every FREE_STEP, are candidates too, each at a cost for leaving the faces.
    """
    base = nearest_symmetric_yaw(eef_yaw, object_yaw, period)
    step = FREE_STEP if free else period
    count = int(np.ceil(2 * np.pi / step))
    candidates = [base + k * step for k in range(-count, count + 1)
                  if yaw_range[0] <= base + k * step <= yaw_range[1]] or [base]

    def score(yaw: float) -> float:
        off_face = abs(wrap_angle(yaw - object_yaw, period))
        # The fingers and the hand's centre line first; among yaws as good, the one that also clears the hand's width.
        return (min(clearance(grasp, yaw, blocks, walls), CLEARANCE)
                + WIDTH_WEIGHT * min(clearance(grasp, yaw, blocks, walls, HAND_ACROSS), CLEARANCE)
                - TURN_COST * abs(yaw - eef_yaw) / (np.pi / 2) - OFF_FACE_COST * off_face)

    return max(candidates, key=score)


def object_blocks(env, name: str) -> list[Block]:
    """The collision geoms of robosuite object `name` as upright boxes (their bounding boxes, posed in the world)."""
    model = next(obj for obj in env.model.mujoco_objects if obj.name == name)
    mj, data = env.sim.model, env.sim.data
    blocks = []
    for geom in model.contact_geoms:
        g = mj.geom_name2id(geom)
        rotation = np.array(data.geom_xmat[g]).reshape(3, 3)
        centre = np.array(data.geom_xpos[g]) + rotation @ mj.geom_aabb[g][:3]
        blocks.append(Block(centre[:2], yaw_of(rotation), np.array(mj.geom_aabb[g][3:5]), centre[2] + mj.geom_aabb[g][5]))
    return blocks


class GoalMixin:
    """What a multi-object expert knows about its scene: the named object and the others."""

    scene: str = ""
    yaw_range = WRIST_YAW_RANGE  # grasp yaws to choose from

    def __init__(self, goal: str, seed: int | None = None, noise: float = 0.05):
        super().__init__(seed=seed, noise=noise)
        self.goal = goal
        self.task = f"{self.scene}_{goal}"
        spec = get_goal(self.scene, goal)
        scene = get_scene(self.scene)
        self.object_name = scene.object_name(spec.slot)
        self.other_names = [name for name in scene.objects if name != self.object_name]
        self.goal_index = spec.index

    def start_attempt(self) -> None:
        super().start_attempt()
        self.chosen_yaw: float | None = None

    def obstacles(self) -> list[Block]:
        return [block for name in self.other_names for block in object_blocks(self.env, name)]

    def walls(self) -> Walls | None:
        """Walls around the objects at the start, if any, that the fingers and hand must not hit."""
        return None

    def grasp_eef(self) -> np.ndarray:
        """Where the eef closes the fingers."""
        raise NotImplementedError

    def tracked_yaw(self, object_yaw: float, period: float, free: bool = False) -> float:
        """The grasp yaw chosen once per attempt (`clearest_yaw`), turning with the object if it turns."""
        if self.chosen_yaw is None:
            self.chosen_yaw = clearest_yaw(self.eef_yaw, object_yaw, period, self.grasp_eef(), self.obstacles(),
                                           self.walls(), free, self.yaw_range)
            self.chosen_for = object_yaw
        return self.chosen_yaw + wrap_angle(object_yaw - self.chosen_for)


class CubeLiftExpert(GoalMixin, LiftExpert):
    """cubes scene: lift the named cube (Lift's expert), fingers closing clear of the other cube."""

    scene = "cubes"

    def cube_id(self) -> int:
        return object_body_id(self.env, self.object_name)

    def object_pos(self) -> np.ndarray:
        return self.body_pos(self.cube_id())

    def grasp_object(self):
        return getattr(self.env, self.object_name)

    def grasp_eef(self) -> np.ndarray:
        return self.object_pos() + [0, 0, -0.005]  # LiftExpert's descend

    def cube_yaw(self) -> float:
        return self.tracked_yaw(self.body_yaw(self.cube_id()), np.pi / 2)


class NutExpert(GoalMixin, SquareExpert):
    """nuts scene: the named nut onto its own peg (Square's expert; the round nut needs no squaring but gets it)."""

    scene = "nuts"

    def nut_id(self) -> int:
        return object_body_id(self.env, self.object_name)

    def object_pos(self) -> np.ndarray:
        return np.array(self.env.sim.data.site_xpos[self.env.object_site_ids[self.goal_index]])

    def grasp_object(self):
        return self.env.nuts[self.goal_index]

    def peg_pos(self) -> np.ndarray:
        return self.body_pos((self.env.peg1_body_id, self.env.peg2_body_id)[self.goal_index])


@dataclass(frozen=True)
class BinObject:
    """How the bins expert handles one object (heights relative to the object's body centre, upright)."""

    grasp: float  # grasp point above the centre (tall objects: in their upper part, under the palm)
    bottom: float  # centre above the object's bottom
    period: float  # the grasp yaw repeats every `period` (fingers must close across a face that fits)
    yaw_from_object: bool = True  # False: round, any yaw grips it
    free: bool = False  # the diagonal fits the open fingers too: grasps between the faces are allowed (clearest_yaw)
    place_offset: tuple[float, float] = (0.0, 0.0)  # drop point relative to the quadrant's centre


BIN_OBJECTS: dict[str, BinObject] = {
    # 4 x 4 cm carton, 14.4 cm tall, gabled: the palm (3.3 cm above the eef site) must clear the ridge, so the fingers
    # close on the two vertical gable ends (across the body y axis).
    "Milk": BinObject(grasp=0.057, bottom=0.061, period=np.pi),
    # 4.8 x 4 x 4.8 cm: either face fits, and the 6.2 cm diagonal too (a low object beside tall ones and the walls
    # often leaves the 20 cm hand no room at the face yaws).
    "Bread": BinObject(grasp=-0.005, bottom=0.024, period=np.pi / 2, free=True),
    # 10 x 3 x 15 cm: the fingers close across the 3 cm. The descent aims 3.5 cm above the centre and ends ~8 mm higher,
    # where the palm meets the top (inside the descend phase's 1 cm tolerance).
    "Cereal": BinObject(grasp=0.03, bottom=0.075, period=np.pi),
    # The can's quadrant centre is out of reach: the single-object expert's drop point (experts.CanExpert).
    "Can": BinObject(grasp=0.0, bottom=0.04, period=FREE_STEP, yaw_from_object=False,
                     place_offset=(-0.035, -0.055)),
}
CLEAR_Z = 0.995  # a carried object's bottom stays above this: the bin walls (0.9 m) and the others' tops (<= 0.97 m)
APPROACH_Z = 1.05  # gripper height while it moves over the start bin: fingertips above every object's top
FLOOR_GAP = 0.015  # the object's bottom above the target bin's floor (0.82 m) when it is let go


class BinExpert(GoalMixin, CanExpert):
    """bins scene: the named object into its quadrant of the target bin (the Can expert, generalised): come in high,
    grasp with the fingers clear of the others, carry it over everything, set it down just above the bin floor."""

    scene = "bins"
    # Turned below -1 rad the arm falls 2-13 cm short of the far quadrants (cereal, can) at carrying height.
    yaw_range = (-1.0, WRIST_YAW_RANGE[1])

    def __init__(self, goal: str, seed: int | None = None, noise: float = 0.05):
        super().__init__(goal, seed=seed, noise=noise)
        self.spec = BIN_OBJECTS[self.object_name]
        self.carry_z = CLEAR_Z + self.spec.bottom + self.spec.grasp + self.grasp_height
        self.release_height = (0.82 - 0.8) + FLOOR_GAP + self.spec.bottom + self.spec.grasp + self.grasp_height
        self.place_offset = np.array([*self.spec.place_offset, 0.0])

    def body_id(self) -> int:
        return object_body_id(self.env, self.object_name)

    def object_pos(self) -> np.ndarray:
        return self.body_pos(self.body_id()) + [0, 0, self.spec.grasp]

    def grasp_object(self):
        return self.env.objects[self.goal_index]

    def walls(self) -> Walls:
        # The start bin's inner faces (BinsArena: 2 cm walls centred 5 mm outside bin_size / 2, 10 cm tall).
        half = np.array(self.env.bin_size[:2]) / 2 - 0.005
        centre = np.array(self.env.bin1_pos)
        return Walls(centre[:2] - half, centre[:2] + half, centre[2] + 0.1)

    def grasp_eef(self) -> np.ndarray:
        return self.object_pos() + [0, 0, self.grasp_height]  # CanExpert's descend

    def target(self) -> np.ndarray:
        return np.array(self.env.target_bin_placements[self.goal_index]) + self.place_offset

    def grasp_yaw(self) -> float:
        # Follow the object until the fingers close; then hold the yaw (a held object turns with the wrist).
        if self.phase not in ("approach", "above", "descend"):
            if self.held_yaw is None:
                self.held_yaw = self.eef_yaw
            return self.held_yaw
        object_yaw = self.body_yaw(self.body_id()) if self.spec.yaw_from_object else 0.0
        return self.tracked_yaw(object_yaw, self.spec.period, self.spec.free)

    def start_attempt(self) -> None:
        super().start_attempt()
        self.held_yaw: float | None = None

    def phases(self) -> list[Phase]:
        def approach() -> Goal:
            target = np.array([*self.object_pos()[:2], max(APPROACH_Z, self.eef_pos[2])])
            return Goal(target, self.grasp_yaw(), GRIPPER_OPEN, tol=0.02, yaw_tol=0.1)

        return [Phase("approach", approach), *super().phases()]


SCENE_EXPERTS: dict[str, type[ScriptedExpert]] = {"cubes": CubeLiftExpert, "nuts": NutExpert, "bins": BinExpert}


def make_scene_expert(scene: str, goal: str, seed: int | None = None, noise: float = 0.05) -> ScriptedExpert:
    """The scripted expert for `goal` in `scene`; call `.reset(env)` then `.act(obs)` (or `expert(obs)`)."""
    get_goal(scene, goal)
    return SCENE_EXPERTS[scene](goal, seed=seed, noise=noise)

