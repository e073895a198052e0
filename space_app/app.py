"""The Gradio Space: type an instruction, pick a task and a start, watch the policy dream (and act for real).

    python space_app/app.py [--world-model DIR_OR_REPO_ID] [--policy DIR_OR_REPO_ID] [--dataset DIR] [--port 7860]

Models are local `save_pretrained` folders or Hub repo ids (resolved in the local HF cache, e.g. after
`vla-export`); defaults come from the env vars VLA_WORLD_MODEL / VLA_POLICY / VLA_DATASET, else the
outputs of `vla-pipeline` (runs/pipeline). A dream is one closed-loop rollout of the policy inside the
world model (evaluation's `DreamEnv` + `rollout`); with robosuite installed and a simulator-seed start,
the same start is also played in robosuite and both are shown side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python space_app/app.py` (how Spaces run it): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.errors import UserError  # noqa: E402
from data_prep.tasks import TASKS, get_task  # noqa: E402
from evaluation.cli import dataset_starts, load_model, real_initial_states  # noqa: E402
from evaluation.envs import DreamEnv, RobosuiteEnv, Start  # noqa: E402
from evaluation.metrics import EEF_POS, OBJECT_POS  # noqa: E402
from evaluation.plots import plot_dream_vs_real, plot_trajectories_3d  # noqa: E402
from evaluation.policies import ChunkPolicy  # noqa: E402
from evaluation.records import EpisodeRecord  # noqa: E402
from evaluation.rollout import rollout  # noqa: E402
from pipeline import EXPORT_NAMES, PipelinePaths  # noqa: E402

HELD_OUT, SEED = "held-out episode", "simulator seed"
DEFAULT_HORIZON = 200
HAS_ROBOSUITE = importlib.util.find_spec("robosuite") is not None


def default_model(kind: str) -> str:
    """The pipeline's trained model folder when it exists, else its exported repo id (local HF cache)."""
    paths = PipelinePaths()
    best = paths.best(kind)
    return str(best) if (best / "config.json").is_file() else paths.repo_id(EXPORT_NAMES[kind])


@dataclass(frozen=True)
class SpaceConfig:
    world_model: str = field(default_factory=lambda: os.environ.get("VLA_WORLD_MODEL") or default_model("world"))
    policy: str = field(default_factory=lambda: os.environ.get("VLA_POLICY") or default_model("policy"))
    dataset: str | None = field(default_factory=lambda: os.environ.get("VLA_DATASET") or str(PipelinePaths().dataset))
    device: str = "cpu"


@dataclass
class Outcome:
    """What one request shows: figure paths and a markdown verdict."""

    trajectory_png: str
    uncertainty_png: str
    verdict: str
    comparison_png: str | None = None


class DreamSession:
    """The loaded models (once per process) and the rollouts a request asks for."""

    def __init__(self, config: SpaceConfig):
        self.config = config
        self._lock = threading.Lock()  # one rollout at a time: the models are shared and the CPU is small
        self._models: dict[str, Any] = {}
        self.figures = Path(tempfile.mkdtemp(prefix="vla-space-"))

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

    def play(self, task: str, instruction: str, start: Start, horizon: int, real: bool) -> tuple[EpisodeRecord, EpisodeRecord | None]:
        policy = ChunkPolicy(self.model("policy"), "policy")
        dream = rollout(DreamEnv(self.model("world"), task), policy, [start], [instruction], horizon, progress=False)[0]
        if not real:
            return dream, None
        with RobosuiteEnv(task, workers=1) as env:
            twin = rollout(env, ChunkPolicy(self.model("policy"), "policy"), [Start(seed=start.seed)], [instruction],
                           horizon, progress=False)[0]
        return dream, twin

    def run(self, instruction: str, task: str, start_kind: str, number: int, horizon: int, with_real: bool) -> Outcome:
        instruction = (instruction or "").strip() or get_task(task).instruction
        horizon = int(horizon)
        if not 1 <= horizon <= get_task(task).horizon:
            raise UserError(f"horizon must be in [1, {get_task(task).horizon}], got {horizon}")
        real = bool(with_real) and HAS_ROBOSUITE and start_kind == SEED
        with self._lock:
            start = self.start(task, start_kind, int(number))
            dream, twin = self.play(task, instruction, start, horizon, real)
        folder = Path(tempfile.mkdtemp(dir=self.figures))
        title = f"dream: {instruction!r} ({task}, {start_kind} {int(number)})"
        trajectory = plot_trajectories_3d([dream], folder / "dream_trajectory.png", title)
        uncertainty = plot_uncertainty(dream, folder / "dream_uncertainty.png")
        comparison = plot_dream_vs_real(dream, twin, folder / "dream_vs_real.png") if twin is not None else None
        return Outcome(str(trajectory), str(uncertainty), verdict(dream, twin, horizon), str(comparison) if comparison else None)


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

    def on_run(instruction: str, task: str, start_kind: str, number: float, horizon: float, with_real: bool):
        try:
            outcome = session.run(instruction, task, start_kind, int(number), int(horizon), with_real)
        except UserError as err:
            raise gr.Error(str(err)) from None
        comparison = gr.Image(value=outcome.comparison_png, visible=outcome.comparison_png is not None)
        return outcome.trajectory_png, outcome.uncertainty_png, outcome.verdict, comparison

    with gr.Blocks(title="Dreaming VLA") as app:
        gr.Markdown(
            "# Dreaming VLA\nType an instruction in your own words, pick a task and a start, and the policy plays it "
            "inside the learned world model (a *dream*)" + (", and in robosuite for a simulator-seed start." if HAS_ROBOSUITE else ".")
            + f"\n\nworld model: `{session.config.world_model}` · policy: `{session.config.policy}`"
        )
        with gr.Row():
            with gr.Column(scale=1):
                instruction = gr.Textbox(label="instruction", value=get_task("lift").instruction)
                task = gr.Dropdown(list(TASKS), value="lift", label="task")
                start_kind = gr.Radio([HELD_OUT, SEED], value=HELD_OUT, label="initial state")
                number = gr.Number(value=0, precision=0, label="held-out episode index / simulator seed")
                horizon = gr.Slider(1, max(t.horizon for t in TASKS.values()), value=DEFAULT_HORIZON, step=1, label="max steps")
                with_real = gr.Checkbox(value=HAS_ROBOSUITE, interactive=HAS_ROBOSUITE,
                                        label="also run in robosuite (simulator-seed starts)")
                run = gr.Button("Dream", variant="primary")
            with gr.Column(scale=2):
                verdict_box = gr.Markdown(label="predicted outcome")
                trajectory = gr.Image(label="dream: 3-D trajectory", type="filepath")
                uncertainty = gr.Image(label="dream: per-step uncertainty", type="filepath")
        comparison = gr.Image(label="dream vs real (same start)", type="filepath", visible=False)
        task.change(lambda t: get_task(t).instruction, task, instruction)
        run.click(on_run, [instruction, task, start_kind, number, horizon, with_real],
                  [trajectory, uncertainty, verdict_box, comparison], api_name="dream")
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
