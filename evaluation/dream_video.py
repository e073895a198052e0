"""Watch a dream: the dreamed states drawn in MuJoCo, beside the real roll-out's video, with the ensemble's spread.

    messages = write_dream_videos(dreams, videos_folder, episodes=2, real_prefix="policy")

Each dreamed state is posed kinematically in a robosuite env of its task (`data_prep.sim.make_env`, reset with the
episode's seed, so the scene is the real start's): every object body to its dreamed position and rot6 orientation
(its free joint's qpos), the arm by inverse kinematics to the dreamed end-effector pose (`evaluation.arm_ik`, each
frame warm-started from the previous one), the fingers to the dreamed gripper_qpos. Nothing is simulated: set qpos,
`mj_forward`, render. Where IK misses (> 1 cm or > 10 degrees), the arm shows its closest pose and a magenta marker
(a sphere at the dreamed end-effector position, a bar along the dreamed gripper axis; visual only, added to the
rendered scene, not to the model) shows where the dream put the gripper.

Files, per filmed dream (the first `episodes` of each task):

    dream_<task>_seed<seed>.mp4          the dream, with the uncertainty strip under it
    side_by_side_<task>_seed<seed>.mp4   dream | real (the real roll-out's video from the same start), strip under both

The strip plots the dreamed state's ensemble std summed over the pose dims (end effector and objects, positions in
m and rot6 entries) and the success head's probability over the steps, with a cursor at the frame's step, red ticks
where IK missed, and the dream's and the real episode's success steps. Several world models: `_<label>` is added.

A process that has rendered with EGL cannot fork simulator workers that render in turn (they hang in their first GL
call), so `vla-rollout` films its dreams with `film_apart`: in a fresh spawned process, after its real roll-outs.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.scenes import GOAL_TASKS, get_scene
from data_prep.tasks import STATE_SLICES, get_task, rot6_to_matrix, slot_offset
from evaluation.arm_ik import ArmIK, IKResult
from evaluation.records import EpisodeRecord
from evaluation.video import RenderingUnavailable, attach_offscreen_context, open_writer, shown_steps, video_path

MARKER_RGBA = np.array([1.0, 0.0, 1.0, 0.8], np.float32)  # magenta: no object or robot part of the scenes has it
MARKER_LABEL = (200, 0, 200)
MARKER_RADIUS = 0.02  # m
MARKER_BAR = 0.1  # m along the gripper axis, from the dreamed eef position back towards the hand
STRIP_HEIGHT = 96  # px
EEF_BLOCKS = ("eef pos", "eef rot")


@dataclass(frozen=True)
class ObjectSlot:
    """One object of the state: the robosuite object (root body `<name>_main`) and where its pose is in the state."""

    name: str
    pos: slice
    rot: slice


def object_slots(task: str) -> tuple[ObjectSlot, ...]:
    """The objects a task's state holds, in slot order: a scene's objects, or a one-object task's robosuite object
    named by its first observation key (`cube_pos`)."""
    names = (get_scene(GOAL_TASKS[task][0]).objects if task in GOAL_TASKS
             else (get_task(task).object_keys[0].removesuffix("_pos"),))
    return tuple(ObjectSlot(name, slice(slot_offset(i), slot_offset(i) + 3), slice(slot_offset(i) + 3, slot_offset(i) + 9))
                 for i, name in enumerate(names))


def pose_slices(task: str) -> tuple[slice, ...]:
    """Every pose in the state: the end effector's, then each object's position and rot6."""
    return tuple(STATE_SLICES[name] for name in EEF_BLOCKS) + tuple(
        part for slot in object_slots(task) for part in (slot.pos, slot.rot))


def pose_std(std: np.ndarray, task: str) -> np.ndarray:
    """[T, 83] ensemble std -> [T]: summed over the pose dims (the strip's curve)."""
    return sum(np.asarray(std)[:, part].sum(axis=1) for part in pose_slices(task))


@dataclass
class Frame:
    """One posed state: the joint positions to draw and how IK did."""

    qpos: np.ndarray
    ik: IKResult
    eef_pos: np.ndarray  # the dreamed end-effector pose (where the marker goes when IK missed)
    eef_rot: np.ndarray


class DreamScene:
    """A robosuite env of `task` that draws states (see the module docstring). `pose` needs no OpenGL."""

    def __init__(self, task: str, seed: int, camera: str = "agentview", size: int = 256):
        import mujoco

        from data_prep.sim import make_env

        self.mujoco, self.task, self.camera, self.size = mujoco, task, camera, size
        self.sim = make_env(task, seed)
        self.sim.reset(seed)  # the real start's scene and arm: the first IK starts from the real joints
        env = self.sim.env
        self.model, self.data = env.sim.model._model, env.sim.data._data
        self.ik = ArmIK(env)
        robot = env.robots[0]
        self.gripper = np.asarray(robot._ref_gripper_joint_pos_indexes[robot.arms[0]])
        self.gripper_range = self.model.jnt_range[[self.model.jnt_qposadr.tolist().index(i) for i in self.gripper]].T
        self.objects = [(slot, self._free_joint(slot.name)) for slot in object_slots(task)]
        self._context: Any = None

    def _free_joint(self, name: str) -> int:
        """qpos address of the free joint that carries the object's root body."""
        body = self.model.body(f"{name}_main").id
        joint = self.model.body_jntadr[body]
        if self.model.body_jntnum[body] != 1 or self.model.jnt_type[joint] != self.mujoco.mjtJoint.mjJNT_FREE:
            raise ValueError(f"{self.task}: body {name}_main does not move on a free joint of its own")
        return int(self.model.jnt_qposadr[joint])

    def pose(self, state: np.ndarray) -> Frame:
        """Put the objects, the fingers and (by IK from the current arm) the arm where `state` has them."""
        state = np.asarray(state, dtype=np.float64)
        qpos = self.data.qpos
        for slot, address in self.objects:
            quat = np.zeros(4)
            self.mujoco.mju_mat2Quat(quat, rot6_to_matrix(state[slot.rot]).reshape(-1))
            qpos[address : address + 7] = np.concatenate([state[slot.pos], quat])  # w x y z
        qpos[self.gripper] = np.clip(state[STATE_SLICES["gripper"]], *self.gripper_range)
        eef_pos, eef_rot = state[STATE_SLICES["eef pos"]], rot6_to_matrix(state[STATE_SLICES["eef rot"]])
        ik = self.ik.solve(eef_pos, eef_rot)
        self.mujoco.mj_forward(self.model, self.data)
        return Frame(qpos.copy(), ik, eef_pos, eef_rot)

    def render(self, frame: Frame) -> np.ndarray:
        """The frame from the scene's camera (HxWx3 uint8), with the marker where IK missed."""
        mj = self.mujoco
        context = self._gl()
        self.data.qpos[:] = frame.qpos
        mj.mj_forward(self.model, self.data)
        context.gl_ctx.make_current()  # another env in this process (the real roll-out's) may have rendered last
        mj.mjv_updateScene(self.model, self.data, context.vopt, context.pert, context.cam, mj.mjtCatBit.mjCAT_ALL,
                           context.scn)
        if not frame.ik.ok:
            self._add_marker(context.scn, frame)
        mj.mjr_render(mj.MjrRect(0, 0, self.size, self.size), context.scn, context.con)
        return np.ascontiguousarray(context.read_pixels(self.size, self.size)[::-1])  # the GL buffer is bottom-up

    def _gl(self) -> Any:
        """robosuite's offscreen context on this env (as the real videos), its camera fixed to ours."""
        if self._context is None:
            env = self.sim.env
            try:
                attach_offscreen_context(env)
                context = env.sim._render_context_offscreen
                if self.size > min(context.con.offWidth, context.con.offHeight):
                    context.update_offscreen_size(max(self.size, context.con.offWidth), max(self.size, context.con.offHeight))
            except Exception as err:  # noqa: BLE001 - any GL failure means: no video
                raise RenderingUnavailable(RenderingUnavailable.explain(err)) from None
            context.cam.type = self.mujoco.mjtCamera.mjCAMERA_FIXED
            context.cam.fixedcamid = env.sim.model.camera_name2id(self.camera)
            self._context = context
        return self._context

    def _add_marker(self, scene: Any, frame: Frame) -> None:
        mj = self.mujoco
        if scene.ngeom + 2 > scene.maxgeom:
            return
        sphere, bar = scene.geoms[scene.ngeom], scene.geoms[scene.ngeom + 1]
        mj.mjv_initGeom(sphere, mj.mjtGeom.mjGEOM_SPHERE, np.full(3, MARKER_RADIUS), frame.eef_pos, np.eye(3).reshape(-1),
                        MARKER_RGBA)
        mj.mjv_initGeom(bar, mj.mjtGeom.mjGEOM_CAPSULE, np.zeros(3), np.zeros(3), np.eye(3).reshape(-1), MARKER_RGBA)
        # The hand's z axis points from the hand to the fingertips: the bar runs back up towards the hand.
        mj.mjv_connector(bar, mj.mjtGeom.mjGEOM_CAPSULE, MARKER_RADIUS / 3, frame.eef_pos,
                         frame.eef_pos - MARKER_BAR * frame.eef_rot[:, 2])
        scene.ngeom += 2

    def close(self) -> None:
        """Free the GL context now (left to interpreter exit, its destructor can print an EGLError)."""
        context, self._context = self._context, None
        if context is not None:
            context.con.free()
            context.gl_ctx.free()
            self.sim.env.sim._render_context_offscreen = None
        self.sim.env.close()


# ----------------------------------------------------------------------------------------------------------------
# The strip and the composed frames
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Strip:
    """The uncertainty strip drawn once; `at(step)` adds the cursor."""

    image: np.ndarray  # [STRIP_HEIGHT, width, 3] uint8
    x0: float  # pixel column of step 0
    x1: float  # pixel column of the last step
    steps: int
    rows: slice  # the plot area's rows

    def at(self, step: int) -> np.ndarray:
        image = self.image.copy()
        x = int(round(self.x0 + (self.x1 - self.x0) * min(step, self.steps) / max(self.steps, 1)))
        image[self.rows, max(x - 1, 0) : x + 1] = (0, 0, 0)
        return image


def draw_strip(dream: EpisodeRecord, steps: int, width: int, misses: Sequence[int],
               real: EpisodeRecord | None = None) -> Strip:
    """Pose std and p(success) of `dream` over `steps` steps, `width` px wide (matplotlib, rendered once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi, STRIP_HEIGHT / dpi), dpi=dpi)
    fig.subplots_adjust(left=min(34 / width, 0.2), right=max(1 - 30 / width, 0.8), bottom=0.22, top=0.97)  # tick labels
    t = np.arange(len(dream.states))
    std = pose_std(dream.std, dream.task) if dream.std is not None else np.zeros(len(t))
    ax.plot(t, std, color="tab:blue", lw=1.2, label="pose std (Σ)")
    ax.set_xlim(0, max(steps, 1))
    ax.set_ylim(0, max(float(std.max()) * 1.15, 1e-3))
    ax.tick_params(labelsize=6, pad=1, length=2)
    ax.vlines(misses, 0, 0.12, transform=ax.get_xaxis_transform(), color="red", lw=1, label="IK miss")
    p_axis = ax.twinx()
    if dream.p_success is not None:
        p_axis.plot(t, dream.p_success, color="tab:green", lw=1.0, ls="--", label="p(success)")
    p_axis.set_ylim(0, 1.05)
    p_axis.tick_params(labelsize=6, pad=1, length=2)
    for record, color, name in ((dream, "tab:green", "dream"), (real, "k", "real")):
        if record is not None and record.success_step is not None:
            ax.axvline(record.success_step, color=color, lw=0.8, ls=":", label=f"{name} success")
    lines = ax.get_legend_handles_labels()[0] + p_axis.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=5, loc="upper left", ncol=3, frameon=False,
              borderaxespad=0.1)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    box = ax.get_window_extent()
    plt.close(fig)
    height = image.shape[0]
    return Strip(image, box.x0, box.x1, max(steps, 1), slice(int(height - box.y1), int(height - box.y0)))


def label(frame: np.ndarray, text: str, color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """`text` in the frame's top-left corner on a white box."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((3, 2), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(255, 255, 255))
    draw.text((3, 2), text, fill=color)
    return np.asarray(image)


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video file (the real roll-out's MP4, or its GIF without ffmpeg)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(path)
    try:
        return [np.asarray(frame)[..., :3] for frame in reader]
    finally:
        reader.close()


def find_video(path: Path) -> Path | None:
    """`path`, or the GIF `open_writer` writes instead where ffmpeg is missing."""
    return next((p for p in (path, path.with_suffix(".gif")) if p.is_file()), None)


# ----------------------------------------------------------------------------------------------------------------
# Writing the videos
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DreamVideo:
    """What one dream's videos hold."""

    paths: list[Path]
    ik: list[IKResult]  # one per posed dreamed state
    stopped: int | None = None  # the step of the first non-finite dreamed state (the video ends before it)


def finite_states(dream: EpisodeRecord) -> np.ndarray:
    """The dream's states up to its first non-finite one (a diverged dream ends there, as its roll-out did)."""
    finite = np.isfinite(dream.states).all(axis=1)
    return dream.states[: len(finite) if finite.all() else int(np.argmin(finite))]


def write_dream_video(dream: EpisodeRecord, folder: Path, real_video: Path | None = None,
                      real: EpisodeRecord | None = None, camera: str = "agentview", size: int = 256, fps: int = 20,
                      suffix: str = "", every: int = 1) -> DreamVideo:
    """dream_<task>_seed<seed><suffix>.mp4, and side_by_side_... when the real roll-out's video is given.

    `every`: render every k-th step and the last (`evaluation.video.shown_steps`), the stride the real video was
    filmed at; IK runs on every state all the same (each warm-starts the next). Raises RenderingUnavailable
    (and writes nothing) where OpenGL cannot render, ValueError when the dream has no finite state.
    """
    states = finite_states(dream)
    if len(states) == 0:
        raise ValueError(f"dream {dream.task} seed {dream.seed}: its first state is not finite")
    scene = DreamScene(dream.task, dream.seed, camera, size)
    try:
        frames = [scene.pose(state) for state in states]  # in order: each IK warm-starts from the previous solution
        images = {0: scene.render(frames[0])}  # fails before any file exists where there is no GL
        real_frames = [fit(frame, size) for frame in read_frames(real_video)] if real_video is not None else []
        real_steps = shown_steps(real.length, every) if real is not None else list(range(len(real_frames)))
        dream_steps = shown_steps(len(frames) - 1, every)
        steps = max(len(frames) - 1, real_steps[-1] if real_frames else 0)
        misses = [t for t, frame in enumerate(frames) if not frame.ik.ok]
        folder.mkdir(parents=True, exist_ok=True)
        names = ["dream", *(["side_by_side"] if real_frames else [])]
        strips = [draw_strip(dream, steps, size * (1 + (name != "dream")), misses, real) for name in names]
        writers = [open_writer(folder / f"{name}_{dream.task}_seed{dream.seed}{suffix}.mp4", fps) for name in names]
        try:
            for i in range(max(len(dream_steps), len(real_frames))):
                step = dream_steps[min(i, len(dream_steps) - 1)]
                if step not in images:
                    images = {step: scene.render(frames[step])}
                miss = not frames[step].ik.ok
                shown = label(images[step], f"dream  step {step}" + ("  IK miss" if miss else ""),
                              MARKER_LABEL if miss else (0, 0, 0))
                cursor = min(i * every, steps)
                if i < len(dream_steps):
                    writers[0][0].append_data(np.vstack([shown, strips[0].at(cursor)]))
                if real_frames:
                    j = min(i, len(real_frames) - 1)
                    other = label(real_frames[j], f"real  step {real_steps[min(j, len(real_steps) - 1)]}")
                    writers[1][0].append_data(np.vstack([np.hstack([shown, other]), strips[1].at(cursor)]))
        finally:
            for writer, _ in writers:
                writer.close()
        stopped = len(states) if len(states) < len(dream.states) else None
        return DreamVideo([path for _, path in writers], [frame.ik for frame in frames], stopped)
    finally:
        scene.close()


def fit(frame: np.ndarray, size: int) -> np.ndarray:
    """A size x size RGB frame (the real video's frames are that size already unless filmed at another)."""
    if frame.shape[:2] == (size, size):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size)))


def write_dream_videos(dreams: Sequence[EpisodeRecord], folder: Path, episodes: int, real_prefix: str | None = None,
                       reals: Sequence[EpisodeRecord] = (), camera: str = "agentview", size: int = 256,
                       suffix: str = "", every: int = 1) -> tuple[list[str], list[DreamVideo]]:
    """Videos of the first `episodes` dreams (side by side with `<real_prefix>_<task>_seed<seed>.mp4` where filmed).

    Returns one note per video (or one 'skipped' note where rendering is unavailable), for `vla-rollout`'s messages,
    and the videos written.
    """
    notes, videos = [], []
    real_by_seed = {r.seed: r for r in reals}
    for dream in list(dreams)[:episodes]:
        real_video = find_video(video_path(folder, real_prefix, dream.task, dream.seed)) if real_prefix else None
        try:
            video = write_dream_video(dream, folder, real_video, real_by_seed.get(dream.seed), camera, size,
                                      suffix=suffix, every=every)
        except RenderingUnavailable as err:
            return [*notes, f"dream video skipped: {err}"], videos
        except ValueError as err:
            notes.append(f"dream video skipped: {err}")
            continue
        videos.append(video)
        ok = sum(r.ok for r in video.ik)
        stopped = f"; ends at step {video.stopped - 1}, the dream's next state is not finite" if video.stopped else ""
        notes.append(f"dream video written: {', '.join(p.name for p in video.paths)} "
                     f"(IK reached {ok}/{len(video.ik)} frames{stopped})")
    return notes, videos


@dataclass
class FilmJob:
    """One `write_dream_videos` call: the dreams of one task (and world model), their real twins, the settings."""

    dreams: list[EpisodeRecord]
    folder: Path
    episodes: int
    real_prefix: str | None = None
    reals: list[EpisodeRecord] = field(default_factory=list)
    camera: str = "agentview"
    size: int = 256
    suffix: str = ""


def film(jobs: Sequence[FilmJob]) -> list[list[str]]:
    """Every job's videos, in this process; its notes, per job."""
    return [write_dream_videos(job.dreams, job.folder, job.episodes, job.real_prefix, job.reals, job.camera, job.size,
                               job.suffix)[0] for job in jobs]


def film_apart(jobs: Sequence[FilmJob]) -> list[list[str]]:
    """`film` in a fresh spawned process, which leaves this process's GL untouched (see the module docstring)."""
    jobs = [only_filmed(job) for job in jobs]
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(film, jobs).result()
    except Exception as err:  # noqa: BLE001 - the videos are an extra: a failure costs them, not the results
        return [[f"dream video skipped: {type(err).__name__}: {err}".replace("\n", " ")] for _ in jobs]


def only_filmed(job: FilmJob) -> FilmJob:
    """The job with only the dreams it films and their twins (less to send to the other process)."""
    dreams = job.dreams[: max(job.episodes, 0)]
    seeds = {dream.seed for dream in dreams}
    return FilmJob(dreams, job.folder, job.episodes, job.real_prefix, [r for r in job.reals if r.seed in seeds],
                   job.camera, job.size, job.suffix)
