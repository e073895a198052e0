"""Reliability probe: bad inputs and faults tried as a user would, each reported as handled or not (issue 40).

    python benchmarks/reliability_probe.py [--workdir DIR] [--only 1.4 3.] [--markdown FILE]

Every case runs the project's commands in subprocesses (`vla-preprocess`, `vla-train`, `vla-rollout`,
`vla-pool-world-models`, `vla-export`, the Space over raw HTTP) on tiny data made on the fly from
tests/fixtures/*.hdf5 and tiny models trained for two steps, then checks what a user would check: the exit
status, one `error:` line and no traceback, and that no file the command did not write was lost. A case is
*handled* when all of its checks pass. Takes a few minutes on 2 CPU cores; everything stays under --workdir
(the Hugging Face caches included).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIXTURES = REPO / "tests" / "fixtures"
TINY_WORLD = ["model_config.hidden_dim=8", "model_config.token_mlp_dim=8", "model_config.channel_mlp_dim=8",
              "model_config.num_layers=1", "model_config.num_ensemble=2"]
TINY_MLP = ["model_config.hidden_dim=8", "model_config.num_layers=1", "model_config.chunk_size=2"]
TINY_RUN = ["batch_size=8", "eval_every=1", "save_every=1", "max_eval_batches=2", "warmup_steps=0", "log_every=1"]


@dataclass
class Result:
    case: str
    what: str
    handled: bool
    detail: str


class Fail(Exception):
    """A check of a case did not hold; the message says which."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Fail(message)


class Probe:
    def __init__(self, workdir: Path):
        self.root = workdir
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "HF_HOME": str(workdir / "hf_home"), "HF_DATASETS_CACHE": str(workdir / "hf_datasets"),
                    "GRADIO_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
        self.counter = 0

    # ------------------------------------------------------------------ helpers

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.root / f"{self.counter:02d}_{name}"
        path.mkdir(parents=True)
        return path

    def run(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [str(BIN / str(args[0])) if (BIN / str(args[0])).exists() else str(args[0]), *map(str, args[1:])]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def python(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-c", code, timeout=timeout)

    @staticmethod
    def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
        """The command stopped with exit 2 and one `error:` line holding every needle, and no traceback."""
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        check("Traceback" not in proc.stderr, f"traceback (exit {proc.returncode}): {last_line(proc.stderr)}")
        check(proc.returncode == 2, f"exit {proc.returncode}, expected 2: {last_line(proc.stderr or proc.stdout)}")
        check(len(errors) == 1, f"{len(errors)} error lines")
        for needle in needles:
            check(needle in errors[0], f"error line lacks {needle!r}: {errors[0]}")
        return errors[0]

    def raw_inputs(self, folder: Path) -> Path:
        for task in ("lift", "can", "square"):
            (folder / task).mkdir(parents=True, exist_ok=True)
            shutil.copy(FIXTURES / f"tiny_{task}.hdf5", folder / task / f"tiny_{task}.hdf5")
        return folder

    def edited_fixture(self, folder: Path, edit: Callable) -> Path:
        import h5py

        path = folder / "bad.hdf5"
        shutil.copy(FIXTURES / "tiny_lift.hdf5", path)
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def train(self, kind: str, out: Path, *extra: str, dataset: Path | None = None) -> subprocess.CompletedProcess:
        config = {"world": "configs/world_model.yaml", "mlp": "configs/mlp_bc.yaml"}[kind]
        tiny = TINY_WORLD if kind == "world" else TINY_MLP
        return self.run("vla-train", "--model", kind, "--config", REPO / config, "--dataset", dataset or self.dataset,
                        "--output-dir", out, "--set", "max_steps=2", *TINY_RUN, *tiny, *extra)

    def rollout(self, out: Path, *extra: str, policy: Path | None = None, world: Path | None = None,
                dataset: Path | None = None) -> subprocess.CompletedProcess:
        return self.run("vla-rollout", "--policy", policy or self.mlp, "--world-model", world or self.world,
                        "--env", "dream", "--dataset", dataset or self.dataset, "--tasks", "lift", "--episodes", "1",
                        "--horizon", "2", "--no-progress", "--out", out, *extra)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        base = self.fresh("setup")
        self.raw = self.raw_inputs(base / "raw")
        proc = self.run("vla-preprocess", "--inputs", self.raw, "--out", base / "dataset")
        if proc.returncode:
            raise SystemExit(f"setup: vla-preprocess failed: {proc.stderr}")
        self.dataset = base / "dataset"
        for kind in ("world", "mlp"):
            proc = self.train(kind, base / kind)
            if proc.returncode:
                raise SystemExit(f"setup: vla-train --model {kind} failed: {proc.stderr[-2000:]}")
        self.world, self.mlp, self.world_run = base / "world" / "best", base / "mlp" / "best", base / "world"

    # ------------------------------------------------------------------ 1. outputs never delete foreign data

    def case_out_is_input(self) -> str:
        folder = self.raw_inputs(self.fresh("out_is_input") / "raw")
        before = snapshot(folder)
        proc = self.run("vla-preprocess", "--inputs", folder, "--out", folder, "--overwrite")
        check(snapshot(folder) == before, "input files were changed or deleted")
        return self.one_line_error(proc, str(folder))

    def case_out_is_parent(self) -> str:
        parent = self.fresh("out_is_parent")
        self.raw_inputs(parent / "raw")
        (parent / "notes.txt").write_text("mine")
        before = snapshot(parent)
        proc = self.run("vla-preprocess", "--inputs", parent / "raw", "--out", parent, "--overwrite")
        check(snapshot(parent) == before, "files under --out were changed or deleted")
        return self.one_line_error(proc, str(parent))

    def case_out_inside_input(self) -> str:
        folder = self.raw_inputs(self.fresh("out_inside_input") / "raw")
        proc = self.run("vla-preprocess", "--inputs", folder, "--out", folder / "dataset")
        check(not (folder / "dataset").exists(), "the dataset was written inside the input folder")
        return self.one_line_error(proc, "input")

    def over_foreign_folder(self, name: str, write: Callable[..., subprocess.CompletedProcess], overwrite: bool) -> str:
        """`write(out, *flags)` to an existing folder holding a file of the user's: refused, the file kept."""
        out = self.fresh(name) / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        proc = write(out, *(["--overwrite"] if overwrite else []))
        check((out / "keep.txt").is_file(), "keep.txt in --out was deleted")
        return self.one_line_error(proc, str(out) if overwrite else "--overwrite")

    def case_rollout_own_overwrite(self) -> str:
        out = self.fresh("rollout_own") / "out"
        first = self.rollout(out)
        check(first.returncode == 0, f"first run failed: {last_line(first.stderr)}")
        again = self.rollout(out, "--overwrite")
        check(again.returncode == 0, f"--overwrite of its own results failed: {last_line(again.stderr)}")
        check((out / "episodes.jsonl").is_file(), "no episodes.jsonl after --overwrite")
        return "its own results folder is replaced with --overwrite"

    def pool(self, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.run("vla-pool-world-models", "--inputs", self.world, self.world_run / "final", "--out", out, *extra)

    def export(self, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.run("vla-export", "--model-dir", self.mlp, "--repo-id", "local/probe-mlp", "--out", out, *extra)

    def frozen_while_writing(self, out: Path) -> subprocess.Popen:
        """A vla-preprocess run to `out`, stopped (SIGSTOP) while its temporary folder exists: past its first check."""
        proc = subprocess.Popen([str(BIN / "vla-preprocess"), "--inputs", str(self.raw), "--out", str(out)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if any(p.name.startswith(f"{out.name}.tmp-") for p in out.parent.iterdir()):
                os.kill(proc.pid, signal.SIGSTOP)
                if any(p.name.startswith(f"{out.name}.tmp-") for p in out.parent.iterdir()):
                    return proc
                os.kill(proc.pid, signal.SIGCONT)
                break
            time.sleep(0.001)
        proc.wait(120)
        raise Fail("the probe missed the run's write window (rerun the probe)")

    def case_concurrent_preprocess(self) -> str:
        out = self.fresh("concurrent") / "dataset"
        first = self.frozen_while_writing(out)
        second = self.run("vla-preprocess", "--inputs", self.raw, "--out", out)  # starts and ends while the first waits
        os.kill(first.pid, signal.SIGCONT)
        first.wait(120)
        stderr = first.stderr.read()
        check(second.returncode == 0, f"the second run failed: {last_line(second.stderr)}")
        check(first.returncode == 2, f"the first run exit {first.returncode}: it replaced the second's dataset")
        check("Traceback" not in stderr, f"traceback: {last_line(stderr)}")
        check((out / "normalization.json").is_file(), "no complete dataset left at --out")
        return last_line(stderr)

    def case_folder_appears_during_run(self) -> str:
        out = self.fresh("appears") / "dataset"
        proc = self.frozen_while_writing(out)
        out.mkdir()
        (out / "keep.txt").write_text("made while the run was writing")
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(120)
        stderr = proc.stderr.read()
        check((out / "keep.txt").is_file(), "the folder made during the run was deleted")
        check(proc.returncode == 2 and "Traceback" not in stderr, f"exit {proc.returncode}: {last_line(stderr)}")
        return last_line(stderr)

    def case_train_foreign_best(self) -> str:
        out = self.fresh("train_foreign_best") / "run"
        (out / "best").mkdir(parents=True)
        (out / "best" / "keep.txt").write_text("mine")
        proc = self.train("mlp", out)
        check((out / "best" / "keep.txt").is_file(), "keep.txt in best/ was deleted")
        return self.one_line_error(proc, "best/")

    def case_stale_temp(self) -> str:
        parent = self.fresh("stale_temp")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = [parent / f"dataset.tmp-{dead.pid}", parent / f"dataset.tmp-{socket.gethostname()}-{dead.pid}"]
        live = parent / f"dataset.tmp-{os.getpid()}"
        for folder in (*stale, live):
            (folder / "data").mkdir(parents=True)
        proc = self.run("vla-preprocess", "--inputs", self.raw, "--out", parent / "dataset")
        check(proc.returncode == 0, f"exit {proc.returncode}: {last_line(proc.stderr)}")
        left = [p.name for p in stale if p.exists()]
        check(not left, f"stale temporary folders of a dead process left: {left}")
        check(live.exists(), "the temporary folder of a running process was removed")
        return "temporary folders of dead processes removed, a running one's kept"

    # ------------------------------------------------------------------ 2. nothing non-finite passes silently

    def preprocess_edited(self, name: str, edit: Callable, *needles: str) -> str:
        """vla-preprocess of a fixture changed by `edit(h5py.File)`: one line naming the needles, no dataset."""
        bad = self.edited_fixture(self.fresh(name), edit)
        proc = self.run("vla-preprocess", "--inputs", bad, "--out", bad.parent / "dataset")
        check(not (bad.parent / "dataset").exists(), "a dataset was written")
        return self.one_line_error(proc, str(bad), *needles)

    def case_nan_obs(self) -> str:
        return self.preprocess_edited("nan_obs", set_value("data/demo_1/obs/robot0_eef_pos", (3, 1), float("nan")),
                                      "demo_1", "robot0_eef_pos")

    def case_inf_actions(self) -> str:
        return self.preprocess_edited("inf_actions", set_value("data/demo_0/actions", (5, 2), float("inf")),
                                      "demo_0", "actions")

    def case_lr_inf(self) -> str:
        out = self.fresh("lr_inf") / "run"
        proc = self.train("world", out, "lr=.inf")
        check(not (out / "best").exists() and not (out / "final").exists(), "best/ or final/ was saved")
        return self.one_line_error(proc, "lr")

    def case_training_diverges(self) -> str:
        out = self.fresh("diverges") / "run"
        proc = self.train("mlp", out, "lr=1e30", "max_steps=6", "eval_every=100", "save_every=100")
        check(not (out / "best").exists() and not (out / "final").exists(), "best/ or final/ was saved")
        return self.one_line_error(proc, "step")

    def nan_dataset(self) -> Path:
        """A copy of the dataset whose first validation state holds a NaN (a hand-edited or foreign Parquet file)."""
        if getattr(self, "_nan_dataset", None) is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            folder = self.fresh("nan_dataset") / "dataset"
            shutil.copytree(self.dataset, folder)
            shard = next((folder / "data").glob("validation-*.parquet"))
            table = pq.read_table(shard)
            states = table.column("state").to_pylist()
            states[0][0] = float("nan")
            column = pa.array(states, type=table.schema.field("state").type)
            pq.write_table(table.set_column(table.column_names.index("state"), "state", column), shard)
            self._nan_dataset = folder
        return self._nan_dataset

    def case_nan_in_training_data(self) -> str:
        out = self.fresh("nan_training_data") / "run"
        proc = self.train("world", out, dataset=self.nan_dataset())
        check(not (out / "best").exists(), "best/ was saved")
        return self.one_line_error(proc, "state")

    def api_call(self, folder: Path, setup: str, call: str) -> str:
        """Load `folder` with AutoModel in a fresh Python, run `setup` then `out = <call>`: refused (ValueError) or not."""
        proc = self.python(
            "import torch; from transformers import AutoModel; import modeling_vla\n"
            f"m = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n{setup}\n"
            f"try:\n    out = {call}\nexcept ValueError as e:\n    print('refused:', e)\n"
            "else:\n    out = out[0] if isinstance(out, tuple) else out\n"
            "    print('returned', 'NaN' if out.isnan().any() else 'finite', 'values')\n")
        check(proc.returncode == 0, f"exit {proc.returncode}: {last_line(proc.stderr)}")
        check(proc.stdout.startswith("refused:"), proc.stdout.strip())
        return proc.stdout.strip()

    def case_predict_nan_state(self) -> str:
        return self.api_call(self.mlp, "s = torch.zeros(2, 29); s[1, 4] = float('nan')",
                             "m.predict_actions(s, ['lift it'] * 2)")

    def case_step_nan_action(self) -> str:
        return self.api_call(self.world, "a = torch.zeros(2, 7); a[0, 6] = float('inf')",
                             "m.step(torch.zeros(2, 29), a, ['lift it'] * 2)")

    def episodes(self, out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]

    def case_dream_nan_start(self) -> str:
        out = self.fresh("dream_nan_start") / "results"
        proc = self.rollout(out, dataset=self.nan_dataset())
        check(proc.returncode == 0, f"exit {proc.returncode}: {last_line(proc.stderr)}")
        episode = self.episodes(out)[0]
        check(episode["error"] is not None, f"recorded as an ordinary episode (success {episode['success']})")
        return f"episode error: {episode['error']}"

    def nan_policy(self) -> Path:
        from safetensors.torch import load_file, save_file

        folder = self.fresh("nan_policy") / "policy"
        shutil.copytree(self.mlp, folder)
        weights = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
                   for k, v in load_file(folder / "model.safetensors").items()}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def case_nan_policy_real(self) -> str:
        out = self.fresh("nan_policy_real") / "results"
        proc = self.run("vla-rollout", "--policy", self.nan_policy(), "--env", "real", "--tasks", "lift",
                        "--episodes", "1", "--horizon", "3", "--workers", "1", "--no-progress", "--out", out)
        check(proc.returncode == 0, f"exit {proc.returncode}: {last_line(proc.stderr)}")
        episode = self.episodes(out)[0]
        check(episode["error"] is not None, f"NaN actions ran in robosuite as an ordinary episode ({episode['length']} "
                                            "steps)")
        return f"episode error: {episode['error']}"

    # ------------------------------------------------------------------ 3. resume loads no pickle

    def checkpoint_copy(self, name: str) -> tuple[Path, Path]:
        run = self.fresh(name) / "run"
        shutil.copytree(self.world_run, run)
        return run, sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[-1]))[-1]

    def pickle_cases(self) -> list[tuple[str, str, Callable[[], str]]]:
        _, newest = self.checkpoint_copy("pickle_list")
        files = sorted(p.name for p in newest.iterdir() if p.is_file())
        legacy = [] if "custom_checkpoint_0.pkl" in files else ["custom_checkpoint_0.pkl"]  # older runs' scheduler
        return [(f"3.{i}", f"crafted pickle in checkpoint file {name}{' (added)' if name in legacy else ''}, then "
                 "--resume", self.pickle_case(name)) for i, name in enumerate(files + legacy, 1)]

    def pickle_case(self, name: str) -> Callable[[], str]:
        def case() -> str:
            run, newest = self.checkpoint_copy(f"pickle_{name}")
            marker = run.parent / "PWNED"
            write_crafted_pickle(newest / name, marker)
            proc = self.run("vla-train", "--model", "world", "--config", REPO / "configs/world_model.yaml",
                            "--dataset", self.dataset, "--output-dir", run, "--resume",
                            "--set", "max_steps=3", *TINY_RUN, *TINY_WORLD)
            check(not marker.exists(), f"the pickle ran code on --resume (exit {proc.returncode})")
            if proc.returncode == 0:
                return "no code ran; " + (first_warning(proc.stderr + proc.stdout) or "resumed")
            return "no code ran; " + self.one_line_error(proc)
        return case

    # ------------------------------------------------------------------ 4. corrupt or mismatched checkpoints

    def corrupt_case(self, name: str, how: str) -> Callable[[], str]:
        def case() -> str:
            run, newest = self.checkpoint_copy(f"corrupt_{name}")
            path = newest / name
            if how == "truncate":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
            else:
                path.write_text('{"step": 2, "epoch"')
            proc = self.run("vla-train", "--model", "world", "--config", REPO / "configs/world_model.yaml",
                            "--dataset", self.dataset, "--output-dir", run, "--resume",
                            "--set", "max_steps=3", *TINY_RUN, *TINY_WORLD)
            check("Traceback" not in proc.stderr, f"traceback: {last_line(proc.stderr)}")
            if proc.returncode == 0:
                warning = first_warning(proc.stderr + proc.stdout)
                check(warning is not None and name in warning, "resumed without a warning naming the file")
                return warning
            return self.one_line_error(proc, name)
        return case

    def case_only_checkpoint_corrupt(self) -> str:
        run = self.fresh("only_checkpoint") / "run"
        shutil.copytree(self.world_run, run)
        checkpoints = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[-1]))
        for older in checkpoints[:-1]:
            shutil.rmtree(older)
        path = checkpoints[-1] / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        proc = self.run("vla-train", "--model", "world", "--config", REPO / "configs/world_model.yaml",
                        "--dataset", self.dataset, "--output-dir", run, "--resume",
                        "--set", "max_steps=3", *TINY_RUN, *TINY_WORLD)
        return self.one_line_error(proc, "model.safetensors")

    def case_mismatched_weights(self) -> str:
        folder = self.fresh("mismatched") / "world"
        shutil.copytree(self.world, folder)
        shutil.copy(self.mlp / "model.safetensors", folder / "model.safetensors")
        proc = self.rollout(self.root / "never_written", world=folder)
        return self.one_line_error(proc, str(folder))

    def case_truncated_model_folder(self) -> str:
        folder = self.fresh("truncated_model") / "world"
        shutil.copytree(self.world, folder)
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:64])
        proc = self.rollout(self.root / "never_written", world=folder)
        return self.one_line_error(proc, str(folder))

    # ------------------------------------------------------------------ 5. the Space bounds every request

    def space_cases(self) -> list[tuple[str, str, Callable[[], str]]]:
        return [
            ("5.1", "Space: a 1 MB instruction", lambda: self.space_call("x" * 1_000_000, 0, 5, needle="512")),
            ("5.2", "Space over raw HTTP: NaN start index", lambda: self.space_call("lift it", "NaN", 5)),
            ("5.3", "Space over raw HTTP: Infinity max steps", lambda: self.space_call("lift it", 0, "Infinity")),
            ("5.4", "Space over raw HTTP: a non-numeric start index", lambda: self.space_call("lift it", "abc", 5)),
            ("5.5", "Space: its figure temporary folders after requests", self.space_temp_folders),
        ]

    def start_space(self) -> None:
        if getattr(self, "space", None) is not None:
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.space_tmp = self.fresh("space_tmp")
        env = {**self.env, "TMPDIR": str(self.space_tmp), "GRADIO_TEMP_DIR": str(self.root / "gradio_cache")}
        self.space = subprocess.Popen(
            [sys.executable, str(REPO / "space_app" / "app.py"), "--world-model", str(self.world), "--policy",
             str(self.mlp), "--dataset", str(self.dataset), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "space.log", "w"))
        self.space_url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.space_url, timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise SystemExit("setup: the Space did not start (see space.log)")

    def stop_space(self) -> None:
        if getattr(self, "space", None) is not None:
            self.space.terminate()
            self.space.wait(30)
            self.space = None

    def space_request(self, instruction: str, number, horizon) -> tuple[str, str, float]:
        """POST the raw JSON (NaN / Infinity written as such) to the Space's /dream endpoint; (event, data, seconds)."""
        self.start_space()
        raw = (f'{{"data": [{json.dumps(instruction)}, "lift", "held-out episode", '
               f'{number if not isinstance(number, str) or number in ("NaN", "Infinity") else json.dumps(number)}, '
               f'{horizon}, false]}}')
        started = time.time()
        request = urllib.request.Request(f"{self.space_url}/gradio_api/call/dream", data=raw.encode(),
                                         headers={"Content-Type": "application/json"})
        event_id = json.loads(urllib.request.urlopen(request, timeout=60).read())["event_id"]
        stream = urllib.request.urlopen(f"{self.space_url}/gradio_api/call/dream/{event_id}", timeout=600).read()
        lines = stream.decode().splitlines()
        events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
        data = [line.split(":", 1)[1].strip() for line in lines if line.startswith("data:")]
        answer = next((i for i, event in enumerate(events) if event != "heartbeat"), len(events) - 1)
        return events[answer], data[answer], time.time() - started

    def space_call(self, instruction: str, number, horizon, needle: str | None = None) -> str:
        event, data, seconds = self.space_request(instruction, number, horizon)
        check(event == "error", f"answered {event} in {seconds:.0f} s")
        message = (json.loads(data) or {}).get("error")
        check(bool(message), f"error without a message: {data[:80]} ({seconds:.1f} s)")
        check(needle is None or needle in message, f"message lacks {needle!r}: {message}")
        return f"{message} ({seconds:.1f} s)"

    def space_temp_folders(self) -> str:
        for _ in range(3):
            event, data, _ = self.space_request("lift it", 0, 4)
            check(event == "complete", f"a valid request failed: {data[:200]}")
        left = [p.name for p in self.space_tmp.iterdir() if p.name.startswith("vla-space-")]
        check(not left, f"{len(left)} figure folder(s) left in the Space's TMPDIR after 3 requests: {left[:2]}")
        return "no figure folder left behind after 3 requests"

    # ------------------------------------------------------------------ 6. remaining tracebacks

    def unwritable(self, name: str) -> Path:
        """A path whose folder refuses new entries: a 0o555 folder, or /sys for root (who writes through modes)."""
        if os.geteuid() == 0:
            return Path(f"/sys/vla-probe-{name}")
        parent = self.fresh(f"read_only_{name}")
        parent.chmod(0o555)
        return parent / name

    def case_read_only_out(self) -> str:
        out = self.unwritable("dataset")
        return self.one_line_error(self.run("vla-preprocess", "--inputs", self.raw, "--out", out), str(out))

    def case_read_only_output_dir(self) -> str:
        out = self.unwritable("run")
        return self.one_line_error(self.train("mlp", out), str(out))

    def case_zero_length_episode(self) -> str:
        def edit(f):  # every array of demo_1 with no steps
            demo, arrays = f["data/demo_1"], []
            demo.visititems(lambda name, item: arrays.append(name) if hasattr(item, "shape") else None)
            for name in arrays:
                empty = demo[name][:0]
                del demo[name]
                demo.create_dataset(name, data=empty)

        return self.preprocess_edited("zero_length", edit, "demo_1")

    def case_string_actions(self) -> str:
        def edit(f):
            values = f["data/demo_0/actions"][()]
            del f["data/demo_0/actions"]
            f["data/demo_0"].create_dataset("actions", data=values.astype(str).astype("S"))

        return self.preprocess_edited("string_actions", edit, "actions")

    def case_shard_rows_zero(self) -> str:
        out = self.fresh("shard_rows") / "dataset"
        proc = self.run("vla-preprocess", "--inputs", self.raw, "--out", out, "--shard-rows", "0")
        check(not out.exists(), "a dataset was written")
        return self.one_line_error(proc, "--shard-rows")

    # ------------------------------------------------------------------ the list

    def cases(self) -> list[tuple[str, str, Callable[[], str]]]:
        return [
            ("1.1", "vla-preprocess --out = an input folder, --overwrite", self.case_out_is_input),
            ("1.2", "vla-preprocess --out = the parent of an input, --overwrite", self.case_out_is_parent),
            ("1.3", "vla-preprocess --out inside an input folder", self.case_out_inside_input),
            ("1.4", "vla-rollout --out an existing folder, no --overwrite",
             lambda: self.over_foreign_folder("rollout_existing", self.rollout, overwrite=False)),
            ("1.5", "vla-rollout --out a folder it did not write, --overwrite",
             lambda: self.over_foreign_folder("rollout_foreign", self.rollout, overwrite=True)),
            ("1.6", "vla-rollout --overwrite of its own results", self.case_rollout_own_overwrite),
            ("1.7", "vla-pool-world-models --out an existing folder, no --overwrite",
             lambda: self.over_foreign_folder("pool_existing", self.pool, overwrite=False)),
            ("1.8", "vla-pool-world-models --out a folder it did not write, --overwrite",
             lambda: self.over_foreign_folder("pool_foreign", self.pool, overwrite=True)),
            ("1.9", "vla-export --out a folder it did not write, --overwrite",
             lambda: self.over_foreign_folder("export_foreign", self.export, overwrite=True)),
            ("1.10", "two vla-preprocess runs to one --out at once", self.case_concurrent_preprocess),
            ("1.11", "a folder appears at --out while vla-preprocess writes", self.case_folder_appears_during_run),
            ("1.12", "<out>.tmp-<pid> left by a killed vla-preprocess", self.case_stale_temp),
            ("1.13", "vla-train --output-dir holding a best/ it did not write", self.case_train_foreign_best),
            ("2.1", "NaN in an HDF5 observation", self.case_nan_obs),
            ("2.2", "inf in HDF5 actions", self.case_inf_actions),
            ("2.3", "vla-train --set lr=.inf", self.case_lr_inf),
            ("2.4", "training diverges (--set lr=1e30)", self.case_training_diverges),
            ("2.5", "NaN in a dataset's Parquet rows, vla-train", self.case_nan_in_training_data),
            ("2.6", "predict_actions with a NaN state", self.case_predict_nan_state),
            ("2.7", "WorldModel.step with an inf action", self.case_step_nan_action),
            ("2.8", "vla-rollout: a dream from a NaN start", self.case_dream_nan_start),
            ("2.9", "vla-rollout --env real: a policy that emits NaN actions", self.case_nan_policy_real),
            *self.pickle_cases(),
            ("4.1", "--resume, newest checkpoint's model.safetensors truncated",
             self.corrupt_case("model.safetensors", "truncate")),
            ("4.2", "--resume, newest checkpoint's optimizer.bin truncated", self.corrupt_case("optimizer.bin", "truncate")),
            ("4.3", "--resume, newest checkpoint's trainer_state.json broken",
             self.corrupt_case("trainer_state.json", "break")),
            ("4.4", "--resume, the only checkpoint truncated", self.case_only_checkpoint_corrupt),
            ("4.5", "vla-rollout --world-model a folder holding MLP weights", self.case_mismatched_weights),
            ("4.6", "vla-rollout --world-model a folder with truncated weights", self.case_truncated_model_folder),
            *self.space_cases(),
            ("6.1", "vla-preprocess --out in a read-only folder", self.case_read_only_out),
            ("6.2", "vla-train --output-dir in a read-only folder", self.case_read_only_output_dir),
            ("6.3", "a zero-length episode", self.case_zero_length_episode),
            ("6.4", "actions stored as strings in HDF5", self.case_string_actions),
            ("6.5", "vla-preprocess --shard-rows 0", self.case_shard_rows_zero),
        ]


def set_value(key: str, index: tuple, value: float) -> Callable:
    """An HDF5 edit: one number of the array at `key` set to `value`."""
    def edit(f) -> None:
        values = f[key][()]
        values[index] = value
        f[key][...] = values

    return edit


def write_crafted_pickle(path: Path, marker: Path) -> None:
    """A pickle whose unpickling creates `marker` (what a crafted checkpoint would do), in torch.save's zip format."""
    import torch

    class Crafted:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state": Crafted()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def first_warning(text: str) -> str | None:
    return next((line for line in text.splitlines() if line.startswith("warning:")), None)


def markdown(results: list[Result], seconds: float) -> str:
    handled = sum(r.handled for r in results)
    lines = [f"{handled} of {len(results)} cases handled ({seconds / 60:.1f} min, "
             f"{datetime.now(UTC).date().isoformat()}, {os.cpu_count()} CPU cores).", "",
             "| case | tried | handled | what happened |", "| --- | --- | --- | --- |"]
    for r in results:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.case} | {r.what} | {'yes' if r.handled else '**no**'} | {detail[:160]} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reliability_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the tiny data, models and outputs go (default: a temp dir)")
    parser.add_argument("--only", nargs="+", default=[], help="run only cases whose number starts with one of these")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="vla-reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    probe = Probe(root.resolve())
    started = time.time()
    print(f"workdir {root}: building tiny data and models", flush=True)
    probe.setup()
    results = []
    try:
        for number, what, case in probe.cases():
            if args.only and not any(number.startswith(prefix) for prefix in args.only):
                continue
            try:
                detail, handled = case(), True
            except Fail as fail:
                detail, handled = str(fail), False
            except Exception as err:  # noqa: BLE001 - the probe reports every case, even one it cannot run
                detail, handled = f"probe could not run the case: {type(err).__name__}: {err}", False
            results.append(Result(number, what, handled, detail))
            print(f"{number:>5} {'handled' if handled else 'NOT HANDLED':<12} {what}: {detail[:150]}", flush=True)
    finally:
        probe.stop_space()
    table = markdown(results, time.time() - started)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
