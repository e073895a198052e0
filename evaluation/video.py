"""Videos of real rollouts from a MuJoCo offscreen camera.

Rendering needs an OpenGL backend, chosen when robosuite is imported: `MUJOCO_GL=egl` (robosuite's
default on Linux; works with Mesa's software EGL too) or `MUJOCO_GL=osmesa` (apt `libosmesa6`).
We attach robosuite's own offscreen context to the env's simulator, so the env itself can keep
`has_offscreen_renderer=False` (the standard settings of `data_prep.sim.make_env`). If no backend
works, `RenderingUnavailable` says why and the caller skips only the video.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


class RenderingUnavailable(RuntimeError):
    """Offscreen rendering cannot be set up on this machine."""

    @staticmethod
    def explain(err: BaseException) -> str:
        return (f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')} "
                f"({type(err).__name__}: {err}); try MUJOCO_GL=egl or MUJOCO_GL=osmesa (apt-get install libosmesa6)")


def video_path(out_dir: Path, prefix: str, task: str, seed: int) -> Path:
    """Where a real roll-out's video goes: <out_dir>/<prefix>_<task>_seed<seed>.mp4 (the dream videos pair by it)."""
    return Path(out_dir) / f"{prefix}_{task}_seed{seed}.mp4"


class VideoRecorder:
    """Streams frames of one episode into an MP4 (GIF if no ffmpeg) as they are captured."""

    def __init__(self, env: Any, path: Path, camera: str = "agentview", size: int = 256, fps: int = 20, every: int = 1):
        self.env, self.camera, self.size = env, camera, size
        self.every, self.steps, self.pending = every, 0, False  # film every `every`-th step, and the last
        try:
            attach_offscreen_context(env)
            first = self.render()
        except Exception as err:  # noqa: BLE001 - any GL failure means: no video, keep evaluating
            raise RenderingUnavailable(RenderingUnavailable.explain(err)) from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.writer, self.path = open_writer(Path(path), fps)
        self.writer.append_data(first)

    def render(self) -> np.ndarray:
        # MuJoCo's offscreen buffer is bottom-up.
        frame = self.env.sim.render(width=self.size, height=self.size, camera_name=self.camera)
        return np.ascontiguousarray(frame[::-1])

    def capture(self) -> None:
        """After a step: its frame, if the step is one the stride films."""
        self.steps += 1
        self.pending = self.steps % self.every != 0
        if not self.pending:
            self.writer.append_data(self.render())

    def close(self) -> Path:
        try:
            if self.pending:  # the episode's last state is always filmed, whatever the stride
                self.writer.append_data(self.render())
        except Exception:  # noqa: BLE001 - a simulator that just failed may not render; keep the frames so far
            pass
        self.writer.close()
        return self.path


def shown_steps(length: int, every: int) -> list[int]:
    """The steps a video of a `length`-step episode films at stride `every`: 0, every, 2 every, ..., and the last."""
    steps = list(range(0, length + 1, every))
    return steps if steps[-1] == length else [*steps, length]


def attach_offscreen_context(env: Any) -> None:
    """Give an env made with has_offscreen_renderer=False robosuite's offscreen GL context (egl/osmesa)."""
    if env.sim._render_context_offscreen is None:
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        MjRenderContextOffscreen(env.sim, device_id=-1)  # registers itself with env.sim


def open_writer(path: Path, fps: int) -> tuple[Any, Path]:
    """An imageio writer for MP4 via imageio-ffmpeg, or an animated GIF next to it without ffmpeg."""
    import imageio.v2 as imageio

    try:
        return imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1), path
    except Exception:  # noqa: BLE001 - no ffmpeg: a GIF is still a video
        gif = path.with_suffix(".gif")
        return imageio.get_writer(gif, duration=1000 / fps, loop=0), gif


def write_video(frames: list[np.ndarray], path: Path, fps: int = 20) -> Path:
    """Write a list of HxWx3 uint8 frames to `path` (MP4, or GIF when ffmpeg is missing)."""
    writer, path = open_writer(Path(path), fps)
    for frame in frames:
        writer.append_data(np.ascontiguousarray(frame))
    writer.close()
    return path
