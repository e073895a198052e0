"""`vla-pipeline`: generate → preprocess → DAgger → train (world, VLA, MLP) → dream + real evaluation → cards/export.

The dream model is a pool of world models trained with different seeds (`PipelineSize.world_seeds`,
`vla-pool-world-models`): one run's dreamed success can be tens of points off where another's is exact.

The policies learn from expert demos (`<workdir>/dataset`) plus DAgger data: per task, an MLP-BC trained on
that task's demos alone drives the first steps of new attempts and the expert finishes each from wherever it left
the robot (`vla-generate dagger`), so the final policies also learn to recover from a learner's mistakes
(`<workdir>/dataset_dagger<r>` = demos + rounds 1..r; each round's drivers learned from the rounds before).
The VLA trained on that data (`train_policy_base`) then drives a DAgger round of its own (`raw_dagger_vla`) and is
fine-tuned on everything (`dataset_dagger_vla`, `vla-train --set init_from=...`) into `train_policy`.
That is the full size; the default (`--standard`) runs one round for all tasks driven by the three-task MLP-BC on the
demos (`PipelineSize.dagger_driver="shared"`) and no VLA round, to fit 30 minutes on 2 CPU cores.
The world model also learns from "play" data (`vla-generate play`:
expert runs with random wrong moves, failures kept) and from the whole episodes of a three-task MLP-BC trained on
the demos (`vla-generate rollouts`: a policy's states, grasps and failures), merged with the demos into
`<workdir>/hf_dataset_world`: trained on successes alone it would dream that every action sequence succeeds,
and without a policy's own roll-outs it dreams a policy's grasps badly (docs/experiments/004, 012).

Each stage is one command line run in its own process (the console scripts via `python -m`-style
invocation of this interpreter), so a crash in one stage cannot leave state behind in another and
every stage can also be run by hand. A stage is *done* when its marker file
`<workdir>/.stages/<name>.json` exists; the marker is written atomically only after the command
exited 0 and its declared outputs exist, so re-running the pipeline skips finished stages, re-runs
failed ones, and restarts a half-finished training stage with `--resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.errors import UserError, run_cli
from model_kinds import get_kind, kinds

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("runs/pipeline")
DEFAULT_ORG = "local"  # hub namespace of the exported repos: local/dreaming-vla-world-model, ...
DAGGER_ROUNDS = 1  # of the full pipeline: a second round did not help (docs/experiments/008)
# Play seeds start here (+ --seed): never the expert demos' (seed, seed + 1, ...) nor evaluation's (100000+).
PLAY_SEED_OFFSET = 50_000
# DAgger round r's seeds start at DAGGER_SEED_OFFSET + DAGGER_ROUND_SEEDS * (r - 1) + seed.
DAGGER_SEED_OFFSET, DAGGER_ROUND_SEEDS = 60_000, 1_000
# The driving policy plays a uniform 0..N steps before the expert takes over: N covers the whole of a policy's
# typical Can / Square episode (~110 / ~200 steps); on Lift (~40 steps) most longer roll-ins end in a success and
# are skipped, which costs little.
DAGGER_HANDOVER_STEPS = 150
ONPOLICY_SEED_OFFSET = 70_000  # the world model's policy roll-outs: seeds 70000 + seed ..
VLA_DAGGER_SEED_OFFSET = 90_000  # the VLA's own DAgger round: seeds 90000 + seed ..
# The evaluation starts, the same for every training seed (paired): never a seed any data stage uses.
EVAL_SEED = 100_000
VIDEO_POLICY = "policy"  # the kind whose evaluation is filmed (PipelineSize.video_episodes): the VLA


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]
    outputs: tuple[Path, ...]  # must all exist after a successful run; shown in the final summary
    resume_dir: Path | None = None  # a training output dir: present but unfinished → rerun with --resume
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for the command
    needs: tuple[str, ...] | None = None  # the stages whose outputs it reads; None: every stage before it
    cores: int | None = None  # None: the whole machine; n: n cores (n threads), beside other stages that fit

    def marker(self, workdir: Path, state: str = "done") -> Path:
        return workdir / ".stages" / f"{self.name}.{state}.json"


@dataclass
class StageReport:
    name: str
    status: str  # "done" (ran now), "skipped" (done before), "failed"
    seconds: float
    outputs: tuple[Path, ...]


Runner = Callable[[Sequence[str], Mapping[str, str], Path | None], int]


def run_subprocess(command: Sequence[str], env: Mapping[str, str], log: Path | None = None) -> int:
    """Run one stage, its output streamed to ours or, for a stage beside others, to `log`; returns the exit status."""
    if log is None:
        return subprocess.run(list(command), cwd=REPO_ROOT, env={**os.environ, **env}, check=False).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.run(list(command), cwd=REPO_ROOT, env={**os.environ, **env}, stdout=out,
                              stderr=subprocess.STDOUT, check=False).returncode


def recorded_command(stage: Stage, workdir: Path, state: str) -> list[str] | None:
    marker = stage.marker(workdir, state)
    return json.loads(marker.read_text())["command"] if marker.is_file() else None


def check_same_settings(stage: Stage, workdir: Path) -> None:
    """Refuse to mix runs: a workdir started with other settings (e.g. --quick, now --full) is not resumed."""
    for state in ("done", "started"):
        before = recorded_command(stage, workdir, state)
        if before is not None and [arg for arg in before if arg != "--resume"] != list(stage.command):
            raise UserError(
                f"{workdir}: stage {stage.name!r} was run with other settings ({stage.marker(workdir, state)} has "
                f"{' '.join(before)}); use another --workdir or delete this one"
            )


def stage_is_done(stage: Stage, workdir: Path) -> bool:
    return stage.marker(workdir).is_file() and all(path.exists() for path in stage.outputs)


def stage_command(stage: Stage) -> list[str]:
    """The command to run now: with --resume when a training stage was interrupted after it started."""
    command = list(stage.command)
    if stage.resume_dir is not None and stage.resume_dir.is_dir() and any(stage.resume_dir.iterdir()):
        command.append("--resume")
    return command


def write_marker(stage: Stage, workdir: Path, state: str, command: Sequence[str], seconds: float | None = None) -> None:
    marker = stage.marker(workdir, state)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage.name,
        "command": list(command),
        "seconds": None if seconds is None else round(seconds, 1),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "outputs": [str(path) for path in stage.outputs],
    }
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, marker)


def stage_needs(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """Each stage's prerequisites by name; refuses unknown names and stages that need a later one."""
    needs: dict[str, set[str]] = {}
    for index, stage in enumerate(stages):
        earlier = [s.name for s in stages[:index]]
        wanted = set(earlier) if stage.needs is None else set(stage.needs)
        unknown = wanted - set(earlier)
        if unknown:
            raise ValueError(f"stage {stage.name!r} needs {sorted(unknown)}, which are not stages before it")
        needs[stage.name] = wanted
    return needs


def run_stages(
    stages: Sequence[Stage],
    workdir: Path,
    runner: Runner = run_subprocess,
    echo: Callable[[str], None] = print,
    cores: int | None = None,
) -> list[StageReport]:
    """Run the stages, skipping finished ones, as soon as the stages they need are done and their cores are free
    (in list order: a ready stage that does not fit yet is not overtaken). A stage that runs on fewer than all cores
    gets that many threads and writes its output to <workdir>/logs/<name>.log. After a failure no stage starts; the
    running ones finish, then the failure is raised (UserError)."""
    cores = max(1, cores or os.cpu_count() or 1)
    needs = stage_needs(stages)
    for stage in stages:  # before running anything: never mix two configurations in one workdir
        check_same_settings(stage, workdir)
    number = {stage.name: index for index, stage in enumerate(stages, start=1)}
    reports: dict[str, StageReport] = {}
    for stage in stages:
        if stage_is_done(stage, workdir):
            echo(f"[{number[stage.name]}/{len(stages)}] {stage.name}: already done, skipping ({stage.marker(workdir)})")
            reports[stage.name] = StageReport(stage.name, "skipped", 0.0, stage.outputs)
    pending = [stage for stage in stages if stage.name not in reports]
    running: dict[Future, tuple[Stage, list[str], float, int]] = {}
    failures: list[str] = []

    def start(stage: Stage, pool: ThreadPoolExecutor) -> None:
        granted = min(stage.cores or cores, cores)
        command = stage_command(stage)
        env = dict(stage.env)
        log = None
        if granted < cores:
            env.update(OMP_NUM_THREADS=str(granted), MKL_NUM_THREADS=str(granted))
            log = workdir / "logs" / f"{stage.name}.log"
        where = f" (on {granted} of {cores} cores, log {log})" if log else ""
        echo(f"[{number[stage.name]}/{len(stages)}] {stage.name}: running {' '.join(command)}{where}")
        write_marker(stage, workdir, "started", command)
        running[pool.submit(runner, command, env, log)] = (stage, command, time.monotonic(), granted)

    def finish(future: Future) -> None:
        stage, command, started, _ = running.pop(future)
        seconds = time.monotonic() - started
        try:
            returncode = future.result()
        except Exception as error:  # noqa: BLE001 -- a runner that raised failed its stage
            returncode, reason = -1, f"{type(error).__name__}: {error}"
        missing = [str(path) for path in stage.outputs if not path.exists()]
        if returncode != 0 or missing:
            reason = f"exit status {returncode}" if returncode != 0 else f"missing outputs {missing}"
            echo(f"[{number[stage.name]}/{len(stages)}] {stage.name}: FAILED after {seconds:.0f}s ({reason}); "
                 "fix it and re-run to resume from here")
            reports[stage.name] = StageReport(stage.name, "failed", seconds, stage.outputs)
            failures.append(f"pipeline stage {stage.name!r} failed ({reason}); command: {' '.join(command)}")
            return
        write_marker(stage, workdir, "done", command, seconds)
        echo(f"[{number[stage.name]}/{len(stages)}] {stage.name}: done in {seconds:.0f}s")
        reports[stage.name] = StageReport(stage.name, "done", seconds, stage.outputs)

    with ThreadPoolExecutor(max_workers=cores) as pool:
        while running or (pending and not failures):
            free = cores - sum(granted for *_, granted in running.values())
            for stage in list(pending) if not failures else []:
                if not all(reports.get(name, StageReport("", "", 0, ())).status in ("done", "skipped")
                           for name in needs[stage.name]):
                    continue  # waits for its inputs; a later independent stage may start
                if min(stage.cores or cores, cores) > free:
                    break  # the next ready stage in order waits for cores: nothing overtakes it
                pending.remove(stage)
                start(stage, pool)
                free = cores - sum(granted for *_, granted in running.values())
            if not running:
                if pending and not failures:  # cannot happen with stage_needs' checks; never spin
                    raise RuntimeError(f"stages {[s.name for s in pending]} can never start")
                break
            finish(next(as_completed(running)))
    if failures:
        raise UserError(failures[0])
    return [reports[stage.name] for stage in stages if stage.name in reports]


# ----------------------------------------------------------------------------------------------
# The concrete pipeline


@dataclass(frozen=True)
class PipelineSize:
    """How big each stage is. `quick` fits 2 CPU cores in 30 minutes; `full` gives the reported results."""

    episodes_per_task: int
    play_episodes_per_task: int  # play attempts per task (successes and failures) for the world model
    dagger_episodes_per_task: int  # expert roll-outs from a driving policy's states, per task and round
    dagger_rounds: int  # 0: the policies learn from the demos alone
    train_steps: dict[str, int]  # optimizer steps per model kind
    eval_episodes: int
    checkpoint_every: int | None = None  # eval/save interval override for short runs (None: the config's)
    workers: int = 2
    # Real and dreamed episodes per task filmed in the VLA's evaluation (needs an OpenGL backend; 0: none).
    video_episodes: int = 1
    # World models trained with seeds seed, seed + 1, ... and pooled into the one dream model (1: no pooling).
    # A single run's dreamed success rate varies widely between seeds; a pool of ten was chosen over five
    # (docs/experiments/016, 031).
    world_seeds: int = 1
    # The VLA's own DAgger round: the VLA trained on the DAgger rounds above (`train_policy_base`) drives, the expert
    # finishes, and the VLA is fine-tuned on all of it into `train_policy` (configs/vla_dagger_finetune.yaml).
    # Kept because it rebuilds the adopted VLA, not for a shown gain (docs/experiments/032). False: `train_policy` is
    # the VLA trained on the DAgger rounds.
    vla_dagger: bool = True
    # Training and the world model's data stages on one core each, side by side (PipelineSize of 2 CPU cores).
    overlap: bool = False
    # Who drives the DAgger rounds: an MLP-BC per task trained on that task's data ("per_task", docs/experiments/021),
    # or, for one round, the three-task MLP-BC on the demos that also drives the world model's roll-outs ("shared":
    # one training instead of one per task, docs/experiments/043).
    dagger_driver: str = "per_task"


SIZES = {
    "quick": PipelineSize(episodes_per_task=10, play_episodes_per_task=4, dagger_episodes_per_task=4, dagger_rounds=1,
                          train_steps={"world": 300, "policy": 150, "mlp": 300, "mlp_driver": 300,
                                       "policy_finetune": 50},
                          eval_episodes=2,
                          checkpoint_every=100,
                          video_episodes=0,
                          world_seeds=2),
    # The default: one DAgger round driven by the three-task MLP-BC on the demos (which also drives the world model's
    # roll-outs), the policies training beside the world model's data (docs/experiments/043).
    "standard": PipelineSize(episodes_per_task=100, play_episodes_per_task=20, dagger_episodes_per_task=50,
                             dagger_rounds=1, dagger_driver="shared",
                             train_steps={"world": 1000, "policy": 2000, "mlp": 3000, "mlp_driver": 3000},
                             eval_episodes=50, checkpoint_every=500, world_seeds=2, vla_dagger=False, overlap=True),
    "full": PipelineSize(episodes_per_task=200, play_episodes_per_task=100, dagger_episodes_per_task=100,
                         dagger_rounds=DAGGER_ROUNDS,
                         train_steps={"world": 3000, "policy": 9000, "mlp": 9000, "mlp_driver": 3000,
                                      "policy_finetune": 1500},
                         eval_episodes=50, world_seeds=10),
}


@dataclass(frozen=True)
class PipelinePaths:
    """Where every stage writes under the work dir; the Space reads its defaults from here too."""

    workdir: Path = DEFAULT_WORKDIR
    org: str = DEFAULT_ORG
    dagger_rounds: int = 0  # the policies train on dagger_dataset(dagger_rounds)
    vla_dagger: bool = False  # the VLA is then fine-tuned on vla_dagger_dataset (PipelineSize.vla_dagger)

    @property
    def raw(self) -> Path:
        return self.workdir / "raw"

    @property
    def raw_play(self) -> Path:
        return self.workdir / "raw_play"

    @property
    def raw_onpolicy(self) -> Path:
        return self.workdir / "raw_onpolicy"

    @property
    def dataset(self) -> Path:
        return self.workdir / "dataset"

    @property
    def world_dataset(self) -> Path:
        """Expert demos + play data + the three-task demos MLP-BC's roll-outs: what the world model trains on."""
        return self.workdir / "hf_dataset_world"

    def raw_dagger(self, round_: int) -> Path:
        return self.workdir / f"raw_dagger{round_}"

    def dagger_dataset(self, rounds: int) -> Path:
        """Expert demos + DAgger rounds 1..rounds (rounds 0: the demos alone)."""
        return self.dataset if rounds == 0 else self.workdir / f"dataset_dagger{rounds}"

    @property
    def raw_dagger_vla(self) -> Path:
        return self.workdir / "raw_dagger_vla"

    @property
    def vla_dagger_dataset(self) -> Path:
        """Demos + the DAgger rounds + the VLA's own round: what the final VLA is fine-tuned on."""
        return self.workdir / "dataset_dagger_vla"

    def driver_dataset(self, round_: int, task: str) -> Path:
        """One task's demos + its DAgger rounds before `round_`: what that task's round-`round_` driver learns from."""
        return self.workdir / f"dataset_driver{round_}_{task}"

    def training_dataset(self, model: str) -> Path:
        """What `model` (world, world_s<k>, policy, policy_base, mlp, mlp_demos or dagger_driver<r>_<task>) learns
        from."""
        if model == "world" or model.startswith(WORLD_SEED_RUN):
            return self.world_dataset
        if model == ROLLOUT_DRIVER:
            return self.dataset
        if model.startswith(DAGGER_DRIVER):
            round_, task = model.removeprefix(DAGGER_DRIVER).split("_", 1)
            return self.driver_dataset(int(round_), task)
        if model == "policy" and self.vla_dagger:
            return self.vla_dagger_dataset
        return self.dagger_dataset(self.dagger_rounds)

    def train_dir(self, model: str) -> Path:
        return self.workdir / f"train_{model}"

    def best(self, model: str) -> Path:
        return self.train_dir(model) / "best"

    def eval_dir(self, policy: str) -> Path:
        return self.workdir / f"eval_{policy}"

    def export_dir(self, name: str) -> Path:
        return self.workdir / "export" / name

    def repo_id(self, name: str) -> str:
        return f"{self.org}/dreaming-vla-{name}"

    def dataset_repo_name(self, model: str) -> str:
        """The repo name of the dataset `model` learns from: dataset-world, dataset-vla (with the VLA's own DAgger
        round) or dataset."""
        names = {self.world_dataset: "dataset-world", self.vla_dagger_dataset: "dataset-vla"}
        return names.get(self.training_dataset(model), "dataset")

    @property
    def private_env(self) -> tuple[tuple[str, str], ...]:
        """A datasets cache of this workdir's own. datasets 5.2 keys the Arrow cache of a local folder by the
        folder's name and card, not its path or content, so two different `dataset/` folders would share one
        stale cache entry; inside one workdir each dataset folder has a name of its own."""
        return (("HF_DATASETS_CACHE", str(self.workdir / ".cache" / "datasets")),)


# Round r's driver of one task is an MLP-BC trained on that task's data alone, as `dagger_driver<r>_<task>`: a small
# gain over a three-task driver, in the same direction on two data builds (docs/experiments/021).
DAGGER_DRIVER = "dagger_driver"
VLA_BASE = "policy_base"  # with PipelineSize.vla_dagger: the VLA before its own DAgger round (which drives it)
ROLLOUT_DRIVER = "mlp_demos"  # the three-task MLP-BC on the demos whose whole episodes the world model learns from
WORLD_SEED_RUN = "world_s"  # with several world-model seeds, run k trains as `world_s<k>`; the pool is `world`
FINETUNE_CONFIG = "configs/vla_dagger_finetune.yaml"
DRIVER_CONFIG = "configs/mlp_driver.yaml"  # the MLP-BCs that drive DAgger rounds and the world model's roll-outs
# The policy kinds with stages of their own: the VLA (its own DAgger round and fine-tune) and the MLP-BC (it also
# drives the data rounds). Any other registered policy kind with a step budget in SIZES trains on the policies' data.
RECIPE_POLICIES = ("policy", "mlp")


def console(script: str, *args: str | Path) -> tuple[str, ...]:
    """A console script of this environment (next to our interpreter), so the venv is always the one used."""
    return (str(Path(sys.executable).with_name(script)), *map(str, args))


def data_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> list[Stage]:
    """The expert demos and the policies' dataset."""
    from data_prep.generate import OUTPUT_NAME

    report = paths.raw / "generate_report.json"
    return [
        Stage(
            "generate",
            console("vla-generate", "demos", "--tasks", *tasks, "--episodes", size.episodes_per_task, "--out", paths.raw,
                    "--workers", size.workers, "--seed", seed, "--max-attempts", 3 * size.episodes_per_task,
                    "--report", report),
            (report, *(paths.raw / task / OUTPUT_NAME for task in tasks)),
        ),
        Stage(
            "preprocess",
            console("vla-preprocess", "--inputs", paths.raw, "--out", paths.dataset, "--seed", seed, "--overwrite"),
            (paths.dataset / "normalization.json", paths.dataset / "README.md"),
            env=paths.private_env,
        ),
    ]


def side_workers(size: PipelineSize) -> int:
    """Simulator workers of a data stage for the world model: one beside the policies' training when they overlap."""
    return 1 if size.overlap else size.workers


def play_stage(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> Stage:
    """Play data for the world model: the expert with random wrong-move bursts, failures kept."""
    from data_prep.generate import OUTPUT_NAME
    from data_prep.tasks import get_task

    report = paths.raw_play / "generate_report.json"
    return Stage(
        "generate_play",
        console("vla-generate", "play", "--tasks", *tasks, "--episodes", size.play_episodes_per_task, "--out",
                paths.raw_play, "--workers", side_workers(size), "--seed", PLAY_SEED_OFFSET + seed,
                "--perturb-prob", *(f"{task}={get_task(task).play_perturb_prob}" for task in tasks), "--report", report),
        (report, *(paths.raw_play / task / OUTPUT_NAME for task in tasks)),
    )


def train_stage(
    model: str,
    paths: PipelinePaths,
    size: PipelineSize,
    seed: int,
    name: str | None = None,
    config: str | None = None,
    init_from: Path | None = None,
    role: str | None = None,
) -> Stage:
    """Train a `model` kind (world, policy, mlp) into train_<name> (name defaults to the kind), from scratch or, with
    `init_from`, as a fine-tune of that saved model (`config` then names the fine-tune's YAML). `role` picks the
    step budget (`size.train_steps`, default: the kind, or <kind>_finetune)."""
    name = name or model
    steps = size.train_steps[role or (f"{model}_finetune" if init_from else model)]
    overrides = [f"max_steps={steps}", f"seed={seed}", *([f"init_from={init_from}"] if init_from else [])]
    if size.checkpoint_every is not None:
        overrides += [f"eval_every={size.checkpoint_every}", f"save_every={size.checkpoint_every}"]
    return Stage(
        f"train_{name}",
        # `python -m` rather than the vla-train script, whose exit status would be main()'s return value (a dict).
        (sys.executable, "-m", "train_accelerate",
         *console("vla-train", "--model", model, "--config", REPO_ROOT / (config or get_kind(model).config),
                  "--dataset", paths.training_dataset(name),
                  "--output-dir", paths.train_dir(name), "--set", *overrides)[1:]),
        (paths.best(name) / "config.json", paths.train_dir(name) / "train_summary.json"),
        resume_dir=paths.train_dir(name),
        env=paths.private_env,
    )


def driver_name(round_: int, task: str) -> str:
    return f"{DAGGER_DRIVER}{round_}_{task}"


def dagger_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> list[Stage]:
    """Per round r and task: an MLP-BC on that task's demos + rounds < r drives, the expert finishes
    (vla-generate dagger); then all tasks' rounds 1..r are merged with the demos."""
    from data_prep.generate import OUTPUT_NAME

    if size.dagger_driver not in ("per_task", "shared"):
        raise UserError(f"dagger_driver {size.dagger_driver!r}: expected 'per_task' or 'shared'")
    if size.dagger_driver == "shared":
        return shared_dagger_stages(paths, size, tasks, seed)
    stages = []
    for round_ in range(1, size.dagger_rounds + 1):
        raw = paths.raw_dagger(round_)
        episodes = size.dagger_episodes_per_task
        for task in tasks:
            driver, driver_data = driver_name(round_, task), paths.driver_dataset(round_, task)
            report = raw / f"generate_report_{task}.json"
            stages += [
                Stage(
                    f"preprocess_{driver}",
                    console("vla-preprocess", "--inputs", paths.raw / task,
                            *(paths.raw_dagger(r) / task for r in range(1, round_)),
                            "--out", driver_data, "--seed", seed, "--overwrite"),
                    (driver_data / "normalization.json",),
                    env=paths.private_env,
                ),
                train_stage("mlp", paths, size, seed, name=driver, config=DRIVER_CONFIG, role="mlp_driver"),
                Stage(
                    f"generate_dagger{round_}_{task}",
                    console("vla-generate", "dagger", "--tasks", task, "--episodes", episodes, "--out", raw,
                            "--workers", size.workers,
                            "--seed", DAGGER_SEED_OFFSET + DAGGER_ROUND_SEEDS * (round_ - 1) + seed,
                            "--max-attempts", 6 * episodes, "--policy", paths.best(driver),
                            "--handover-steps", DAGGER_HANDOVER_STEPS, "--report", report),
                    (report, raw / task / OUTPUT_NAME),
                ),
            ]
        stages.append(merge_dagger_stage(paths, round_, seed))
    return stages


def merge_dagger_stage(paths: PipelinePaths, round_: int, seed: int) -> Stage:
    """The demos + DAgger rounds 1..round_ as one dataset (`dataset_dagger<round_>`)."""
    dataset = paths.dagger_dataset(round_)
    return Stage(
        f"preprocess_dagger{round_}",
        console("vla-preprocess", "--inputs", paths.raw, *(paths.raw_dagger(r) for r in range(1, round_ + 1)),
                "--out", dataset, "--seed", seed, "--overwrite"),
        (dataset / "normalization.json", dataset / "README.md"),
        env=paths.private_env,
    )


def shared_dagger_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> list[Stage]:
    """One DAgger round for every task, driven by the three-task MLP-BC on the demos (ROLLOUT_DRIVER, trained by
    rollout_driver_stages); the expert finishes. Then the round is merged with the demos."""
    from data_prep.generate import OUTPUT_NAME

    if size.dagger_rounds != 1:
        raise UserError(f"dagger_driver='shared' drives one DAgger round, got dagger_rounds={size.dagger_rounds}")
    raw, episodes = paths.raw_dagger(1), size.dagger_episodes_per_task
    report = raw / "generate_report.json"
    return [
        Stage(
            "generate_dagger1",
            console("vla-generate", "dagger", "--tasks", *tasks, "--episodes", episodes, "--out", raw,
                    "--workers", size.workers, "--seed", DAGGER_SEED_OFFSET + seed, "--max-attempts", 6 * episodes,
                    "--policy", paths.best(ROLLOUT_DRIVER), "--handover-steps", DAGGER_HANDOVER_STEPS,
                    "--report", report),
            (report, *(raw / task / OUTPUT_NAME for task in tasks)),
        ),
        merge_dagger_stage(paths, 1, seed),
    ]


def vla_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> list[Stage]:
    """The VLA; with `size.vla_dagger`, trained as `policy_base`, then its own DAgger round and a fine-tune."""
    from data_prep.generate import OUTPUT_NAME

    if not size.vla_dagger:
        return [train_stage("policy", paths, size, seed)]
    raw, dataset, episodes = paths.raw_dagger_vla, paths.vla_dagger_dataset, size.dagger_episodes_per_task
    report = raw / "generate_report.json"
    return [
        train_stage("policy", paths, size, seed, name=VLA_BASE),
        Stage(
            "generate_dagger_vla",
            console("vla-generate", "dagger", "--tasks", *tasks, "--episodes", episodes, "--out", raw,
                    "--workers", size.workers,
                    "--seed", VLA_DAGGER_SEED_OFFSET + seed, "--max-attempts", 6 * episodes,
                    "--policy", paths.best(VLA_BASE), "--handover-steps", DAGGER_HANDOVER_STEPS, "--report", report),
            (report, *(raw / task / OUTPUT_NAME for task in tasks)),
        ),
        Stage(
            "preprocess_dagger_vla",
            console("vla-preprocess", "--inputs", paths.raw, *(paths.raw_dagger(r) for r in range(1, size.dagger_rounds + 1)),
                    raw, "--out", dataset, "--seed", seed, "--overwrite"),
            (dataset / "normalization.json", dataset / "README.md"),
            env=paths.private_env,
        ),
        train_stage("policy", paths, size, seed, config=FINETUNE_CONFIG, init_from=paths.best(VLA_BASE)),
    ]


def rollout_driver(size: PipelineSize) -> str:
    """Whose whole episodes the world model learns from: a three-task MLP-BC on the demos. Without DAgger rounds the
    evaluated MLP-BC is that policy already (the same data), so it drives; with them, a driver of its own does."""
    return "mlp" if size.dagger_rounds == 0 else ROLLOUT_DRIVER


def rollout_driver_stages(paths: PipelinePaths, size: PipelineSize, seed: int) -> list[Stage]:
    """The three-task MLP-BC on the demos that drives the world model's roll-outs (and a shared DAgger round), when
    it is not the evaluated MLP-BC itself (rollout_driver)."""
    driver = rollout_driver(size)
    return [] if driver == "mlp" else [train_stage("mlp", paths, size, seed, name=driver, config=DRIVER_CONFIG,
                                                   role="mlp_driver")]


def world_data_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int) -> list[Stage]:
    """The world model's dataset: demos + play data + whole episodes of a three-task MLP-BC trained on the demos,
    failures kept; a multi-object scene's episodes once per goal of the scene (`vla-preprocess --relabel-goals`)."""
    from data_prep.generate import OUTPUT_NAME
    from data_prep.scenes import GOAL_TASKS

    report = paths.raw_onpolicy / "generate_report.json"
    driver = rollout_driver(size)
    return [
        play_stage(paths, size, tasks, seed),
        Stage(
            "generate_onpolicy",
            console("vla-generate", "rollouts", "--tasks", *tasks, "--episodes", size.play_episodes_per_task, "--out",
                    paths.raw_onpolicy, "--workers", side_workers(size), "--seed", ONPOLICY_SEED_OFFSET + seed,
                    "--policy", paths.best(driver), "--report", report),
            (report, *(paths.raw_onpolicy / task / OUTPUT_NAME for task in tasks)),
        ),
        Stage(
            "preprocess_world",
            console("vla-preprocess", "--inputs", paths.raw, paths.raw_play, paths.raw_onpolicy,
                    "--out", paths.world_dataset, "--seed", seed, "--overwrite",
                    *(["--relabel-goals"] if any(task in GOAL_TASKS for task in tasks) else [])),
            (paths.world_dataset / "normalization.json", paths.world_dataset / "README.md"),
            env=paths.private_env,
        ),
    ]


def world_model_runs(size: PipelineSize) -> list[str]:
    """The training runs whose world models make the dream model: `world` itself, or `world_s0..` to be pooled."""
    return ["world"] if size.world_seeds == 1 else [f"{WORLD_SEED_RUN}{k}" for k in range(size.world_seeds)]


def world_model_stages(paths: PipelinePaths, size: PipelineSize, seed: int) -> list[Stage]:
    """Train the world model; with several seeds, train each and pool them into train_world/best (one ensemble)."""
    runs = world_model_runs(size)
    stages = [train_stage("world", paths, size, seed + k, name=run) for k, run in enumerate(runs)]
    if len(runs) > 1:
        stages.append(Stage(
            "pool_world",
            console("vla-pool-world-models", "--inputs", *(paths.best(run) for run in runs), "--out", paths.best("world"),
                    "--overwrite"),
            (paths.best("world") / "config.json",),
        ))
    return stages


def evaluate_stage(policy: str, paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], eval_seed: int) -> Stage:
    return Stage(
        f"evaluate_{policy}",
        console("vla-rollout", "--policy", paths.best(policy), "--world-model", paths.best("world"), "--tasks", *tasks,
                "--episodes", size.eval_episodes, "--env", "both", "--out", paths.eval_dir(policy), "--seed", eval_seed,
                "--workers", size.workers, "--name", get_kind(policy).label, "--no-progress", "--overwrite",
                *(("--video", "--video-episodes", size.video_episodes) if policy == VIDEO_POLICY and size.video_episodes
                  else ())),
        (paths.eval_dir(policy) / "summary.json", paths.eval_dir(policy) / "summary.md"),
        env=paths.private_env,
    )


def pipeline_policies(size: PipelineSize) -> list[str]:
    """The policy kinds this size trains, evaluates and exports: those it gives a step budget (`train_steps`)."""
    return [kind.name for kind in kinds("policy") if kind.name in size.train_steps]


def export_stages(paths: PipelinePaths, size: PipelineSize) -> list[Stage]:
    stages = []
    models = ["world", *pipeline_policies(size)]
    for model in models:
        name = get_kind(model).repo_name
        runs = world_model_runs(size) if model == "world" else [model]
        results = [paths.train_dir(run) / "train_summary.json" for run in runs]
        # The world model's evaluation is the dream-vs-real agreement measured in both policies' rollouts.
        results += [paths.eval_dir(policy) / "summary.json" for policy in pipeline_policies(size)
                    if model in (policy, "world")]
        stages.append(Stage(
            f"export_{model}",
            console("vla-export", "--model-dir", paths.best(model), "--repo-id", paths.repo_id(name),
                    "--card-results", *results, "--dataset-repo-id", paths.repo_id(paths.dataset_repo_name(model)),
                    "--out", paths.export_dir(name), "--overwrite"),
            (paths.export_dir(name) / "README.md",),
        ))
    datasets: dict[str, str] = {}  # one export per dataset: its repo name -> a model that learns from it
    for model in models:
        datasets.setdefault(paths.dataset_repo_name(model), model)
    for name, model in datasets.items():
        stages.append(Stage(
            f"export_{name.replace('-', '_')}",
            console("vla-export", "--dataset-dir", paths.training_dataset(model), "--repo-id", paths.repo_id(name),
                    "--out", paths.export_dir(name), "--overwrite"),
            (paths.export_dir(name) / "README.md",),
        ))
    return stages


OUTPUT_FLAGS = ("--out", "--output-dir", "--report")  # their values are what a stage writes, not what it reads


def read_paths(stage: Stage) -> list[Path]:
    """The absolute paths a stage's command line names as inputs (`--set key=/path` included)."""
    found, args = [], list(stage.command)
    for index, arg in enumerate(args):
        if index and args[index - 1] in OUTPUT_FLAGS:
            continue
        value = arg.split("=", 1)[1] if "=" in arg and not arg.startswith("/") else arg
        if value.startswith("/"):
            found.append(Path(value))
    return found


def infer_needs(stages: Sequence[Stage]) -> list[Stage]:
    """Each stage needs the earlier stages whose outputs lie in, or hold, a path it reads: derived from the command
    lines, so the order of work is the data's own and a new stage needs no hand-written edges."""
    inferred = []
    for index, stage in enumerate(stages):
        reads = read_paths(stage)
        needs = tuple(
            earlier.name for earlier in stages[:index]
            if any(out == path or path in out.parents or out in path.parents for out in earlier.outputs for path in reads)
        )
        inferred.append(dataclasses.replace(stage, needs=needs))
    return inferred


def build_stages(paths: PipelinePaths, size: PipelineSize, tasks: Sequence[str], seed: int = 0,
                 eval_seed: int = EVAL_SEED) -> list[Stage]:
    """generate → preprocess → DAgger rounds → world-model data → train world/VLA/MLP → evaluate (dream + real) → export cards/repos."""
    paths = dataclasses.replace(paths, dagger_rounds=size.dagger_rounds, vla_dagger=size.vla_dagger)
    mlp = [train_stage("mlp", paths, size, seed)]
    others = [train_stage(policy, paths, size, seed) for policy in pipeline_policies(size) if policy not in RECIPE_POLICIES]
    driver_first = rollout_driver(size) == "mlp"  # the MLP-BC drives the world model's roll-outs: it trains first
    shared_driver = size.dagger_rounds > 0 and size.dagger_driver == "shared"  # it drives the DAgger round too
    # List order is the priority among ready stages: the VLA, the longest, starts as soon as its data is there.
    stages = infer_needs([
        *data_stages(paths, size, tasks, seed),
        *(rollout_driver_stages(paths, size, seed) if shared_driver else []),
        *dagger_stages(paths, size, tasks, seed),
        *vla_stages(paths, size, tasks, seed),
        *(mlp if driver_first else []),
        *([] if shared_driver else rollout_driver_stages(paths, size, seed)),
        *world_data_stages(paths, size, tasks, seed),
        *world_model_stages(paths, size, seed),
        *([] if driver_first else mlp),
        *others,
        *(evaluate_stage(policy, paths, size, tasks, eval_seed) for policy in pipeline_policies(size)),
        *export_stages(paths, size),
    ])
    if size.overlap:  # training and the world model's data on one core each, side by side
        one_core = ("train_", "generate_play", "generate_onpolicy", "preprocess_world", "pool_world")
        stages = [dataclasses.replace(s, cores=1) if s.name.startswith(one_core) else s for s in stages]
    return stages


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def success_table(paths: PipelinePaths) -> list[str]:
    """Per policy and task: real success (Wilson 95 % interval), dreamed success and dream - real, from the
    evaluations' summary.json (the rows of policies not evaluated yet are left out)."""
    lines = ["| policy | task | real success | 95 % CI | dream | dream - real |", "| --- | --- | ---: | --- | ---: | ---: |"]
    for kind in kinds("policy"):
        policy, label = kind.name, kind.label
        summary = paths.eval_dir(policy) / "summary.json"
        if not summary.is_file():
            continue
        payload = json.loads(summary.read_text())
        dream = {a["task"]: a for a in payload.get("agreement", []) if not a.get("world_model")}
        for row in payload["results"]:
            if row["env"] != "real":
                continue
            pair = dream.get(row["task"], {})
            gap = pair.get("success_gap")
            lines.append(
                f"| {label} | {row['task']} | {row['successes']}/{row['episodes']} = {percent(row['success_rate'])} "
                f"| [{percent(row['ci_low'])}, {percent(row['ci_high'])}] | {percent(pair.get('dream_success_rate'))} "
                f"| {'n/a' if gap is None else f'{100 * gap:+.0f} pp'} |"
            )
    return lines


def print_summary(reports: Sequence[StageReport], paths: PipelinePaths, total_seconds: float) -> None:
    print("\n== pipeline summary ==")
    for report in reports:
        print(f"  {report.name:<16} {report.status:<8} {report.seconds:7.0f}s  {', '.join(map(str, report.outputs))}")
    print(f"  total {total_seconds:.0f}s")
    print("model cards / hub repos:")
    for card in (report.outputs[0] for report in reports if report.name.startswith("export_")):
        print(f"  {paths.repo_id(card.parent.name):<36} {card}")
    print("evaluations (tables, figures and, with an OpenGL backend, videos):")
    for policy in (report.name.removeprefix("evaluate_") for report in reports if report.name.startswith("evaluate_")):
        label = get_kind(policy).label
        videos = paths.eval_dir(policy) / "videos"
        print(f"  {label:<4} {paths.eval_dir(policy) / 'summary.md'}  figures: {paths.eval_dir(policy) / 'figures'}"
              + (f"  videos: {videos}" if videos.is_dir() else ""))
    print("\nsuccess on the evaluation starts (real robosuite; dreamed by the world model from the same starts):")
    print("\n".join(success_table(paths)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-pipeline", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="smoke test: tiny data and trainings, every stage exercised (~15 min on 2 CPU cores)")
    mode.add_argument("--standard", dest="size", action="store_const", const="standard",
                      help="the default: a working robot and its dream in <= 30 min on 2 CPU cores")
    mode.add_argument("--full", dest="size", action="store_const", const="full", help="the reported size (hours on a CPU)")
    parser.set_defaults(size="standard")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    from data_prep.tasks import default_tasks, task_names

    parser.add_argument("--tasks", nargs="+", default=default_tasks(), choices=task_names(), metavar="TASK",
                        help=f"tasks (default: {' '.join(default_tasks())}; any of {' '.join(task_names())})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                        help=f"first simulator seed of the evaluation starts (default {EVAL_SEED}; tuning runs: 200000+)")
    parser.add_argument("--org", default=DEFAULT_ORG, help="namespace of the exported hub repos (local cache only unless pushed)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _main(argv: Sequence[str] | None = None) -> list[StageReport]:
    args = parse_args(argv)
    from data_prep.tasks import get_task

    for task in args.tasks:
        get_task(task)
    if args.eval_seed < EVAL_SEED:
        raise UserError(f"--eval-seed {args.eval_seed}: evaluation starts begin at {EVAL_SEED} or later, apart from "
                        "every seed the data stages use")
    size = SIZES[args.size]
    paths = PipelinePaths(args.workdir.resolve(), args.org)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    stages = build_stages(paths, size, args.tasks, args.seed, args.eval_seed)
    print(f"vla-pipeline --{args.size}: {len(stages)} stages in {paths.workdir}")
    start = time.monotonic()
    reports = run_stages(stages, paths.workdir)
    print_summary(reports, paths, time.monotonic() - start)
    return reports


def main() -> None:
    run_cli(_main)


if __name__ == "__main__":
    main()
