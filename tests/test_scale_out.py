"""Scale-out files without GPUs: accelerate configs, SLURM scripts, and the GPU benchmark's CPU mode.

* Every configs/accelerate/*.yaml goes through `accelerate launch`'s own config loading and validation with the
  launcher replaced by a recorder, then through the environment it would hand to the ranks, and (FSDP,
  DeepSpeed) the plugin accelerate builds from that environment.
* Every scripts/*.slurm runs under bash with fake `srun`/`scontrol`/`accelerate`/CLIs on PATH; the argument
  lists they receive are parsed by the real parsers (accelerate, the trainer, vla-rollout, vla-generate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
SCRIPTS = REPO / "scripts"


# ----------------------------------------------------------------------------- accelerate configs


def dry_launch(argv: list[str]) -> tuple[str, object, dict[str, str]]:
    """Run `accelerate launch argv` up to the point where processes would start.

    Returns the launcher accelerate chose ("simple", "multi_gpu" or "deepspeed"), its parsed arguments and the
    environment every rank would get.
    """
    import accelerate.commands.launch as launch
    from accelerate.utils import launch as launch_utils

    chosen: dict[str, object] = {}

    def recorder(name: str):
        return lambda args: chosen.update(name=name, args=args)

    args = launch.launch_command_parser().parse_args(argv)
    with (
        mock.patch.object(launch, "simple_launcher", recorder("simple")),
        mock.patch.object(launch, "multi_gpu_launcher", recorder("multi_gpu")),
        mock.patch.object(launch, "deepspeed_launcher", recorder("deepspeed")),
    ):
        launch.launch_command(args)
    name, args = chosen["name"], chosen["args"]
    if name == "simple":
        _, env = launch_utils.prepare_simple_launcher_cmd_env(args)
    elif name == "multi_gpu":
        env = launch_utils.prepare_multi_gpu_env(args)
    else:
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
    return name, args, env


# file -> (launcher, distributed_type, processes, mixed precision of the ranks' environment)
EXPECTED = {
    "single_gpu_bf16.yaml": ("simple", "NO", 1, "bf16"),
    "single_gpu_fp16.yaml": ("simple", "NO", 1, "fp16"),
    "multi_gpu_ddp_bf16.yaml": ("multi_gpu", "MULTI_GPU", 8, "bf16"),
    "fsdp_llama_bf16.yaml": ("multi_gpu", "FSDP", 8, "bf16"),
    # DeepSpeed takes its precision from the JSON (bf16.enabled); accelerate's own setting must stay unset.
    "deepspeed_zero2.yaml": ("deepspeed", "DEEPSPEED", 8, "no"),
    "deepspeed_zero3.yaml": ("deepspeed", "DEEPSPEED", 8, "no"),
    "cpu_2proc.yaml": ("multi_gpu", "MULTI_GPU", 2, "no"),
}


def test_every_accelerate_config_is_checked() -> None:
    assert sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads_and_launches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)  # the DeepSpeed JSON paths are relative to the launch directory
    path = ACCELERATE_CONFIGS / name
    launcher, distributed_type, processes, precision = EXPECTED[name]
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == processes

    # Nested keys are copied onto the launch arguments without a check: a typo would be silently ignored.
    import accelerate.commands.launch as launch

    known = {action.dest for action in launch.launch_command_parser()._actions}
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, f"{name}: unknown fsdp_config key {key}"
    for key in config.deepspeed_config:
        assert key in known, f"{name}: unknown deepspeed_config key {key}"

    chosen, args, env = dry_launch(["--config_file", str(path), "train_accelerate.py", "--model", "world"])
    assert chosen == launcher
    assert args.num_processes == processes
    assert env["ACCELERATE_MIXED_PRECISION"] == precision


def test_fsdp_config_builds_the_llama_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, _, env = dry_launch(["--config_file", str(ACCELERATE_CONFIGS / "fsdp_llama_bf16.yaml"), "train_accelerate.py"])
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.activation_checkpointing is False  # the model config does it
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_build_their_plugin(stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)
    _, args, env = dry_launch(["--config_file", str(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml"), "train_accelerate.py"])
    assert args.deepspeed_multinode_launcher == "standard"  # torchrun on each node, what srun starts
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()  # raises if the YAML sets fields the JSON owns
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["bf16"] == {"enabled": True}
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    assert plugin.zero3_init_flag is (stage == 3)


def test_command_line_turns_the_ddp_config_multi_node() -> None:
    """What scripts/slurm_accelerate.sh passes on node 2 of 4 becomes torchrun's rendezvous."""
    _, args, env = dry_launch([
        "--config_file", str(ACCELERATE_CONFIGS / "multi_gpu_ddp_bf16.yaml"),
        "--num_machines", "4", "--num_processes", "32", "--machine_rank", "2",
        "--main_process_ip", "node01", "--main_process_port", "29555", "--rdzv_backend", "static", "--same_network",
        "train_accelerate.py",
    ])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 2)
    assert (args.master_addr, args.master_port, args.rdzv_backend) == ("node01", "29555", "static")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


# ----------------------------------------------------------------------------- SLURM scripts


SLURM_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.slurm"))


@pytest.mark.parametrize("name", [*SLURM_SCRIPTS, "slurm_env.sh", "slurm_accelerate.sh"])
def test_script_syntax(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_scripts_request_requeue() -> None:
    for name in SLURM_SCRIPTS:
        text = (SCRIPTS / name).read_text()
        assert "#SBATCH --requeue" in text, name
        assert "HF_HUB_OFFLINE=1" in (SCRIPTS / "slurm_env.sh").read_text()
        assert "source " in text and "slurm_env.sh" in text, f"{name} must source scripts/slurm_env.sh"


RECORDER = """#!{python}
import json, os, sys, time
from pathlib import Path
record = Path(os.environ["FAKE_RECORD_DIR"])
name = Path(sys.argv[0]).name
tag = os.environ.get("SLURM_NODEID", "x")
(record / f"{{name}}-{{tag}}.json").write_text(json.dumps(sys.argv[1:]))
# Stand-in for a long training: runs until `scontrol requeue` (also fake) releases it, at most 60 s.
if os.environ.get("FAKE_BLOCK") and name == "accelerate":
    deadline = time.time() + 60
    while not (record / "released").exists() and time.time() < deadline:
        time.sleep(0.05)
"""

FAKE_SRUN = """#!/usr/bin/env bash
# One task per node, in turn, with that node's SLURM_NODEID (srun's options are ignored).
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@"; done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
    show) printf 'gpu-node-a\\ngpu-node-b\\n' ;;
    requeue) echo "$2" > "$FAKE_RECORD_DIR/requeued"; touch "$FAKE_RECORD_DIR/released" ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """An environment where scripts/*.slurm run as on 2 nodes x 8 GPUs, with every external command faked."""
    venv_bin = tmp_path / "venv" / "bin"
    record = tmp_path / "record"
    venv_bin.mkdir(parents=True)
    record.mkdir()
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    fakes = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}
    fakes.update({name: RECORDER.format(python=sys.executable) for name in ("accelerate", "vla-generate", "vla-rollout")})
    for name, text in fakes.items():
        (venv_bin / name).write_text(text)
        (venv_bin / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "HF_"))}
    env.update(
        REPO_DIR=str(REPO), VENV=str(tmp_path / "venv"), FAKE_RECORD_DIR=str(record), HOME=str(tmp_path),
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="16",
    )
    return env


def recorded(env: dict[str, str], name: str) -> list[str]:
    return json.loads((Path(env["FAKE_RECORD_DIR"]) / f"{name}.json").read_text())


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def split_accelerate_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`accelerate` argv -> (launch options, trainer argv after the script)."""
    assert argv[0] == "launch"
    script = argv.index("train_accelerate.py")
    return argv[1:script], argv[script + 1 :]


@pytest.mark.parametrize(("script", "model", "config"), [
    ("run_train.slurm", "world", "configs/world_model.yaml"),
    ("run_vla.slurm", "policy", "configs/vla_llama3_8b_lora.yaml"),
])
def test_training_scripts_launch_one_accelerate_per_node(script: str, model: str, config: str, fake_slurm) -> None:
    import train_accelerate

    run_script(script, fake_slurm, "max_steps=7")
    for node in (0, 1):
        launch_options, trainer_argv = split_accelerate_argv(recorded(fake_slurm, f"accelerate-{node}"))
        # accelerate accepts the whole command line with the script's config on this node
        _, args, env = dry_launch([*launch_options, "train_accelerate.py", *trainer_argv])
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, node)
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", node)
        assert args.master_addr == "gpu-node-a"  # first host of the job
        assert args.master_port == str(20000 + 4242)  # from the job id: the same after a requeue

        parsed = train_accelerate.parse_args(trainer_argv, None)
        assert parsed.model == model and parsed.resume and parsed.config == config
        cfg = train_accelerate.load_config(REPO / parsed.config, parsed.set, model=parsed.model)
        assert cfg.max_steps == 7  # extra script arguments reach the trainer as overrides
        # bf16 on GPUs: from the accelerate config unless the training YAML pins it (it must then agree)
        assert cfg.mixed_precision in (None, "bf16")
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_training_script_without_overrides_passes_no_set(fake_slurm) -> None:
    import train_accelerate

    run_script("run_train.slurm", fake_slurm)
    _, trainer_argv = split_accelerate_argv(recorded(fake_slurm, "accelerate-0"))
    assert "--set" not in trainer_argv
    assert train_accelerate.parse_args(trainer_argv, None).set == []


def test_training_script_requeues_itself_before_the_time_limit(fake_slurm) -> None:
    env = {**fake_slurm, "FAKE_BLOCK": "1"}
    record = Path(env["FAKE_RECORD_DIR"])
    job = subprocess.Popen(["bash", str(SCRIPTS / "run_train.slurm")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (record / "accelerate-0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (record / "accelerate-0.json").exists(), "the job never reached accelerate launch"
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends
        output, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    assert (record / "requeued").read_text().strip() == "4242", output
    assert job.returncode == 0, output


def test_demo_generation_array_covers_tasks_and_disjoint_seeds(fake_slurm) -> None:
    seen = {}
    for index in range(30):
        env = {**fake_slurm, "SLURM_ARRAY_TASK_ID": str(index)}
        run_script("gen_demos_array.slurm", env)
        argv = recorded(env, "vla-generate-x")
        flags = flag_values(argv)
        seen[index] = (flags["--tasks"], int(flags["--seed"]), int(flags["--max-attempts"]), flags["--out"])
        assert flags["--workers"] == "16" and flags["--episodes"] == "20"
    tasks = [task for task, *_ in seen.values()]
    assert tasks == ["lift"] * 10 + ["can"] * 10 + ["square"] * 10
    assert len({out for *_, out in seen.values()}) == 30  # no two elements write the same folder
    for task in ("lift", "can", "square"):
        # attempt i uses seed + i: the seed ranges [seed, seed + max_attempts) of one task never overlap
        ranges = sorted((seed, seed + attempts) for t, seed, attempts, _ in seen.values() if t == task)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:], strict=False))
    from data_prep.generate import parse_args

    assert parse_args(argv).mode == "demos"  # vla-generate's own parser accepts the command


def test_rollout_array_runs_one_task_chunk_per_element(fake_slurm) -> None:
    from data_prep.tasks import task_names
    from evaluation.cli import parse_args

    env = {**fake_slurm, "CHUNKS_PER_TASK": "2", "EPISODES_PER_CHUNK": "5"}
    plays = []
    for index in range(6):
        run_script("run_vla_rollout.slurm", {**env, "SLURM_ARRAY_TASK_ID": str(index)})
        args = parse_args(recorded(env, "vla-rollout-x"))  # vla-rollout's own parser accepts the command
        assert len(args.tasks) == 1 and args.tasks[0] in task_names()
        assert args.device == "cuda" and args.env == "both"
        plays.append((args.tasks[0], args.seed, args.episodes, str(args.out)))
    assert [p[:3] for p in plays] == [(t, s, 5) for t in ("lift", "can", "square") for s in (0, 5)]
    assert len({p[3] for p in plays}) == 6


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (None for a flag followed by another flag)."""
    values: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            following = argv[i + 1] if i + 1 < len(argv) else None
            values[token] = None if following is None or following.startswith("--") else following
    return values


# ----------------------------------------------------------------------------- GPU benchmark, CPU mode


@pytest.fixture
def gpu_reference(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/gpu_reference.py as a module, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks import gpu_reference

    return gpu_reference


def test_gpu_reference_runs_tiny_on_cpu(tmp_path: Path, gpu_reference) -> None:
    out = tmp_path / "tiny.json"
    payload = gpu_reference.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    results = payload["results"]
    assert payload["settings"]["model_config"]["lora_r"] == 32  # the reference YAML's LoRA rank
    assert 0 < results["params_trainable"] < results["params_total"]
    for key in ("train_samples_per_s", "train_tokens_per_s", "latency_ms_median", "imagined_steps_per_s"):
        assert results[key] > 0, key
    assert results["train_tokens_per_s"] == pytest.approx(results["train_samples_per_s"] * results["tokens_per_sample"])
    assert results["train_peak_gpu_gib"] is None  # no GPU numbers are invented on CPU


def test_gpu_reference_reads_the_trainer_yaml_and_tiny_bert(tmp_path: Path, gpu_reference) -> None:
    reference = gpu_reference.Settings()
    reference.apply_trainer_yaml(REPO / "configs" / "vla_llama3_8b_lora.yaml")
    assert (reference.batch_size, reference.micro_batch, reference.mixed_precision) == (128, 128, "bf16")
    assert reference.model_config["gradient_checkpointing"] is True
    minilm = gpu_reference.Settings()
    minilm.apply_trainer_yaml(REPO / "configs" / "vla_minilm_cpu.yaml")
    assert (minilm.batch_size, minilm.micro_batch, minilm.mixed_precision) == (256, 256, None)

    # the MiniLM (BERT) path, without checkpointing, the largest micro-batch that fits
    payload = gpu_reference.main(["--tiny", "--backbone", "minilm", "--micro-batch", "auto",
                                  "--gradient-checkpointing", "off", "--out", str(tmp_path / "bert.json")])
    assert payload["settings"]["backbone"]["model_type"] == "bert"
    assert payload["settings"]["model_config"]["gradient_checkpointing"] is False
    assert (payload["results"]["micro_batch"], payload["results"]["grad_accumulation"]) == (8, 1)


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch", "3"], "--micro-batch 3: expected 'auto' or a power of two"),
    (["--batch-size", "8", "--micro-batch", "16"], "micro-batch 16 does not divide the batch 8"),
    (["--memory-cap-gib", "0"], "--memory-cap-gib 0.0: expected a positive number of GiB"),
])
def test_gpu_reference_rejects_bad_batch_flags(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_reference.py"), "--tiny", *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_dream_throughput_runs_on_cpu_and_restores_the_pass_size(tmp_path: Path) -> None:
    import modeling_vla
    from benchmarks import dream_throughput

    before = dict(modeling_vla.STEP_CHUNK_ROWS)
    rows = dream_throughput.main(["--device", "cpu", "--dreams", "6", "--chunks", "4", "64", "--steps", "1",
                                  "--out", str(tmp_path / "dreams.json")])
    assert [(r["dreams"], r["rows_per_pass"]) for r in rows] == [(6, 4), (6, 64)]
    assert all(r["imagined_steps_per_s"] > 0 and r["peak_gpu_gib"] is None for r in rows)
    assert json.loads((tmp_path / "dreams.json").read_text())["rows"] == rows
    assert modeling_vla.STEP_CHUNK_ROWS == before


def test_gpu_reference_refuses_the_full_size_without_a_gpu() -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_reference.py"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
