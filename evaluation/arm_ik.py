"""Inverse kinematics for a robosuite arm: place the end effector at a pose read off a (dreamed) state.

    ik = ArmIK(env)                         # env: a robosuite env (its first robot, first arm)
    result = ik.solve(position, rotation)   # arm joints of env.sim now hold the solution; result.ok

MuJoCo's Jacobians with damped least squares on the arm's joints (no physics, no QP solver): each iteration runs
`mj_kinematics`, takes the error of the end-effector site's position and of the hand body's orientation (the frames
robosuite's `robot0_eef_pos` and `robot0_eef_quat` observe) and moves the joints by J^T (J J^T + d^2 I)^-1 e, with
a null-space pull towards the arm's rest posture (a 7-joint arm has one spare degree of freedom that would drift)
and the joints clipped to their ranges. The solve starts from the joints the simulator holds, so calling it frame
after frame warm-starts each frame from the previous solution (with restarts where that misses, see `solve`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

# A frame counts as reached within 1 cm and 10 degrees: at the videos' 256 px agentview a centimetre is about two
# pixels, and 10 degrees is less than the Panda's fingers visibly turn; a dream further off is drawn as a marker.
POSITION_TOLERANCE = 0.01  # m
ORIENTATION_TOLERANCE = 10.0  # degrees
CONVERGED_POSITION = 1e-4  # m: the iteration stops this close (far inside the tolerances above)
CONVERGED_ORIENTATION = 1e-3  # rad
MAX_ITERATIONS = 150
DAMPING = 0.05  # d of the damped least squares: steady near singular poses, still exact away from them
MAX_JOINT_STEP = 0.2  # rad per iteration: large errors are approached in steps, not one linearised jump
NULL_SPACE_GAIN = 0.1  # pull of the spare degree of freedom towards the rest posture, per iteration
RANDOM_RESTARTS = 8  # random joint configurations tried when the warm starts miss (fixed seed: the same video twice)


@dataclass(frozen=True)
class IKResult:
    """How close the arm came to the target pose."""

    position_error: float  # m, end-effector site to the target position
    orientation_error: float  # degrees, hand body to the target orientation
    iterations: int
    random_start: bool = False  # the joints came from a random restart (the warm starts all missed)

    @property
    def ok(self) -> bool:
        return self.position_error < POSITION_TOLERANCE and self.orientation_error < ORIENTATION_TOLERANCE

    @property
    def score(self) -> float:
        """Distance to the target in tolerances (< 1 in both terms when ok); the lower the closer."""
        return self.position_error / POSITION_TOLERANCE + self.orientation_error / ORIENTATION_TOLERANCE


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame rotation vector (axis * angle, rad) that turns `current` into `target` (3x3 matrices)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(target @ current.T).as_rotvec()


class ArmIK:
    """Damped-least-squares IK on the arm joints of a robosuite env's first robot (see the module docstring)."""

    def __init__(self, env: Any, random_restarts: int = RANDOM_RESTARTS):
        import mujoco

        self.mujoco = mujoco
        self.model, self.data = env.sim.model._model, env.sim.data._data
        robot = env.robots[0]
        arm = robot.arms[0]
        joints = list(robot._ref_joint_indexes)
        self.qpos = np.asarray(robot._ref_joint_pos_indexes)
        self.dofs = np.asarray(self.model.jnt_dofadr[joints])
        self.low, self.high = self.model.jnt_range[joints].T
        self.site = int(robot.eef_site_id[arm])
        self.body = int(self.model.body(robot.robot_model.eef_name[arm]).id)
        self.rest = np.clip(np.asarray(robot.init_qpos, dtype=np.float64), self.low, self.high)
        self.last_reached: np.ndarray | None = None  # the joints of the last solve that reached its target
        self.random_restarts = random_restarts
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The end-effector site's position and the hand body's rotation matrix (after `mj_kinematics`)."""
        return self.data.site_xpos[self.site].copy(), self.data.xmat[self.body].reshape(3, 3).copy()

    def solve(self, position: np.ndarray, rotation: np.ndarray, max_iterations: int = MAX_ITERATIONS) -> IKResult:
        """Move the arm joints (in the simulator's qpos) to the target; the other joints are left as they are.

        Starts from the joints the simulator holds; if that misses, from the last pose that reached its target, then
        from the rest posture (a miss can leave the arm stretched against its joint limits, a dead end for the frames
        after it), then from `random_restarts` random joint configurations (a target none of them reaches is most
        likely out of the arm's reach, not a local minimum). The arm is left at the best of these tries
        (`IKResult.random_start`: it came from a random restart).
        """
        position = np.asarray(position, dtype=np.float64)
        rotation = np.asarray(rotation, dtype=np.float64)
        rng = np.random.default_rng(0)
        warm = [(self.data.qpos[self.qpos].astype(np.float64), False), (self.last_reached, False), (self.rest, False)]
        randoms = [(rng.uniform(self.low, self.high), True) for _ in range(self.random_restarts)]
        best_q, best = None, None
        for start, random_start in warm + randoms:
            if start is None:
                continue
            q, result = self._descend(np.clip(start, self.low, self.high), position, rotation, max_iterations)
            if best is None or result.score < best.score:
                best_q, best = q, dataclasses.replace(result, random_start=random_start)
            if result.ok:
                break
        if best.ok:
            self.last_reached = best_q
        self.data.qpos[self.qpos] = best_q
        self.mujoco.mj_kinematics(self.model, self.data)
        return best

    def _descend(self, q: np.ndarray, position: np.ndarray, rotation: np.ndarray,
                 max_iterations: int) -> tuple[np.ndarray, IKResult]:
        """Damped least squares from joints `q`: the joints reached and how close they came."""
        mj, model, data = self.mujoco, self.model, self.data
        iterations = 0
        while True:
            data.qpos[self.qpos] = q
            mj.mj_kinematics(model, data)
            current_position, current_rotation = self.pose()
            error = np.concatenate([position - current_position, rotation_error(rotation, current_rotation)])
            done = np.linalg.norm(error[:3]) < CONVERGED_POSITION and np.linalg.norm(error[3:]) < CONVERGED_ORIENTATION
            if done or iterations >= max_iterations:
                break
            mj.mj_comPos(model, data)  # the Jacobian needs the bodies' centres of mass as well
            mj.mj_jacSite(model, data, self._jacp, self._jacr, self.site)  # the hand is rigid with the site: same jacr
            jac = np.vstack([self._jacp[:, self.dofs], self._jacr[:, self.dofs]])
            inverse = jac.T @ np.linalg.inv(jac @ jac.T + DAMPING**2 * np.eye(6))
            step = inverse @ error
            null_space = np.eye(len(q)) - np.linalg.pinv(jac) @ jac  # exact projector: the pull never moves the hand
            step += null_space @ (NULL_SPACE_GAIN * (self.rest - q))
            largest = np.abs(step).max()
            if largest > MAX_JOINT_STEP:
                step *= MAX_JOINT_STEP / largest
            q = np.clip(q + step, self.low, self.high)
            iterations += 1
        return q, IKResult(float(np.linalg.norm(error[:3])), float(np.degrees(np.linalg.norm(error[3:]))), iterations)
