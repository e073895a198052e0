"""The Gradio Space: type an instruction, pick a task and a start, watch the policy dream (and act for real).

    python space_app/app.py [--world-model DIR_OR_REPO_ID] [--policy DIR_OR_REPO_ID] [--dataset DIR] [--port 7860]

Models are local `save_pretrained` folders or Hub repo ids (resolved in the local HF cache, e.g. after
`vla-export`); defaults come from the env vars VLA_WORLD_MODEL / VLA_POLICY / VLA_DATASET, else the
outputs of `vla-pipeline` (runs/pipeline). A dream is one closed-loop rollout of the policy inside the
world model (evaluation's `DreamEnv` + `rollout`); with robosuite installed and a simulator-seed start,
the same start is also played in robosuite and both are shown side by side; with robosuite and an OpenGL backend
(MUJOCO_GL=egl or osmesa) the dream is also drawn in MuJoCo as a video (evaluation/dream_video.py), beside the real
roll-out's video for simulator-seed starts, with at most VIDEO_MAX_FRAMES frames (a longer episode is filmed every
k-th step).

Every request is bounded and checked before any work, whatever a raw HTTP client sends: the instruction has at most
512 characters (it is drawn into the figure title, shortened there), numbers must be finite whole numbers in range,
and each request's figures are drawn in a temporary folder that is gone when the answer leaves. The answer's video
must outlive the request until gradio has copied it into its cache: only the latest answer's video is kept, in one
folder (`dreaming-vla-space-videos-*` in TMPDIR) removed when the Space exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python space_app/app.py` (how Spaces run it): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.errors import UserError  # noqa: E402
from common.policies import ChunkPolicy  # noqa: E402
from common.saved_models import load_model  # noqa: E402
from data_prep.tasks import get_task, task_names  # noqa: E402
from evaluation.envs import DreamEnv, RobosuiteEnv, Start, VideoSpec  # noqa: E402
from evaluation.metrics import EEF_POS, OBJECT_POS  # noqa: E402
from evaluation.plan import dataset_starts, real_initial_states  # noqa: E402
from evaluation.plots import plot_dream_vs_real, plot_trajectories_3d  # noqa: E402
from evaluation.records import EpisodeRecord  # noqa: E402
from evaluation.rollout import rollout  # noqa: E402
from model_kinds import get_kind  # noqa: E402
from pipeline import PipelinePaths  # noqa: E402

HELD_OUT, SEED = "held-out episode", "simulator seed"
DEFAULT_HORIZON = 200
MAX_INSTRUCTION = 512  # characters: a 1 MB one took 155 s and 532 MB, drawn into the figure title
TITLE_INSTRUCTION = 60  # characters of the instruction shown in a figure title
MAX_SEED = 2**31 - 1  # numpy seeds robosuite's resets
GRADIO_CACHE = (3600, 3600)  # gradio's copies of the answers' figures: every hour, those older than an hour go
HAS_ROBOSUITE = importlib.util.find_spec("robosuite") is not None
VIDEO_MAX_FRAMES = 100  # per video: ~0.15 s each to render on a CPU (Mesa), so a request's videos stay under a minute
VIDEO_SIZE = 256  # px per view: the dream alone is 256 wide, dream | real 512


def default_model(kind: str) -> str:
    """The pipeline's trained model folder when it exists, else its exported repo id (local HF cache)."""
    paths = PipelinePaths()
    best = paths.best(kind)
    return str(best) if (best / "config.json").is_file() else paths.repo_id(get_kind(kind).repo_name)


@dataclass(frozen=True)
class SpaceConfig:
    world_model: str = field(default_factory=lambda: os.environ.get("VLA_WORLD_MODEL") or default_model("world"))
    policy: str = field(default_factory=lambda: os.environ.get("VLA_POLICY") or default_model("policy"))
    dataset: str | None = field(default_factory=lambda: os.environ.get("VLA_DATASET") or str(PipelinePaths().dataset))
    device: str = "cpu"


@dataclass
class Outcome:
    """What one request shows: figures (images, their files already gone) and a markdown verdict."""

    trajectory: Any
    uncertainty: Any
    verdict: str
    comparison: Any = None
    video: bytes | None = None  # MP4: the dream drawn in MuJoCo (| the real roll-out), see VIDEO_MAX_FRAMES
    video_name: str = ""


@dataclass(frozen=True)
class Request:
    """One checked request: what `DreamSession.run` plays."""

    instruction: str
    task: str
    start_kind: str
    number: int
    horizon: int
    with_real: bool


def whole_number(value: Any, name: str, low: int, high: int) -> int:
    """A finite whole number in [low, high] from a raw request value (JSON allows NaN, Infinity, strings, lists)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number, got {str(value)[:40]!r}")
    if not low <= number <= high:
        raise UserError(f"{name} must be in [{low}, {high}], got {int(number)}")
    return int(number)


def check_request(instruction: Any, task: Any, start_kind: Any, number: Any, horizon: Any, with_real: Any) -> Request:
    """The raw values of a request (UI or HTTP), checked before any work: one readable error for anything else."""
    if not isinstance(task, str) or task not in task_names():
        raise UserError(f"task must be one of {sorted(task_names())}, got {str(task)[:40]!r}")
    if start_kind not in (HELD_OUT, SEED):
        raise UserError(f"initial state must be {HELD_OUT!r} or {SEED!r}, got {str(start_kind)[:40]!r}")
    if instruction is not None and not isinstance(instruction, str):
        raise UserError(f"instruction must be text, got {type(instruction).__name__}")
    if instruction is not None and len(instruction) > MAX_INSTRUCTION:
        raise UserError(f"instruction has {len(instruction)} characters; at most {MAX_INSTRUCTION}")
    if not isinstance(with_real, bool):
        raise UserError(f"the robosuite checkbox must be true or false, got {str(with_real)[:40]!r}")
    return Request(
        instruction=(instruction or "").strip() or get_task(task).instruction,
        task=task,
        start_kind=start_kind,
        number=whole_number(number, "the episode index / seed", 0, MAX_SEED),
        horizon=whole_number(horizon, "max steps", 1, get_task(task).horizon),
        with_real=with_real,
    )


def shortened(text: str, length: int = TITLE_INSTRUCTION) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."


def read_image(path: Path | None) -> Any:
    """The figure as an in-memory image, so that its file can go with the request's temporary folder."""
    from PIL import Image

    if path is None:
        return None
    with Image.open(path) as image:
        image.load()
        return image.copy()


class DreamSession:
    """The loaded models (once per process) and the rollouts a request asks for."""

    def __init__(self, config: SpaceConfig):
        self.config = config
        self._lock = threading.Lock()  # one rollout at a time: the models are shared and the CPU is small
        self._models: dict[str, Any] = {}

    def tasks(self) -> list[str]:
        """The registered tasks both models were trained on (a multi-object scene appears once its models know it;
        a model given by repo id, whose config is not read here, counts as knowing every task)."""
        known = task_names()
        for source in (self.config.world_model, self.config.policy):
            config = Path(source) / "config.json"
            if config.is_file():
                trained = json.loads(config.read_text()).get("tasks") or known
                known = [task for task in known if task in trained]
        return known

    def model(self, kind: str) -> Any:
        if kind not in self._models:
            source = self.config.world_model if kind == "world" else self.config.policy
            flag = "--world-model" if kind == "world" else "--policy"
            self._models[kind] = load_model(Path(source) if Path(source).is_dir() else source, flag, self.config.device)
        return self._models[kind]

    def start(self, task: str, start_kind: str, number: int) -> Start:
        if number < 0:
            raise UserError(f"the episode index / seed must be >= 0, got {number}")
        if start_kind == HELD_OUT:
            dataset = self.config.dataset
            if not dataset or not Path(dataset).is_dir():
                raise UserError(f"held-out starts need the dataset folder (VLA_DATASET / --dataset); {dataset!r} not found")
            starts = dataset_starts(Path(dataset), task, number + 1)
            if number >= len(starts):
                raise UserError(f"task {task!r} has {len(starts)} held-out episodes; pick an index below {len(starts)}")
            return starts[number]
        if not HAS_ROBOSUITE:
            raise UserError("simulator-seed starts need robosuite; install it or pick a held-out episode")
        return real_initial_states(task, [Start(seed=number)], workers=1)[0]

    def play(self, task: str, instruction: str, start: Start, horizon: int, real: bool,
             video: VideoSpec | None = None) -> tuple[EpisodeRecord, EpisodeRecord | None]:
        """The dream, and its real twin when `real` (filmed into `video` when given)."""
        policy = ChunkPolicy(self.model("policy"), "policy")
        dream = rollout(DreamEnv(self.model("world"), task), policy, [start], [instruction], horizon, progress=False)[0]
        if not real:
            return dream, None
        with RobosuiteEnv(task, workers=1, video=video) as env:
            twin = rollout(env, ChunkPolicy(self.model("policy"), "policy"), [Start(seed=start.seed)], [instruction],
                           horizon, progress=False)[0]
            env.finish()
        return dream, twin

    def run(self, request: Request) -> Outcome:
        if request.task not in self.tasks():
            raise UserError(f"task {request.task!r}: the models were trained on {self.tasks()}")
        real = request.with_real and HAS_ROBOSUITE and request.start_kind == SEED
        title = f"dream: {shortened(request.instruction)!r} ({request.task}, {request.start_kind} {request.number})"
        every = math.ceil((request.horizon + 1) / VIDEO_MAX_FRAMES)
        with tempfile.TemporaryDirectory(prefix="vla-space-") as tmp:
            folder = Path(tmp)
            with self._lock:
                start = self.start(request.task, request.start_kind, request.number)
                video = VideoSpec(folder / "videos", 1, "real", size=VIDEO_SIZE, every=every)
                dream, twin = self.play(request.task, request.instruction, start, request.horizon, real, video)
                notes, films = film_dream(dream, twin, folder / "videos", every)
            trajectory = plot_trajectories_3d([dream], folder / "dream_trajectory.png", title)
            uncertainty = plot_uncertainty(dream, folder / "dream_uncertainty.png")
            comparison = plot_dream_vs_real(dream, twin, folder / "dream_vs_real.png") if twin is not None else None
            film = films[0].paths[-1] if films else None  # dream | real where both were filmed, else the dream
            return Outcome(read_image(trajectory), read_image(uncertainty),
                           "\n\n".join([verdict(dream, twin, request.horizon), *notes]), read_image(comparison),
                           film.read_bytes() if film else None, film.name if film else "")


def film_dream(dream: EpisodeRecord, twin: EpisodeRecord | None, folder: Path, every: int) -> tuple[list[str], list[Any]]:
    """The dream drawn in MuJoCo (beside the twin's video when filmed): notes for the verdict, and the videos."""
    if not HAS_ROBOSUITE:
        return [], []
    from evaluation.dream_video import write_dream_videos

    notes, films = write_dream_videos([dream], folder, 1, "real" if twin is not None else None,
                                      [twin] if twin is not None else [], size=VIDEO_SIZE, every=every)
    return [f"*{note}*" for note in notes], films


class VideoShelf:
    """Where an answer's video waits for gradio to copy it: the latest one only, in a folder gone at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.folder: Path | None = None

    def put(self, data: bytes | None, name: str) -> str | None:
        with self._lock:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="dreaming-vla-space-videos-"))
                weakref.finalize(self, shutil.rmtree, self.folder, True)
            for old in self.folder.iterdir():  # the previous answer's, long copied by gradio
                old.unlink(missing_ok=True)
            if data is None:
                return None
            path = self.folder / name
            path.write_bytes(data)
            return str(path)


def plot_uncertainty(record: EpisodeRecord, path: Path) -> Path:
    """Per-step ensemble spread of the dream: how much the world model's members disagree about each step."""
    std = record.std if record.std is not None else np.zeros_like(record.states)
    steps = np.arange(len(std))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for part, label in ((EEF_POS, "end effector"), (OBJECT_POS, "object")):
        ax.plot(steps, np.linalg.norm(std[:, part], axis=-1) * 100, label=f"{label} position")
    if record.success_step is not None:
        ax.axvline(record.success_step, color="tab:green", ls="--", label=f"success predicted (step {record.success_step})")
    ax.set_xlabel("dream step")
    ax.set_ylabel("ensemble std (cm)")
    ax.set_title("World-model uncertainty along the dream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(record: EpisodeRecord, where: str, horizon: int) -> str:
    if record.error is not None:
        return f"**{where}:** stopped by an error: {record.error}"
    if record.success:
        return f"**{where}:** success at step {record.success_step} of {horizon}"
    return f"**{where}:** no success in {record.length} steps"


def verdict(dream: EpisodeRecord, real: EpisodeRecord | None, horizon: int) -> str:
    mean_p = dream.episode_return / max(dream.length, 1)
    lines = [describe(dream, "Dream (predicted)", horizon),
             f"mean predicted p(success) per step: {mean_p:.3f}; instruction: {dream.instruction!r}"]
    if real is not None:
        lines.append(describe(real, "Real robosuite (same start)", horizon))
    elif not HAS_ROBOSUITE:
        lines.append("robosuite is not installed here: dream only.")
    else:
        lines.append("No real rollout: pick a simulator-seed start (and tick robosuite) to play the same start for real.")
    return "\n\n".join(lines)


def build_app(session: DreamSession) -> Any:
    import gradio as gr

    shelf = VideoShelf()

    def on_run(instruction: Any, task: Any, start_kind: Any, number: Any, horizon: Any, with_real: Any):
        try:  # raw values (preprocess=False below): gradio's own parsing answered NaN with {"error": null}
            outcome = session.run(check_request(instruction, task, start_kind, number, horizon, with_real))
        except UserError as err:
            raise gr.Error(str(err)) from None
        comparison = gr.Image(value=outcome.comparison, visible=outcome.comparison is not None)
        film = shelf.put(outcome.video, outcome.video_name)
        return outcome.trajectory, outcome.uncertainty, outcome.verdict, comparison, gr.Video(value=film, visible=film is not None)

    with gr.Blocks(title="Dreaming VLA", delete_cache=GRADIO_CACHE) as app:
        gr.Markdown(
            "# Dreaming VLA\nType an instruction in your own words, pick a task and a start, and the policy plays it "
            "inside the learned world model (a *dream*)" + (", and in robosuite for a simulator-seed start." if HAS_ROBOSUITE else ".")
            + f"\n\nworld model: `{session.config.world_model}` · policy: `{session.config.policy}`"
        )
        with gr.Row():
            with gr.Column(scale=1):
                instruction = gr.Textbox(label="instruction", value=get_task("lift").instruction, max_length=MAX_INSTRUCTION)
                task = gr.Dropdown(session.tasks(), value="lift", label="task (a scene's goals: cubes_red, ...)")
                start_kind = gr.Radio([HELD_OUT, SEED], value=HELD_OUT, label="initial state")
                number = gr.Number(value=0, precision=0, label="held-out episode index / simulator seed")
                horizon = gr.Slider(1, max(get_task(t).horizon for t in task_names()), value=DEFAULT_HORIZON, step=1, label="max steps")
                with_real = gr.Checkbox(value=HAS_ROBOSUITE, interactive=HAS_ROBOSUITE,
                                        label="also run in robosuite (simulator-seed starts)")
                run = gr.Button("Dream", variant="primary")
            with gr.Column(scale=2):
                verdict_box = gr.Markdown(label="predicted outcome")
                trajectory = gr.Image(label="dream: 3-D trajectory", type="filepath", format="png")
                uncertainty = gr.Image(label="dream: per-step uncertainty", type="filepath", format="png")
        comparison = gr.Image(label="dream vs real (same start)", type="filepath", format="png", visible=False)
        video = gr.Video(label="the dream drawn in MuJoCo (left) | the real roll-out (right, simulator-seed starts)",
                         visible=False, autoplay=True, loop=True)
        task.change(lambda t: get_task(t).instruction, task, instruction)
        run.click(on_run, [instruction, task, start_kind, number, horizon, with_real],
                  [trajectory, uncertainty, verdict_box, comparison, video], api_name="dream", preprocess=False)
    return app


def build_parser() -> argparse.ArgumentParser:
    defaults = SpaceConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-model", default=defaults.world_model, help="folder or hub repo id (env VLA_WORLD_MODEL)")
    parser.add_argument("--policy", default=defaults.policy, help="folder or hub repo id (env VLA_POLICY)")
    parser.add_argument("--dataset", default=defaults.dataset, help="vla-preprocess folder for held-out starts (env VLA_DATASET)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    session = DreamSession(SpaceConfig(args.world_model, args.policy, args.dataset))
    try:  # load now: a wrong path should fail at start-up with one line, not on the first click
        session.model("world"), session.model("policy")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    build_app(session).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
