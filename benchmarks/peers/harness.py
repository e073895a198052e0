"""The steps every peer command shares: its own virtualenv, its per-task input files, timed training parts, the
replay validation of its adapter, and its evaluation on the project's starts (with checkpoint selection).

Evaluation is the project's: `RobosuiteEnv` (data_prep.sim.make_env, as for our policies), `evaluation.rollout`,
episode i of a task from simulator seed `--seed + i` (100000+, the seeds `vla-rollout` uses), the task's horizon
(400), results written like `vla-rollout`'s (episodes.jsonl, trajectories.npz, summary.json/md). With several
checkpoints, each first plays `--select-episodes` episodes from the tuning starts (200000+, never evaluation's) and
the best (ties: the later) is then evaluated, as the project's own models are chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from adapter import REPO_ROOT, PeerPolicy, ReplayDemo, lerobot_observer, replay_demos, robomimic_observer
from protocol import PeerError, PeerServer

from common.errors import UserError
from data_prep.preprocess import find_inputs
from data_prep.robomimic_io import read_robomimic_hdf5
from data_prep.tasks import default_tasks, get_task
from evaluation.envs import RobosuiteEnv, Start
from evaluation.records import EpisodeRecord, write_episodes
from evaluation.rollout import rollout

PEERS_DIR = Path(__file__).resolve().parent
VENVS = REPO_ROOT / ".venv-peers"  # one virtualenv per peer (git-ignored; CI never builds them)
EVAL_SEED = 100_000  # evaluation/cli.py's default: the starts every policy of the project is scored on
TUNING_SEED = 200_000  # docs/DESIGN.md: tuning runs use 200000+
REPLAY_PASS = 0.95  # a validated adapter replays at least this share of recorded demos to success
OBS_TOLERANCE = 1e-5  # ... and shows the peer the recorded observations (first steps) to float32 rounding
OBSERVERS = ("robomimic", "lerobot")


def common_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--data", type=Path, help="folder (or files) of vla-generate HDF5 demos, one file per task")
    p.add_argument("--out", type=Path, default=Path(default_out), help="work folder of this peer (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=default_tasks(), help="tasks (default: lift can square)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="evaluation episode i starts from seed + i")
    p.add_argument("--select-episodes", type=int, default=50,
                   help="tuning episodes per checkpoint to choose among several (0: take the last)")
    p.add_argument("--candidates", type=int, default=10,
                   help="checkpoints tried on the tuning starts: this many, evenly spaced, ending with the last")
    p.add_argument("--horizon", type=int, help="max steps per episode (default: the task's, 400)")
    p.add_argument("--replay-demos", type=int, help="replay validation: demos per task (default: all)")
    p.add_argument("--workers", type=int, default=1, help="simulator processes")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads of the peer's processes")
    p.add_argument("--no-progress", action="store_true")


def check_counts(args: argparse.Namespace, names: Sequence[str]) -> None:
    """One-line errors for counts that must be positive (`select_episodes` may be 0)."""
    for name in ("episodes", "workers", "threads", "candidates", *names):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("select_episodes", "horizon", "replay_demos"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "select_episodes" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'select_episodes' else 1}, got {value}")


def peer_env(threads: int) -> dict[str, str]:
    """The environment of a peer's processes: its threads, offline Hub, no stray user site-packages."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.pop("PYTHONPATH", None)
    return env


# ------------------------------------------------------------------------------------------------ install


def ensure_venv(name: str, steps: Sequence[Sequence[str]], versions_code: str) -> Path:
    """`.venv-peers/<name>` with each `pip install <step>` run once; returns its Python.

    The steps are recorded in `peer-install.json` with the versions `versions_code` prints, so a finished
    install is reused and a changed recipe reinstalls."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    marker = venv / "peer-install.json"
    steps = [list(s) for s in steps]
    if python.is_file() and marker.is_file() and json.loads(marker.read_text()).get("steps") == steps:
        return python
    base = shutil.which("python3.11") or sys.executable
    if not python.is_file():
        print(f"creating {venv} with {base}", flush=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    env = peer_env(1)
    for step in steps:
        print(f"{venv.name}: pip install {' '.join(step)}", flush=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", *step], env=env)
        if done.returncode != 0:
            raise UserError(f"{venv}: `pip install {' '.join(step)}` failed (exit {done.returncode}); see pip's output above")
    out = subprocess.run([str(python), "-c", versions_code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"{venv}: the installed peer does not import: {out.stderr.strip().splitlines()[-1:]}")
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    marker.write_text(json.dumps({"steps": steps, "versions": versions, "date": date.today().isoformat()}, indent=2))
    print(f"{venv.name} ready: {versions}", flush=True)
    return python


def installed_python(name: str, command: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not (VENVS / name / "peer-install.json").is_file():
        raise UserError(f"{VENVS / name}: not installed; run `{command} install` first")
    return python


def installed_versions(name: str) -> dict:
    marker = VENVS / name / "peer-install.json"
    return json.loads(marker.read_text())["versions"] if marker.is_file() else {}


# ------------------------------------------------------------------------------------------------ data


def task_files(data: Path | None, tasks: Sequence[str]) -> dict[str, Path]:
    """The one HDF5 file of each task under `--data` (a peer trains one model per task on one file)."""
    if data is None:
        raise UserError("--data is required: a folder of vla-generate HDF5 files (e.g. data/raw)")
    for task in tasks:
        get_task(task)
    found: dict[str, list[Path]] = {}
    for path in find_inputs([data]):
        found.setdefault(read_robomimic_hdf5(path).task, []).append(path)
    files = {}
    for task in tasks:
        paths = found.get(task, [])
        if len(paths) != 1:
            raise UserError(f"--data {data}: expected one HDF5 file of task {task!r}, found {len(paths)} "
                            f"({', '.join(map(str, paths)) or 'none'})")
        files[task] = paths[0]
    return files


# ------------------------------------------------------------------------------------------------ training parts


def run_part(command: Sequence[str], log: Path, threads: int, part: dict, parts_file: Path) -> None:
    """Run one training part in the peer's venv (output to `log`), then append its wall time to `parts_file`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  part {part}: {' '.join(map(str, command))}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "ab") as f:
        done = subprocess.run(list(map(str, command)), stdout=f, stderr=subprocess.STDOUT, env=peer_env(threads))
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise UserError(f"training part {part} failed (exit {done.returncode}): {tail}")
    with open(parts_file, "a") as f:
        f.write(json.dumps({**part, "seconds": round(seconds, 1), "threads": threads}) + "\n")


def training_time(parts_file: Path) -> dict:
    """Total wall time and steps of the parts run so far (parts.jsonl), for the results table."""
    parts = [json.loads(line) for line in parts_file.read_text().splitlines()] if parts_file.is_file() else []
    seconds = sum(p["seconds"] for p in parts)
    steps = sum(p["to_step"] - p["from_step"] for p in parts)
    samples = sum((p["to_step"] - p["from_step"]) * p["batch_size"] for p in parts)
    return {"parts": len(parts), "steps": steps, "seconds": round(seconds, 1),
            "samples_per_s": round(samples / seconds, 1) if seconds else None}


# ------------------------------------------------------------------------------------------------ rollouts


@dataclass
class Peer:
    """How to run one peer's policy: a label, its observer kind, and the server command for a checkpoint."""

    name: str
    observer: str  # one of OBSERVERS
    serve: Callable[[str, Path], list[str]]  # (task, checkpoint) -> command
    threads: int = 1

    def server(self, command: list[str], log: Path) -> PeerServer:
        return PeerServer(command, log, env=peer_env(self.threads))

    def policy(self, server: PeerServer, env: RobosuiteEnv, name: str) -> PeerPolicy:
        observe = robomimic_observer(env) if self.observer == "robomimic" else lerobot_observer
        return PeerPolicy(server, name, observe)


def play(peer: Peer, task: str, command: list[str], starts: list[Start], horizon: int, workers: int, log: Path,
         progress: bool, demos: list[ReplayDemo] | None = None, recorded=None) -> tuple[list[EpisodeRecord], PeerPolicy]:
    """Episodes from `starts` with the peer's server `command` (replay mode when `demos` are given)."""
    instruction = get_task(task).instruction  # unused by the peers; kept in the records like our policies'
    with RobosuiteEnv(task, workers=workers) as env, peer.server(command, log) as server:
        policy = peer.policy(server, env, peer.name)
        if demos is not None:
            policy.play_back(demos, recorded)
        try:
            records = rollout(env, policy, starts, [instruction] * len(starts), horizon, progress)
        except PeerError as err:  # a reset the server refused: no episode can start (a failing step ends episodes)
            raise UserError(f"{peer.name} {task}: {err} (server log: {log})") from None
    return records, policy


def validate_replay(peer: Peer, task: str, hdf5: Path, command: list[str], recorded, out: Path, workers: int,
                    limit: int | None, progress: bool) -> dict:
    """Replay the recorded demos of `hdf5` through the adapter from their recorded starts."""
    demos = replay_demos(hdf5, limit)
    horizon = max(len(d.actions) for d in demos)
    records, policy = play(peer, task, command, [d.start for d in demos], horizon, workers,
                           out / f"replay_{task}.log", progress, demos, recorded)
    failures = [{"demo": d.name, "seed": d.start.seed, "length": r.length, "error": r.error}
                for d, r in zip(demos, records, strict=True) if not r.success]
    successes = sum(r.success for r in records)
    start, whole = (float(np.nanmax(e)) if np.isfinite(e).any() else None
                    for e in (policy.start_obs_error, policy.obs_error))
    return {"task": task, "file": str(hdf5), "demos": len(demos), "successes": successes,
            "success_rate": successes / len(demos), "start_obs_error": start, "max_obs_error": whole,
            "passed": successes / len(demos) >= REPLAY_PASS and start is not None and start <= OBS_TOLERANCE,
            "failures": failures}


def replay_report(peer: str, results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps({"peer": peer, "pass_rate": REPLAY_PASS, "obs_tolerance": OBS_TOLERANCE,
                                                 "tasks": results}, indent=2))
    for r in results:
        verdict = "PASS" if r["passed"] else "FAIL"
        print(f"replay {peer} {r['task']}: {r['successes']}/{r['demos']} demos succeed ({100 * r['success_rate']:.0f} %, "
              f"needs {100 * REPLAY_PASS:.0f} %); observation mismatch {r['start_obs_error']} over the first "
              f"{PeerPolicy.check_steps} steps (needs <= {OBS_TOLERANCE}), {r['max_obs_error']} over whole demos: "
              f"{verdict}")
    if not all(r["passed"] for r in results):
        raise UserError(f"{peer}: the adapter failed its replay validation (see {out / 'replay.json'}); its numbers "
                        "would not be the peer's")


def spaced(items: Sequence, count: int) -> list:
    """At most `count` of `items`, evenly spaced and always ending with the last."""
    if len(items) <= count:
        return list(items)
    stride = len(items) // count
    return [items[len(items) - 1 - k * stride] for k in reversed(range(count))]


def success_rate(records: Sequence[EpisodeRecord]) -> float:
    return sum(r.success for r in records) / max(1, len(records))


def evaluate(peer: Peer, checkpoints: dict[str, list[Path]], args: argparse.Namespace, settings: dict) -> Path:
    """Choose each task's checkpoint on tuning starts, evaluate it on the evaluation starts; one results folder."""
    from evaluation.plan import seeded_starts, write_results
    from evaluation.report import write_summary

    results = args.out / "results"
    logs = args.out / "logs"
    selection: dict[str, dict] = {}
    messages: list[str] = []

    def produce(tmp: Path) -> str:
        records: list[EpisodeRecord] = []
        for task, saved in checkpoints.items():
            horizon = args.horizon or get_task(task).horizon
            candidates = spaced(saved, args.candidates)
            tried = {}
            chosen = candidates[-1]
            if len(candidates) > 1 and args.select_episodes > 0:
                for ckpt in candidates:
                    tuned, _ = play(peer, task, peer.serve(task, ckpt), seeded_starts(TUNING_SEED, args.select_episodes),
                                    horizon, args.workers, logs / f"select_{task}.log", not args.no_progress)
                    tried[str(ckpt)] = success_rate(tuned)
                    print(f"  {task} {ckpt.name if ckpt.suffix else ckpt}: tuning success {100 * tried[str(ckpt)]:.0f} %")
                chosen = max(reversed(candidates), key=lambda c: tried[str(c)])
            final, _ = play(peer, task, peer.serve(task, chosen), seeded_starts(args.seed, args.episodes), horizon,
                            args.workers, logs / f"eval_{task}.log", not args.no_progress)
            selection[task] = {"checkpoint": str(chosen), "tuning_success": tried}
            records += final
            errors = sorted({r.error for r in final if r.error})
            if errors:
                messages.append(f"{peer.name} {task}: episodes ended by errors: {errors[:3]}")
        write_episodes(records, tmp)
        (tmp / "selection.json").write_text(json.dumps(selection, indent=2))
        return write_summary(records, tmp, settings, messages)

    out, markdown = write_results(results, produce)
    print(markdown)
    for message in messages:
        print(message)
    print(f"wrote {out}")
    return out


def settings_of(args: argparse.Namespace, peer: str, extra: dict) -> dict:
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    return {"peer": peer, **plain, **extra, "date": date.today().isoformat()}
