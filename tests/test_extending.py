"""Extending the project without editing it: a toy task and a toy policy kind, registered by a plugin module
(`VLA_PLUGINS`), go through the public command lines in a fresh process: generate -> preprocess -> train -> dream and
real roll-out -> export -> reload by repo id. No file of the project is edited and nothing is monkeypatched.

The toy task is Lift with its own instructions and success rule (the cube 1 cm up instead of 4 cm: both the rule on a
state and the one in the live simulator); the toy policy is one linear layer from the state to an action chunk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from data_prep.tasks import STATE_SLICES

REPO = Path(__file__).resolve().parent.parent
OBJECT_Z = STATE_SLICES["object pos"].start + 2

TOY_MODEL = '''
"""A toy policy kind: one linear layer from the state to an action chunk. Its own module: save_pretrained copies it."""

from torch import nn
from transformers import PreTrainedModel

from configuration_vla import RobotModelConfig
from modeling_vla import ChunkPolicyMixin


class ToyConfig(RobotModelConfig):
    model_type = "toy_linear_policy"
    chunk_size: int = 4
    loss: str = "l1"
    relative_yaw_harmonics: list[int] | None = None
    relative_yaw_sawtooth: bool = False


class ToyPolicy(ChunkPolicyMixin, PreTrainedModel):
    config_class = ToyConfig
    main_input_name = "state"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(self.input_dim, config.chunk_size * config.action_dim)
        self.post_init()

    def state_input_layers(self):
        return [(self.linear, 0)]

    def predict_normalized(self, state, instruction):
        return self.linear(state).view(len(state), self.config.chunk_size, self.config.action_dim)
'''

TOY_PLUGIN = '''
"""Registers the toy task "nudge" and the toy policy kind "toy"."""

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq

from data_prep.tasks import STATE_SLICES

import numpy as np

from data_prep.tasks import Instructions, SuccessRule, get_task, register_task
from model_kinds import ModelKind, register_kind
from toy_model import ToyConfig, ToyPolicy

RAISED = 0.83  # m: the cube's centre 1 cm above where it rests on the table

register_task(dataclasses.replace(
    get_task("lift"), name="nudge", robomimic_name=None, play_perturb_prob=0.0,
    instructions=Instructions("Nudge the red cube up", train=("Nudge the red cube up", "Raise the red cube a bit"),
                              validation=("Lift the red block slightly",)),
    success_rule=SuccessRule(low=(-np.inf, -np.inf, RAISED), high=(np.inf, np.inf, np.inf)),
    sim_success=lambda env: bool(env.sim.data.body_xpos[env.cube_body_id][2] > RAISED),
))
register_kind(ModelKind("toy", ToyConfig, ToyPolicy, role="policy", config=str(Path(__file__).with_name("toy.yaml")),
                        repo_name="toy-policy", label="toy", title="Toy"))
'''

TRAIN_YAML = """
model: {model}
model_config: {model_config}
batch_size: 16
lr: 1.0e-3
warmup_steps: 0
max_steps: 6
eval_every: 3
save_every: 6
log_every: 3
"""
WORLD = {"hidden_dim": 16, "token_mlp_dim": 4, "channel_mlp_dim": 16, "num_layers": 1, "num_ensemble": 2,
         "multi_step": 2}

PIPELINE = '''
import sys
from data_prep.generate import main as generate
from data_prep.preprocess import main as preprocess
from evaluation.cli import main as rollout
from hub_cards.export import main as export
from train_accelerate import main as train

generate(["demos", "--tasks", "nudge", "--episodes", "4", "--out", "raw", "--workers", "1", "--horizon", "100",
          "--steps-after-success", "2", "--no-progress"])
preprocess(["--inputs", "raw", "--out", "data"])
train(["--model", "world", "--config", "world.yaml", "--dataset", "data", "--output-dir", "world"])
train(["--model", "toy", "--config", "toy.yaml", "--dataset", "data", "--output-dir", "toy"])
rollout(["--policy", "toy/best", "--world-model", "world/best", "--tasks", "nudge", "--episodes", "2", "--env", "both",
         "--horizon", "15", "--workers", "1", "--out", "eval", "--name", "toy", "--no-progress"])
export(["--model-dir", "toy/best", "--repo-id", "local/toy-policy", "--out", "export",
        "--card-results", "toy/train_summary.json", "eval/summary.json"])
'''

RELOAD = '''
import torch
from safetensors.torch import load_file
from transformers import AutoModel

model = AutoModel.from_pretrained("local/toy-policy", trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__  # the saved code
saved = load_file("toy/best/model.safetensors")
assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
print("RELOADED", type(model).__name__, tuple(model.predict_actions(torch.zeros(3, 83), "Nudge the red cube up").shape))
'''


def run(code: str, folder: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_a_plugin_task_and_policy_kind_go_from_data_to_an_exported_model(tmp_path: Path) -> None:
    (tmp_path / "toy_model.py").write_text(TOY_MODEL)
    (tmp_path / "toy_plugin.py").write_text(TOY_PLUGIN)
    (tmp_path / "world.yaml").write_text(TRAIN_YAML.format(model="world", model_config=json.dumps(WORLD)))
    (tmp_path / "toy.yaml").write_text(TRAIN_YAML.format(model="toy", model_config=json.dumps({"chunk_size": 4})))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(tmp_path), VLA_PLUGINS="toy_plugin", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    run(PIPELINE, tmp_path, env)

    rows = json.loads((tmp_path / "eval" / "summary.json").read_text())["results"]
    assert {(r["policy"], r["task"], r["env"], r["episodes"]) for r in rows} == {
        ("toy", "nudge", "real", 2), ("toy", "nudge", "dream", 2)}
    instructions = json.loads((tmp_path / "data" / "instructions.json").read_text())
    assert instructions["nudge"]["canonical"] == "Nudge the red cube up"
    rows = pq.read_table(next((tmp_path / "data" / "data").glob("train-*.parquet"))).to_pydict()
    assert set(rows["task"]) == {"nudge"} and set(rows["instruction"]) <= set(instructions["nudge"]["train"])
    # success is the toy rule in the simulator (cube 1 cm up), not Lift's (4 cm): an episode succeeds below 4 cm
    first = {}
    for episode, success, state in zip(rows["episode"], rows["success"], rows["next_state"], strict=True):
        if success and episode not in first:
            first[episode] = state[OBJECT_Z]
    assert first and all(z > 0.83 for z in first.values()) and min(first.values()) < 0.84
    card = (tmp_path / "export" / "README.md").read_text()
    assert "ToyPolicy" in card and "toy_linear_policy" in card
    assert {"toy_model.py", "config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert "RELOADED ToyPolicy (3, 4, 7)" in run(RELOAD, tmp_path, env)
