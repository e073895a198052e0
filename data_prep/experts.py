"""Scripted experts: waypoint state machines that read the simulator's ground-truth poses.

Each expert walks through named phases (approach above, descend, grasp, lift, transport,
place/insert, release, retreat). A phase's goal (gripper position, yaw, open/closed) is
recomputed every step from live object poses, and a proportional servo turns it into a
7-D OSC_POSE delta action in [-1, 1] (xyz, axis-angle rotation, gripper -1 open / +1 closed).
If the object slips out of the hand, or a phase stalls, the expert starts over from the
first phase, which makes the scripts robust without hand-tuned recovery paths.

Usage (also as a policy in evaluation; each task's entry in `data_prep.tasks` names its expert):

    expert = data_prep.tasks.make_expert("lift", seed=0)
    expert.reset(env)
    action = expert.act(obs)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
# OSC_POSE delta scaling in robosuite's BASIC controller: action 1 = 5 cm / 0.5 rad goal offset.
# The arm covers ~25% of the commanded offset per 20 Hz step, so these gains saturate the
# action beyond ~5 cm / ~0.3 rad of error and converge in a few steps near the goal.
POS_GAIN = 20.0
ROT_GAIN = 3.0
# Gripper pointing straight down with its x axis along world x; its fingers close along world y.
GRIPPER_DOWN = np.diag([1.0, -1.0, -1.0])
# Gripper yaws the Panda wrist reaches comfortably (joint 7 starts at 0.785 rad of its +-2.9 rad range).
WRIST_YAW_RANGE = (-1.6, 2.4)
FINGER_STILL_SPEED = 0.01  # m/s, rate of change of the finger gap
SETTLE_MIN_STEPS = 4  # steps the fingers get to start moving
SETTLE_TIMEOUT = 15  # steps; fingers count as settled after this long anyway
MAX_YAW_STEP = 0.8  # rad
PHASE_TIMEOUT = 80  # steps; a phase that takes longer restarts the script


@dataclass(frozen=True)
class Goal:
    """Where one phase wants the gripper."""

    pos: np.ndarray  # gripper site position, world frame
    yaw: float  # gripper yaw about world z (rad), gripper kept pointing down
    gripper: float  # GRIPPER_OPEN or GRIPPER_CLOSED
    tol: float = 0.01  # position error (m) that counts as reached
    yaw_tol: float = 0.08  # yaw error (rad) that counts as reached
    wait: int = 0  # extra steps to stay once reached (lets the fingers close/open)
    carrying: bool = False  # the object must stay in the hand during this phase
    speed: float = 1.0  # cap on the translation action (slower lifts keep a light grasp)
    settle: bool = False  # also wait until the fingers stop moving (closed on the object / fully open)


@dataclass(frozen=True)
class Phase:
    name: str
    goal: Callable[[], Goal]


def wrap_angle(angle: float, period: float = 2 * np.pi) -> float:
    """Map an angle to [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


def yaw_of(rotation: np.ndarray) -> float:
    """Heading of a frame's x axis in the world xy-plane."""
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def nearest_symmetric_yaw(current: float, target: float, period: float) -> float:
    """The yaw equivalent to `target` under a `period` symmetry that is closest to `current`."""
    return current + wrap_angle(target - current, period)


class ScriptedExpert:
    """Base class: phase bookkeeping and the servo; subclasses define `phases()` and `object_pos()`."""

    task: str = ""
    hold_radius = 0.04  # object grasp point farther than this from the gripper means it was dropped

    def __init__(self, seed: int | None = None, noise: float = 0.05):
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.env = None
        self.clean_action = np.zeros(7)  # the last act()'s action before noise: the label a policy should learn

    # ----- public API -------------------------------------------------------------------------
    def reset(self, env, seed: int | None = None) -> None:
        """Start a new episode in `env` (already reset). `seed` re-seeds the action noise."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.env = env
        self.phase_list = self.phases()
        self.restarts = 0
        self._enter(0)

    def __call__(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.act(obs)

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The next action, with the expert's exploration noise; `clean_action` is the same without it."""
        if self.env is None:
            raise RuntimeError("call reset(env) before act(obs)")
        self._read_robot(obs)
        goal = self._advance()
        self.clean_action = self._servo(goal)
        self.steps_in_phase += 1
        action = self.clean_action.copy()
        action[:6] += self.noise * self.rng.standard_normal(6)
        return np.clip(action, -1.0, 1.0)

    def resume(self, obs: Mapping[str, np.ndarray]) -> None:
        """Re-plan from the current state, after something else drove (DAgger's roll-out from a learner's state).

        An object already grasped (both fingers in contact, robosuite's `_check_grasp`) is kept: the script goes
        on from "lift"; otherwise it starts over from its first phase, as after a drop.
        """
        if self.env is None:
            raise RuntimeError("call reset(env) before resume(obs)")
        self._read_robot(obs)
        self._enter(0)
        names = [phase.name for phase in self.phase_list]
        if self.grasped() and "lift" in names:
            self._enter(names.index("lift"))

    def grasped(self) -> bool:
        """Both finger pads touch the task object (ground truth from the simulator's contacts)."""
        robot = self.env.robots[0]
        return bool(self.env._check_grasp(gripper=robot.gripper[robot.arms[0]], object_geoms=self.grasp_object()))

    @property
    def phase(self) -> str:
        return self.phase_list[self.phase_index].name

    # ----- to be defined by each task -----------------------------------------------------------
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def object_pos(self) -> np.ndarray:
        """Ground-truth position of the point the gripper grasps."""
        raise NotImplementedError

    def grasp_object(self):
        """The robosuite object model the task grasps (for contact checks)."""
        raise NotImplementedError

    # ----- ground truth helpers -----------------------------------------------------------------
    def body_pos(self, body_id: int) -> np.ndarray:
        return np.array(self.env.sim.data.body_xpos[body_id])

    def body_yaw(self, body_id: int) -> float:
        return yaw_of(np.array(self.env.sim.data.body_xmat[body_id]).reshape(3, 3))

    def anchored(self) -> np.ndarray:
        """The gripper position when the current phase began (for goals relative to it)."""
        if self.anchor is None:
            self.anchor = self.eef_pos.copy()
        return self.anchor

    def holding(self) -> bool:
        closed_on_nothing = self.finger_gap < 0.005
        return bool(np.linalg.norm(self.object_pos() - self.eef_pos) < self.hold_radius and not closed_on_nothing)

    # ----- internals ----------------------------------------------------------------------------
    def _read_robot(self, obs: Mapping[str, np.ndarray]) -> None:
        self.eef_pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.eef_rot = Rotation.from_quat(obs["robot0_eef_quat"]).as_matrix()  # robosuite quats are xyzw, as scipy
        self.eef_yaw = yaw_of(self.eef_rot)
        self.finger_gap = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])
        # The gap's rate of change (not each finger's speed, which also jitters as the hand moves).
        gap_speed = abs(float(obs["robot0_gripper_qvel"][0] - obs["robot0_gripper_qvel"][1]))
        self.fingers_still = gap_speed < FINGER_STILL_SPEED

    def _enter(self, index: int) -> None:
        self.phase_index = index
        self.steps_in_phase = 0
        self.reached_steps = 0
        self.anchor = None  # phase-local memory (e.g. where the grasp happened)
        if index == 0:
            self.start_attempt()

    def _restart(self) -> None:
        self.restarts += 1
        self._enter(0)

    def start_attempt(self) -> None:
        """Hook: forget per-attempt plans when the script (re)starts from its first phase."""

    def _advance(self) -> Goal:
        """Move through finished phases and return the current goal."""
        goal = self.phase_list[self.phase_index].goal()
        if goal.carrying and not self.holding():
            self._restart()
            return self.phase_list[0].goal()
        reached = (
            np.linalg.norm(goal.pos - self.eef_pos) < goal.tol
            and abs(wrap_angle(goal.yaw - self.eef_yaw)) < goal.yaw_tol
            and (not goal.settle or self._fingers_settled())
        )
        self.reached_steps = self.reached_steps + 1 if reached else 0
        last = self.phase_index == len(self.phase_list) - 1
        if self.reached_steps > goal.wait and not last:
            self._enter(self.phase_index + 1)
            return self.phase_list[self.phase_index].goal()
        if self.steps_in_phase > PHASE_TIMEOUT and not last:
            self._restart()
            return self.phase_list[0].goal()
        return goal

    def _fingers_settled(self) -> bool:
        # The fingers are still for a moment after the command changes, before they start moving.
        if self.steps_in_phase < SETTLE_MIN_STEPS:
            return False
        return self.fingers_still or self.steps_in_phase >= SETTLE_TIMEOUT

    def _servo(self, goal: Goal) -> np.ndarray:
        pos = np.clip(POS_GAIN * (goal.pos - self.eef_pos), -goal.speed, goal.speed)
        # Turn at most MAX_YAW_STEP toward the goal yaw so that large turns go the intended way round.
        yaw = self.eef_yaw + np.clip(goal.yaw - self.eef_yaw, -MAX_YAW_STEP, MAX_YAW_STEP)
        desired = Rotation.from_euler("z", yaw).as_matrix() @ GRIPPER_DOWN
        rot_error = Rotation.from_matrix(desired @ self.eef_rot.T).as_rotvec()  # world-frame axis-angle
        rot = np.clip(ROT_GAIN * rot_error, -1.0, 1.0)
        return np.clip(np.concatenate([pos, rot, [goal.gripper]]), -1.0, 1.0)


class LiftExpert(ScriptedExpert):
    """Lift: grasp the cube from above (yaw aligned to a cube face) and raise it."""

    task = "lift"

    def object_pos(self) -> np.ndarray:
        return self.body_pos(self.env.cube_body_id)

    def grasp_object(self):
        return self.env.cube

    def cube_yaw(self) -> float:
        # A cube looks the same every 90 degrees: pick the face closest to the current yaw.
        return nearest_symmetric_yaw(self.eef_yaw, self.body_yaw(self.env.cube_body_id), np.pi / 2)

    def phases(self) -> list[Phase]:
        def above() -> Goal:
            return Goal(self.object_pos() + [0, 0, 0.05], self.cube_yaw(), GRIPPER_OPEN, tol=0.02, yaw_tol=0.1)

        def descend() -> Goal:
            return Goal(self.object_pos() + [0, 0, -0.005], self.cube_yaw(), GRIPPER_OPEN, tol=0.008)

        def grasp() -> Goal:
            return Goal(self.object_pos() + [0, 0, -0.005], self.cube_yaw(), GRIPPER_CLOSED, tol=0.02, wait=2, settle=True)

        def lift() -> Goal:
            target = np.array([*self.eef_pos[:2], self.env.model.mujoco_arena.table_offset[2] + 0.15])
            return Goal(target, self.eef_yaw, GRIPPER_CLOSED, tol=0.02, carrying=True)

        return [Phase("above", above), Phase("descend", descend), Phase("grasp", grasp), Phase("lift", lift)]


class CanExpert(ScriptedExpert):
    """PickPlaceCan: grasp the can from above, carry it over the wall, drop it into its bin quadrant."""

    task = "can"
    carry_z = 0.99  # gripper height while carrying: the can's bottom clears the 0.9 m bin walls
    # The target quadrant's centre is beyond the arm's reach at carrying height: aim for its
    # corner nearest the robot, still ~2 cm inside the walls for the 3.3 cm-radius can.
    place_offset = np.array([-0.035, -0.055, 0.0])
    above_height = 0.06  # gripper above the object's grasp point before coming down
    grasp_height = 0.005  # gripper relative to the grasp point when the fingers close
    release_height = 0.13  # gripper above the bin floor when it lets go

    def can_id(self) -> int:
        return self.env.obj_body_id["Can"]

    def object_pos(self) -> np.ndarray:
        return self.body_pos(self.can_id())

    def grasp_object(self):
        return self.env.objects[self.env.object_id]

    def target(self) -> np.ndarray:
        """Bin-floor point under the gripper's drop position."""
        return np.array(self.env.target_bin_placements[self.env.object_to_id["can"]]) + self.place_offset

    def grasp_yaw(self) -> float:
        """Gripper yaw for the grasp, kept while carrying (the can is round: the default heading)."""
        return 0.0

    def phases(self) -> list[Phase]:
        yaw = self.grasp_yaw

        def above() -> Goal:
            return Goal(self.object_pos() + [0, 0, self.above_height], yaw(), GRIPPER_OPEN, tol=0.02, yaw_tol=0.15)

        def descend() -> Goal:
            return Goal(self.object_pos() + [0, 0, self.grasp_height], yaw(), GRIPPER_OPEN, tol=0.01, yaw_tol=0.15)

        def grasp() -> Goal:
            return Goal(self.object_pos() + [0, 0, self.grasp_height], yaw(), GRIPPER_CLOSED, tol=0.02, yaw_tol=0.3,
                        wait=2, settle=True)

        def lift() -> Goal:
            target = np.array([*self.eef_pos[:2], self.carry_z])
            return Goal(target, yaw(), GRIPPER_CLOSED, tol=0.03, yaw_tol=0.3, carrying=True)

        def transport() -> Goal:
            target = np.array([*self.target()[:2], self.carry_z])
            return Goal(target, yaw(), GRIPPER_CLOSED, tol=0.02, yaw_tol=0.3, carrying=True)

        def lower() -> Goal:
            # Release once the can is below the wall tops; it drops the last few centimetres.
            target = np.array([*self.target()[:2], self.target()[2] + self.release_height])
            return Goal(target, yaw(), GRIPPER_CLOSED, tol=0.015, yaw_tol=0.3, carrying=True)

        def release() -> Goal:
            return Goal(self.anchored(), yaw(), GRIPPER_OPEN, tol=1.0, yaw_tol=np.pi, wait=3)

        def retreat() -> Goal:
            return Goal(np.array([*self.target()[:2], self.carry_z]), yaw(), GRIPPER_OPEN, tol=0.02, yaw_tol=np.pi)

        return [
            Phase("above", above),
            Phase("descend", descend),
            Phase("grasp", grasp),
            Phase("lift", lift),
            Phase("transport", transport),
            Phase("lower", lower),
            Phase("release", release),
            Phase("retreat", retreat),
        ]


class SquareExpert(ScriptedExpert):
    """NutAssemblySquare: grasp the nut's handle, align the nut with the square peg, slide it down."""

    task = "square"
    carry_nut_z = 0.975  # nut centre height while carrying: its underside clears the 0.95 m peg top
    hold_radius = 0.05
    # Grasp height relative to the handle's centre (1 cm above the table). At -5 mm the fingertips, which reach 9 mm
    # below the eef site, press on the table: a learned policy that comes down 1-2 cm beside the handle is then held
    # there by friction (benchmarks/diagnostics/stalls.py). +3 mm, clear of the table, did not help (docs/experiments/022), so the
    # demos keep -5 mm.
    grasp_height = -0.005

    def nut_id(self) -> int:
        return self.env.obj_body_id["SquareNut"]

    def object_pos(self) -> np.ndarray:
        # The handle site (0.054 m along the nut's x axis) is where the fingers close.
        return np.array(self.env.sim.data.site_xpos[self.env.object_site_ids[0]])

    def grasp_object(self):
        return self.env.nuts[self.env.nut_id]

    def nut_pos(self) -> np.ndarray:
        return self.body_pos(self.nut_id())

    def peg_pos(self) -> np.ndarray:
        return self.body_pos(self.env.peg1_body_id)

    def handle_yaw(self) -> float:
        # Fingers close along the handle's short side (nut y axis): gripper yaw = nut yaw, mod 180.
        return nearest_symmetric_yaw(self.eef_yaw, self.body_yaw(self.nut_id()), np.pi)

    def start_attempt(self) -> None:
        self.turn_yaw: float | None = None

    def turn_target(self) -> float:
        """Gripper yaw, chosen once per grasp, that squares the nut to the peg.

        The nut fits the peg every 90 degrees; among those turns the wrist can make, prefer the one
        that points the handle back toward the robot, so the gripper stays well inside its reach
        when the nut's centre is over the peg (the peg sits near the arm's reach limit).
        """
        if self.turn_yaw is None:
            nut_yaw = self.body_yaw(self.nut_id())
            square = wrap_angle(-nut_yaw, np.pi / 2)
            turns = [square + k * np.pi / 2 for k in range(-4, 5)]
            feasible = [d for d in turns if WRIST_YAW_RANGE[0] <= self.eef_yaw + d <= WRIST_YAW_RANGE[1]]
            turn = min(feasible, key=lambda d: np.cos(nut_yaw + d) + 0.1 * abs(d))
            self.turn_yaw = self.eef_yaw + turn
        return self.turn_yaw

    def aligned_yaw(self) -> float:
        """Small corrections that keep the held nut square to the peg once it has been turned."""
        return self.eef_yaw + wrap_angle(-self.body_yaw(self.nut_id()), np.pi / 2)

    def nut_goal(self, nut_target: np.ndarray) -> np.ndarray:
        """Gripper position that puts the held nut's centre at `nut_target`."""
        return self.eef_pos + (nut_target - self.nut_pos())

    def raised(self) -> np.ndarray:
        """Gripper position above where this phase began that holds the nut at carrying height."""
        return np.array([*self.anchored()[:2], self.nut_goal(np.full(3, self.carry_nut_z))[2]])

    def phases(self) -> list[Phase]:
        def above() -> Goal:
            return Goal(self.object_pos() + [0, 0, 0.05], self.handle_yaw(), GRIPPER_OPEN, tol=0.02, yaw_tol=0.1)

        def descend() -> Goal:
            return Goal(self.object_pos() + [0, 0, self.grasp_height], self.handle_yaw(), GRIPPER_OPEN, tol=0.008)

        def grasp() -> Goal:
            return Goal(self.object_pos() + [0, 0, self.grasp_height], self.handle_yaw(), GRIPPER_CLOSED, tol=0.02, wait=2, settle=True)

        def lift() -> Goal:
            # Lift straight up before turning: twisting the nut while it drags on the table loosens the grasp.
            return Goal(self.raised(), self.eef_yaw, GRIPPER_CLOSED, tol=0.02, carrying=True, speed=0.6)

        def align() -> Goal:
            return Goal(self.raised(), self.turn_target(), GRIPPER_CLOSED, tol=0.03, yaw_tol=0.05, carrying=True)

        def transport() -> Goal:
            target = np.array([*self.peg_pos()[:2], self.carry_nut_z])
            return Goal(self.nut_goal(target), self.aligned_yaw(), GRIPPER_CLOSED, tol=0.004, yaw_tol=0.05, carrying=True)

        def insert() -> Goal:
            target = np.array([*self.peg_pos()[:2], self.env.table_offset[2] + 0.02])
            return Goal(self.nut_goal(target), self.aligned_yaw(), GRIPPER_CLOSED, tol=0.01, yaw_tol=0.1, carrying=True)

        def release() -> Goal:
            return Goal(self.anchored(), self.eef_yaw, GRIPPER_OPEN, tol=1.0, yaw_tol=np.pi, wait=3)

        def retreat() -> Goal:
            return Goal(self.anchored() + [0, 0, 0.08], self.eef_yaw, GRIPPER_OPEN, tol=0.02)

        return [
            Phase("above", above),
            Phase("descend", descend),
            Phase("grasp", grasp),
            Phase("lift", lift),
            Phase("align", align),
            Phase("transport", transport),
            Phase("insert", insert),
            Phase("release", release),
            Phase("retreat", retreat),
        ]

