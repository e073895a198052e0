"""World model, VLA policy and MLP baseline: learning, invariants, saving/loading, errors.

Tiny configs and synthetic batches; the VLA uses a random 2-layer Llama (plus one MiniLM smoke test).
Round trips load the saved folder in a fresh process through `AutoModel.from_pretrained(trust_remote_code=True)`.
"""

from __future__ import annotations

import math
import os
import subprocess
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import python_without_the_project
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

import modeling_vla
from configuration_vla import MINILM_NAME, MLPPolicyConfig, VLAConfig, WorldModelConfig
from modeling_vla import (
    EEF_POS_OFFSET,
    EEF_ROT6_OFFSET,
    OBJECT_POS_OFFSET,
    OBJECT_ROT6_OFFSET,
    RELATIVE_POS_OFFSET,
    RELATIVE_ROT6_OFFSET,
    MLPPolicy,
    VLAPolicy,
    WorldModel,
    resolve_pretrained_path,
)

torch.set_num_threads(1)  # bit-identical comparisons with the fresh process need the same kernel split

STATE_DIM, ACTION_DIM = 83, 7  # the project's state layout (data_prep.tasks), without importing it
ONE_OBJECT = 29  # the dims a one-object task fills: the robot and object slot 0 (synthetic data keeps the rest 0)
INSTRUCTIONS = ["Lift the red cube", "Pick up the coke can"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def synthetic_batch(batch: int = 16, horizon: int = 4, seed: int = 0) -> dict:
    """Linear dynamics s' = s + 0.1 * a @ M on a one-object state, success when eef x > 0; the second half has 4
    more padding dims."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(ACTION_DIM, STATE_DIM, generator=gen)
    state_mask = torch.zeros(batch, STATE_DIM)
    state_mask[:, :ONE_OBJECT] = 1.0
    state_mask[batch // 2 :, ONE_OBJECT - 4 : ONE_OBJECT] = 0.0
    state = torch.randn(batch, STATE_DIM, generator=gen) * state_mask
    actions = torch.rand(batch, horizon, ACTION_DIM, generator=gen) * 2 - 1
    states, current = [], state
    for h in range(horizon):
        current = (current + 0.1 * actions[:, h] @ mix) * state_mask
        states.append(current)
    next_states = torch.stack(states, 1)
    step_mask = torch.ones(batch, horizon)
    step_mask[0, -1] = 0.0  # one episode ends inside the window
    return {
        "instruction": [INSTRUCTIONS[i % 2] for i in range(batch)],
        "task": [("lift", "can")[i % 2] for i in range(batch)],
        "state": state,
        "state_mask": state_mask,
        "actions": actions,
        "next_states": next_states,
        "step_mask": step_mask,
        "success": (next_states[..., 0] > 0).float(),
        "done": torch.zeros(batch, horizon),
    }


def train_losses(model: torch.nn.Module, batch: dict, steps: int = 30, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    torch.set_num_threads(1)
    folder, inputs_path, outputs_path = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = load_file(inputs_path)
    instruction = open(inputs_path + ".txt").read().split("\\n")
    if "action" in inputs:
        outputs = model.step(inputs["state"], inputs["action"], instruction, prev_state=inputs.get("prev_state"))
        outputs = dict(zip(("mean", "std", "p_success", "p_done"), outputs, strict=True))
    else:
        outputs = {"actions": model.predict_actions(inputs["state"], instruction, prev_state=inputs.get("prev_state"))}
    save_file({k: v.contiguous() for k, v in outputs.items()}, outputs_path)
    """
)


def outputs_in_fresh_process(folder: Path, inputs: dict, instruction: list[str], tmp_path: Path) -> dict:
    """Load `folder` with AutoModel(trust_remote_code) in a new interpreter without the project; run it on `inputs`."""
    inputs_path, outputs_path = tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    save_file(inputs, inputs_path)
    Path(f"{inputs_path}.txt").write_text("\n".join(instruction))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(  # the project is not importable there: the folder's own code must do
        [*python_without_the_project(FRESH_PROCESS_SCRIPT), str(folder), str(inputs_path), str(outputs_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(outputs_path)


def tiny_world_config(**overrides) -> WorldModelConfig:
    fields = dict(hidden_dim=32, token_mlp_dim=8, channel_mlp_dim=64, num_layers=2, num_ensemble=3, multi_step=4)
    return WorldModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama saved like a Hub checkpoint, with the MiniLM (WordPiece) tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_path(MINILM_NAME))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vla_config(backbone: Path, **overrides) -> VLAConfig:
    fields = dict(
        backbone=str(backbone), lora_r=4, lora_alpha=8.0, lora_dropout=0.0, gradient_checkpointing=True,
        chunk_size=4, state_hidden_dim=32, head_hidden_dim=32, tasks=["lift", "can"],
    )
    return VLAConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "overrides", "field"),
    [
        (WorldModelConfig, {"hidden_dim": 0}, "hidden_dim"),
        (WorldModelConfig, {"num_ensemble": 0}, "num_ensemble"),
        (WorldModelConfig, {"state_dim": -3}, "state_dim"),
        (WorldModelConfig, {"state_mean": [0.0] * 5}, "state_mean"),
        (WorldModelConfig, {"state_std": [1.0] * 22}, "state_std"),
        (WorldModelConfig, {"state_token_groups": [3, 4]}, "state_token_groups"),
        (WorldModelConfig, {"dropout": 1.5}, "dropout"),
        (WorldModelConfig, {"velocity_scale": [1.0] * 3}, "velocity_scale"),
        (WorldModelConfig, {"velocity_input": "yes"}, "velocity_input"),
        (WorldModelConfig, {"architecture": "mlp", "token_readout": True}, "token_readout"),
        (WorldModelConfig, {"scale_change": "yes"}, "scale_change"),
        (WorldModelConfig, {"input_noise": -0.1}, "input_noise"),
        (WorldModelConfig, {"loss_units": "std"}, "loss_units"),
        (WorldModelConfig, {"derive_relative_pose": 1}, "derive_relative_pose"),
        (WorldModelConfig, {"derive_relative_pose": True, "state_layout": "other"}, "derive_relative_pose"),
        (WorldModelConfig, {"relative_pose_frames": {"lift": "cube"}}, "relative_pose_frames"),
        (WorldModelConfig, {"relative_pose_frames": ["lift"]}, "relative_pose_frames"),
        (VLAConfig, {"loss": "huber"}, "loss"),
        (VLAConfig, {"chunk_size": 0}, "chunk_size"),
        (VLAConfig, {"head_num_layers": 0}, "head_num_layers"),
        (MLPPolicyConfig, {"action_mean": [0.0] * 6}, "action_mean"),
        (MLPPolicyConfig, {"velocity_input": 1}, "velocity_input"),
        (VLAConfig, {"velocity_scale": [1.0] * 28}, "velocity_scale"),
        (VLAConfig, {"relative_yaw_harmonics": [4, 4]}, "relative_yaw_harmonics"),
        (MLPPolicyConfig, {"relative_yaw_harmonics": [0, 2]}, "relative_yaw_harmonics"),
        (MLPPolicyConfig, {"relative_yaw_harmonics": "4"}, "relative_yaw_harmonics"),
        (MLPPolicyConfig, {"relative_yaw_harmonics": [4], "state_layout": "other"}, "relative_yaw_harmonics"),
        (VLAConfig, {"relative_yaw_sawtooth": True}, "relative_yaw_sawtooth"),  # needs harmonics to wrap
        (MLPPolicyConfig, {"relative_yaw_harmonics": [4], "relative_yaw_sawtooth": 1}, "relative_yaw_sawtooth"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(config_class, overrides, field):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field}: expected"):
        config_class(**overrides)


def test_set_normalization_checks_layout():
    config = MLPPolicyConfig()
    stats = {
        "state_layout": config.state_layout,
        "state": {"mean": [1.0] * STATE_DIM, "std": [2.0] * STATE_DIM},
        "action": {"mean": [0.0] * ACTION_DIM, "std": [0.5] * ACTION_DIM},
    }
    config.set_normalization(stats)
    assert config.state_std == [2.0] * STATE_DIM and config.action_std == [0.5] * ACTION_DIM
    with pytest.raises(ValueError, match="state_layout"):
        config.set_normalization({**stats, "state_layout": "something-else"})


# ---------------------------------------------------------------------------------------------
# world model
# ---------------------------------------------------------------------------------------------


def test_world_model_loss_drops_on_synthetic_dynamics():
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config())
    losses = train_losses(model, synthetic_batch())
    assert losses[-1] < 0.5 * losses[0], losses
    out = model(**synthetic_batch())
    assert {"one_step_mse", "multi_step_mse", "success_bce", "done_bce", "ensemble_std"} <= set(out.metrics)


def moving_batch(batch: int = 64, seed: int = 0) -> dict:
    """Constant-velocity motion s' = s + u + 0.1 a @ M: s_t alone cannot tell where the state goes next."""
    one_object = (torch.arange(STATE_DIM) < ONE_OBJECT).float()
    mix = torch.randn(ACTION_DIM, STATE_DIM, generator=torch.Generator().manual_seed(0)) * one_object  # same dynamics
    gen = torch.Generator().manual_seed(seed)
    prev = torch.randn(batch, STATE_DIM, generator=gen) * one_object
    velocity = 0.3 * torch.randn(batch, STATE_DIM, generator=gen) * one_object
    state = prev + velocity
    actions = torch.rand(batch, 2, ACTION_DIM, generator=gen) * 2 - 1
    first = state + velocity + 0.1 * actions[:, 0] @ mix
    second = first + velocity + 0.1 * actions[:, 1] @ mix
    return {
        "instruction": [INSTRUCTIONS[0]] * batch,
        "state": state,
        "prev_state": prev,
        "actions": actions,
        "next_states": torch.stack([first, second], 1),
        "step_mask": torch.ones(batch, 2),
    }


@pytest.mark.parametrize(("architecture", "token_readout"), [("mixer", False), ("mixer", True), ("mlp", False)])
def test_world_model_velocity_input_predicts_motion_the_state_alone_cannot(architecture, token_readout):
    batch = moving_batch(512)  # enough motions that memorising them is not an option
    scores = {}
    for velocity_input in (False, True):
        torch.manual_seed(0)
        model = WorldModel(tiny_world_config(architecture=architecture, velocity_input=velocity_input,
                                             token_readout=token_readout))
        train_losses(model, batch, steps=60, lr=1e-2)
        scores[velocity_input] = model(**moving_batch(512, seed=1)).metrics["one_step_mse"]  # unseen motions
    assert scores[True] < 0.5 * scores[False], scores


def test_world_model_scale_change_outputs_the_change_in_units_of_velocity_scale():
    torch.manual_seed(0)
    scale = [0.01 * (i + 1) for i in range(STATE_DIM)]
    plain = WorldModel(tiny_world_config(velocity_scale=scale)).eval()
    scaled = WorldModel(tiny_world_config(velocity_scale=scale, scale_change=True)).eval()
    scaled.load_state_dict(plain.state_dict())  # the same network: only the meaning of its output differs
    state, action = torch.randn(6, STATE_DIM), torch.rand(6, ACTION_DIM)
    base = plain.step(state, action, INSTRUCTIONS[0])[0] - state
    torch.testing.assert_close(scaled.step(state, action, INSTRUCTIONS[0])[0] - state, base * torch.tensor(scale))


def test_world_model_loss_in_step_units_divides_each_dims_error_by_its_step_size():
    torch.manual_seed(0)
    scale = torch.tensor([0.01 * (i + 1) for i in range(STATE_DIM)])
    plain = WorldModel(tiny_world_config(velocity_scale=scale.tolist(), loss_multi_step=0.0)).eval()
    stepwise = WorldModel(tiny_world_config(velocity_scale=scale.tolist(), loss_multi_step=0.0, loss_units="step"))
    stepwise.load_state_dict(plain.state_dict())
    batch = {**moving_batch(16), "state_mask": None}
    reference, scored = plain(**batch), stepwise.eval()(**batch)
    assert torch.equal(scored.prediction, reference.prediction)  # only the loss changes, not the model
    targets = plain.normalize_state(batch["next_states"][:, 0], plain._mask(None, batch["state"]))
    error = (reference.prediction[:, :, 0] - targets) ** 2  # [K, B, D], state-std units
    assert reference.metrics["one_step_mse"] == pytest.approx(error.mean().item(), rel=1e-5)
    # a dim whose typical step is 10x smaller weighs 100x more: a stalled gripper's millimetres count
    assert scored.metrics["one_step_mse"] == pytest.approx((error / scale**2).mean().item(), rel=1e-5)


def test_world_model_input_noise_perturbs_training_inputs_only():
    torch.manual_seed(0)
    scale = [0.01 * (i + 1) for i in range(STATE_DIM)]
    clean = WorldModel(tiny_world_config(ensemble_data_fraction=1.0, velocity_input=True, velocity_scale=scale))
    noisy = WorldModel(tiny_world_config(ensemble_data_fraction=1.0, velocity_input=True, velocity_scale=scale,
                                         input_noise=0.5))
    noisy.load_state_dict(clean.state_dict())
    batch = {**moving_batch(16), "state_mask": None}
    clean.eval(), noisy.eval()
    assert torch.equal(noisy(**batch).prediction, clean(**batch).prediction)  # dreams and evaluation: no noise
    clean.train(), noisy.train()
    reference = clean(**batch).prediction
    assert torch.equal(clean(**batch).prediction, reference)
    drift = (noisy(**batch).prediction - reference)[:, :, 0].abs()  # first step: the input noise passes through
    assert drift.mean() > 0
    # std input_noise x velocity_scale per dim, and s_{t-1} too: a dim with a 10x larger step gets ~10x the noise
    assert drift[..., -1].mean() > 5 * drift[..., 0].mean()


@pytest.mark.parametrize("shared", [False, True])
def test_world_model_shared_input_noise_keeps_the_velocity_input_exact(shared, monkeypatch):
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config(ensemble_data_fraction=1.0, velocity_input=True, input_noise=0.5,
                                         input_noise_shared=shared)).train()
    batch = {**moving_batch(16), "state_mask": None}
    seen = []
    velocity = model.velocity
    monkeypatch.setattr(model, "velocity", lambda s, prev: seen.append(velocity(s, prev)) or seen[-1])
    model(**batch)
    mask = model._mask(None, batch["state"])
    exact = velocity(model.normalize_state(batch["state"], mask), model.normalize_state(batch["prev_state"], mask))
    assert torch.allclose(seen[0], exact, atol=1e-5) == shared  # independent noise blurs the velocity


def pose_batch(batch: int = 8, horizon: int = 4, seed: int = 0) -> dict:
    """synthetic_batch with rotation slots that hold rotations (rot6 of random frames) and no padding."""
    gen = torch.Generator().manual_seed(seed)
    data = synthetic_batch(batch, horizon, seed)
    states = torch.cat([data["state"].unsqueeze(1), data["next_states"]], 1)
    for offset in (EEF_ROT6_OFFSET, OBJECT_ROT6_OFFSET, RELATIVE_ROT6_OFFSET):
        frames = torch.linalg.qr(torch.randn(batch, horizon + 1, 3, 3, generator=gen)).Q
        states[..., offset : offset + 6] = torch.cat([frames[..., 0], frames[..., 1]], -1)
    mask = (torch.arange(STATE_DIM) < ONE_OBJECT).float().expand(batch, -1)
    return {**data, "state": states[:, 0] * mask, "next_states": states[:, 1:] * mask.unsqueeze(1), "state_mask": mask}


def test_world_model_derive_relative_pose_feeds_and_scores_the_derived_block():
    """With derive_relative_pose each predicted state's block is robosuite's formula on its own predicted poses
    (and the object pose of the state before it), per task; without it, the model's own block."""
    torch.manual_seed(0)
    frames = {"lift": "world", "can": "eef_lagged"}
    derived = WorldModel(tiny_world_config(derive_relative_pose=True, relative_pose_frames=frames)).eval()
    own = WorldModel(tiny_world_config()).eval()
    own.load_state_dict(derived.state_dict())
    batch = pose_batch()
    pred = derived(**batch).prediction  # [K, B, H, D], normalised
    raw = derived.denormalize_state(pred, batch["state_mask"].unsqueeze(1))
    before = torch.cat([batch["state"].expand(raw.shape[0], -1, -1).unsqueeze(2), raw[:, :, :-1]], 2)
    eef_frame = torch.tensor([task == "can" for task in batch["task"]])[:, None]
    expected = modeling_vla.relative_pose_from_poses(raw, before, eef_frame) * batch["state_mask"].unsqueeze(1)
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=1e-5)  # (empty slots: masked)
    lift = torch.tensor([task == "lift" for task in batch["task"]])
    cube_minus_eef = raw[..., OBJECT_POS_OFFSET : OBJECT_POS_OFFSET + 3] - raw[..., EEF_POS_OFFSET : EEF_POS_OFFSET + 3]
    block = raw[..., RELATIVE_POS_OFFSET : RELATIVE_POS_OFFSET + 3]
    torch.testing.assert_close(block[:, lift], cube_minus_eef[:, lift], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(block[:, ~lift], cube_minus_eef[:, ~lift], atol=1e-3)  # Can: the eef frame
    # The same weights without it: the first step's poses agree and its block does not; from the second step on the
    # poses differ too, since the next step reads the derived block.
    own_pred = own(**batch).prediction
    poses = slice(0, RELATIVE_POS_OFFSET)
    torch.testing.assert_close(own_pred[:, :, 0, poses], pred[:, :, 0, poses])
    assert not torch.allclose(own_pred[:, :, 0, RELATIVE_POS_OFFSET:], pred[:, :, 0, RELATIVE_POS_OFFSET:], atol=1e-3)
    assert not torch.allclose(own_pred[:, :, 1:, poses], pred[:, :, 1:, poses], atol=1e-5)
    with pytest.raises(ValueError, match="task 'square' has no entry in config.relative_pose_frames"):
        derived(**{**batch, "task": ["square"] * len(batch["task"])})
    with pytest.raises(ValueError, match="derive_relative_pose: expected the task of each"):
        derived(**{**batch, "task": None})


def test_world_model_derive_relative_pose_still_learns():
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config(derive_relative_pose=True, relative_pose_frames={"lift": "world",
                                                                                          "can": "eef_lagged"}))
    losses = train_losses(model, pose_batch(16))
    assert losses[-1] < 0.5 * losses[0], losses


def test_world_model_step_reads_prev_state_only_with_velocity_input():
    torch.manual_seed(0)
    state, action = torch.randn(4, STATE_DIM), torch.rand(4, ACTION_DIM)
    moved = state - 0.5
    with_velocity = WorldModel(tiny_world_config(velocity_input=True)).eval()
    at_rest = with_velocity.step(state, action, INSTRUCTIONS[0])[0]
    assert torch.equal(with_velocity.step(state, action, INSTRUCTIONS[0], prev_state=state)[0], at_rest)
    assert not torch.allclose(with_velocity.step(state, action, INSTRUCTIONS[0], prev_state=moved)[0], at_rest)
    without = WorldModel(tiny_world_config()).eval()
    assert torch.equal(without.step(state, action, INSTRUCTIONS[0], prev_state=moved)[0],
                       without.step(state, action, INSTRUCTIONS[0])[0])
    with pytest.raises(ValueError, match="prev_state: expected shape"):
        with_velocity.step(state, action, INSTRUCTIONS[0], prev_state=moved[:2])


def test_world_model_step_batches_std_and_padding(monkeypatch):
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config()).eval()
    batch = 1500  # more rows than one internal chunk
    state, action = torch.randn(batch, STATE_DIM), torch.rand(batch, ACTION_DIM) * 2 - 1
    mask = torch.ones(batch, STATE_DIM)
    mask[::2, -4:] = 0.0
    state = state * mask
    text = model.embed_instructions(INSTRUCTIONS[:1])
    mean, std, p_success, p_done = model.step(state, action, text_emb=text[0], state_mask=mask)
    assert mean.shape == std.shape == (batch, STATE_DIM) and p_success.shape == p_done.shape == (batch,)
    assert torch.all(mean[mask == 0] == 0) and torch.all(std[mask == 0] == 0)
    assert std[mask == 1].mean() > 0  # members disagree
    assert torch.all((p_success >= 0) & (p_success <= 1)) and torch.all((p_done >= 0) & (p_done <= 1))
    by_string = model.step(state, action, INSTRUCTIONS[0], state_mask=mask)
    assert torch.allclose(by_string[0], mean)
    # rows per pass (512 on CPU, 32,768 on a GPU) change the speed, not the result
    for rows_per_pass in (7, 4096):
        monkeypatch.setitem(modeling_vla.STEP_CHUNK_ROWS, "cpu", rows_per_pass)
        again = model.step(state, action, text_emb=text[0], state_mask=mask)
        for got, want in zip(again, (mean, std, p_success, p_done), strict=True):
            torch.testing.assert_close(got, want)
    # the config mask zeroes a dim for every row
    masked = WorldModel(tiny_world_config(state_mask=[1.0] * (STATE_DIM - 3) + [0.0] * 3)).eval()
    assert torch.all(masked.step(state, action, INSTRUCTIONS[0])[0][:, -3:] == 0)


@pytest.mark.parametrize("velocity_input", [False, True])
def test_world_model_round_trip_in_fresh_process(tmp_path, velocity_input):
    torch.manual_seed(0)
    config = tiny_world_config(state_mean=[0.1] * STATE_DIM, state_std=[2.0] * STATE_DIM, action_std=[0.5] * ACTION_DIM,
                               velocity_input=velocity_input, velocity_scale=[0.05 + 0.01 * i for i in range(STATE_DIM)],
                               linear_skip=velocity_input, token_readout=velocity_input, scale_change=velocity_input)
    model = WorldModel(config)
    train_losses(model, {**synthetic_batch(), "prev_state": torch.randn(16, STATE_DIM)}, steps=3)
    if config.linear_skip:
        assert model.skip.weight.abs().sum() > 0  # the skip path trains (it starts at zero)
    model.save_pretrained(tmp_path / "wm")
    # save_pretrained copies the model's module and the siblings it imports, nothing else of the project
    assert {p.name for p in (tmp_path / "wm").iterdir()} == {
        "config.json", "model.safetensors", "configuration_vla.py", "modeling_world.py", "modeling_shared.py",
        "modeling_geometry.py"}
    inputs = {"state": torch.randn(5, STATE_DIM), "action": torch.rand(5, ACTION_DIM), "prev_state": torch.randn(5, STATE_DIM)}
    instruction = [INSTRUCTIONS[i % 2] for i in range(5)]
    outputs = model.step(inputs["state"], inputs["action"], instruction, prev_state=inputs["prev_state"])
    expected = dict(zip(("mean", "std", "p_success", "p_done"), outputs, strict=True))
    loaded = outputs_in_fresh_process(tmp_path / "wm", inputs, instruction, tmp_path)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------------------------------
# VLA policy
# ---------------------------------------------------------------------------------------------


def test_vla_llama_lora_trains_only_adapters_and_head(tiny_llama):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_vla_config(tiny_llama))
    assert model.config.gradient_checkpointing  # still in the config, so it is saved
    assert model.pooling == "last" and any(getattr(m, "gradient_checkpointing", False) for m in model.base_backbone.modules())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert all("lora_" in n or n.startswith(("state_encoder.", "readout_norm.", "head.")) for n in trainable), trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    calls = []
    hook = model.base_backbone.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    losses = train_losses(model, synthetic_batch(batch=8, horizon=4), steps=30)
    hook.remove()
    # two backbone passes (the instruction's, the state tokens'), each recomputed in backward by checkpointing
    assert len(calls) == 2 * 2 * 30
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def _prefix_and_joint_twins(config: VLAConfig) -> tuple[VLAPolicy, VLAPolicy]:
    """Two VLAs with the same weights (LoRA B non-zero), one with the instruction as a key/value prefix."""
    torch.manual_seed(0)
    prefix = VLAPolicy(config)
    train_losses(prefix, synthetic_batch(batch=8, horizon=4), steps=3, lr=1e-2)
    joint = VLAPolicy(VLAConfig(**{**config.to_dict(), "instruction_prefix": False}))
    joint.load_state_dict(prefix.state_dict())
    return prefix, joint


def _loss_and_grads(model: VLAPolicy, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_vla_instruction_prefix_is_exact_for_a_decoder(tiny_llama, checkpointing):
    """A causal backbone never lets the instruction see the state: encoding it once per distinct string and reading
    its keys/values from the state tokens is the joint sequence, outputs and gradients alike (checkpointed or not)."""
    prefix, joint = _prefix_and_joint_twins(tiny_vla_config(tiny_llama, gradient_checkpointing=checkpointing))
    state = torch.randn(5, STATE_DIM)
    instruction = ["Lift the red cube", "Pick up the coke can", "lift it", "Lift the red cube", "lift it"]
    torch.testing.assert_close(prefix.eval().predict_actions(state, instruction),
                               joint.eval().predict_actions(state, instruction), atol=1e-6, rtol=1e-5)
    batch = {**synthetic_batch(batch=6, horizon=4), "instruction": instruction + ["Pick up the coke can"]}
    (loss, grads), (joint_loss, joint_grads) = _loss_and_grads(prefix, batch), _loss_and_grads(joint, batch)
    torch.testing.assert_close(loss, joint_loss)
    assert grads.keys() == joint_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, joint_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_vla_instruction_prefix_on_an_encoder_is_the_joint_sequence_with_the_instruction_blind_to_the_state():
    """For a bidirectional encoder (MiniLM) the prefix path is a deliberate change: the instruction tokens no longer
    attend to the state tokens. Reference: the joint sequence with exactly that attention mask."""
    prefix, joint = _prefix_and_joint_twins(VLAConfig(head_num_layers=1, head_hidden_dim=32, chunk_size=4))
    prefix.eval(), joint.eval()
    state = torch.randn(4, STATE_DIM)
    instruction = ["Lift the red cube", "Pick up the coke can", "lift it", "Lift the red cube"]
    inputs = joint._state_input(state, None)
    with torch.no_grad():
        backbone = joint.base_backbone
        ids, text_mask = joint._instruction_ids(instruction, state.device)
        tokens = joint.config.num_state_tokens
        state_embeds = joint.state_encoder(inputs).view(4, tokens, -1)
        embeds = torch.cat([state_embeds, backbone.get_input_embeddings()(ids)], 1)
        keys = torch.cat([torch.ones(4, tokens, dtype=torch.bool), text_mask.bool()], 1)
        mask = keys[:, None, None, :].expand(4, 1, embeds.shape[1], embeds.shape[1]).clone()
        mask[:, :, tokens:, :tokens] = False  # instruction queries do not see the state keys
        hidden = backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :tokens].mean(1)
        reference = joint._head(hidden, inputs)
        got = prefix.predict_normalized(inputs, instruction)
        assert not torch.allclose(got, joint.predict_normalized(inputs, instruction), atol=1e-4)  # it is a change
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4)


def test_vla_instruction_prefix_cache_serves_eval_and_empties_on_train(tiny_llama):
    model = VLAPolicy(tiny_vla_config(tiny_llama)).eval()
    state, instruction = torch.randn(3, STATE_DIM), ["Lift the red cube", "lift it", "Lift the red cube"]
    first = model.predict_actions(state, instruction)
    assert list(model._prefix_cache) == [("Lift the red cube", "lift it")]
    torch.testing.assert_close(model.predict_actions(state, instruction), first)
    train_losses(model, synthetic_batch(batch=8, horizon=4), steps=2, lr=1e-2)  # moves LoRA; ends in eval()
    assert model._prefix_cache == {}
    assert not torch.allclose(model.predict_actions(state, instruction), first)


def test_vla_head_depth_follows_the_config_and_keeps_the_one_layer_weight_names(tiny_llama):
    """head_num_layers=1 must keep the parameter names of models saved before the field existed."""
    shallow = VLAPolicy(tiny_vla_config(tiny_llama, use_lora=False))
    deep = VLAPolicy(tiny_vla_config(tiny_llama, use_lora=False, head_num_layers=3))
    head_names = lambda model: sorted(n for n, _ in model.named_parameters() if n.startswith("head."))  # noqa: E731
    assert head_names(shallow) == ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"]
    assert len(head_names(deep)) == 2 * 4 and deep.head[-1].out_features == 4 * 7
    state = torch.randn(3, STATE_DIM)
    assert deep.predict_actions(state, INSTRUCTIONS[:1] * 3).shape == (3, 4, 7)


def test_vla_llama_round_trip_merged_export_and_adapter(tiny_llama, tmp_path):
    torch.manual_seed(0)
    model = VLAPolicy(tiny_vla_config(tiny_llama))
    train_losses(model, synthetic_batch(batch=8, horizon=4), steps=5, lr=1e-2)  # non-zero LoRA B
    state = torch.randn(3, STATE_DIM)
    instruction = ["Lift the red cube", "Pick up the coke can", "lift it"]  # different token lengths
    expected = model.predict_actions(state, instruction)
    assert expected.shape == (3, 4, ACTION_DIM) and expected.abs().max() <= 1.0

    model.save_pretrained(tmp_path / "full")
    loaded = outputs_in_fresh_process(tmp_path / "full", {"state": state}, instruction, tmp_path)
    assert torch.equal(loaded["actions"], expected)

    model.merge_and_export(tmp_path / "merged")
    assert VLAConfig.from_pretrained(tmp_path / "merged").use_lora is False
    merged = outputs_in_fresh_process(tmp_path / "merged", {"state": state}, instruction, tmp_path)
    assert torch.allclose(merged["actions"], expected, atol=1e-5)

    model.save_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert torch.equal(VLAPolicy.from_adapter(tmp_path / "adapter").eval().predict_actions(state, instruction), expected)


def test_vla_minilm_default_forward_backward():
    torch.manual_seed(0)
    model = VLAPolicy(VLAConfig())
    assert model.pooling == "state"
    batch = synthetic_batch(batch=2, horizon=8)
    out = model(**batch)
    out.loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert model.head[-1].weight.grad.abs().sum() > 0
    actions = model.eval().predict_actions(batch["state"], batch["instruction"])
    assert actions.shape == (2, 8, ACTION_DIM) and actions.abs().max() <= 1.0


# ---------------------------------------------------------------------------------------------
# MLP policy
# ---------------------------------------------------------------------------------------------


def test_mlp_policy_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = MLPPolicy(MLPPolicyConfig(hidden_dim=64, num_layers=2, dropout=0.0, chunk_size=4, action_std=[0.5] * 7))
    batch = synthetic_batch(batch=16, horizon=4)
    losses = train_losses(model, batch)
    assert losses[-1] < 0.5 * losses[0], losses
    expected = model.predict_actions(batch["state"], batch["instruction"])
    model.save_pretrained(tmp_path / "mlp")
    loaded = outputs_in_fresh_process(tmp_path / "mlp", {"state": batch["state"]}, batch["instruction"], tmp_path)
    assert torch.equal(loaded["actions"], expected)


def held_or_moving_batch(batch: int = 256, seed: int = 0) -> dict:
    """Same poses, opposite labels: a gripper held still (v = 0) should lift (+1), one moving down should go on (-1).

    This is a Square stall in miniature: pressed against the table the gripper sits where a passing one would be.
    """
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(batch, STATE_DIM, generator=gen) * (torch.arange(STATE_DIM) < ONE_OBJECT)
    moving = torch.arange(batch) % 2 == 1
    prev_state = state.clone()
    prev_state[moving, 2] += 1.0  # the moving half came from above
    actions = torch.zeros(batch, 4, ACTION_DIM)
    actions[..., 2] = torch.where(moving, -1.0, 1.0).view(-1, 1)
    return {
        "instruction": [INSTRUCTIONS[0]] * batch, "state": state, "prev_state": prev_state, "actions": actions,
        "step_mask": torch.ones(batch, 4),
    }


@pytest.mark.parametrize("policy", ["mlp", "vla"])
def test_policy_velocity_input_tells_a_held_gripper_from_a_moving_one(policy, tiny_llama):
    batch = held_or_moving_batch()
    errors = {}
    for velocity_input in (False, True):
        torch.manual_seed(0)
        if policy == "mlp":
            model = MLPPolicy(MLPPolicyConfig(hidden_dim=64, num_layers=2, dropout=0.0, chunk_size=4,
                                              velocity_input=velocity_input))
        else:
            model = VLAPolicy(tiny_vla_config(tiny_llama, velocity_input=velocity_input))
        train_losses(model, batch, steps=40, lr=1e-2)
        unseen = held_or_moving_batch(seed=1)  # new poses
        chunks = model.predict_actions(unseen["state"], unseen["instruction"], prev_state=unseen["prev_state"])
        errors[velocity_input] = (chunks[..., 2] - unseen["actions"][..., 2]).abs().mean().item()
    assert errors[False] > 0.7 and errors[True] < 0.4, errors  # without v: no better than guessing


def test_policy_prev_state_defaults_to_rest_and_is_checked():
    torch.manual_seed(0)
    model = MLPPolicy(MLPPolicyConfig(hidden_dim=32, num_layers=1, chunk_size=4, velocity_input=True)).eval()
    state = torch.randn(3, STATE_DIM)
    at_rest = model.predict_actions(state, INSTRUCTIONS[0])
    assert torch.equal(model.predict_actions(state, INSTRUCTIONS[0], prev_state=state), at_rest)
    assert not torch.equal(model.predict_actions(state, INSTRUCTIONS[0], prev_state=state + 1.0), at_rest)
    with pytest.raises(ValueError, match=r"prev_state: expected shape \[B, 83\]"):
        model.predict_actions(state, INSTRUCTIONS[0], prev_state=state[:, :5])
    with pytest.raises(ValueError, match=r"prev_state: expected shape \[3, 83\] like state"):
        model(instruction=[INSTRUCTIONS[0]] * 3, state=state, prev_state=state[:2],
              actions=torch.zeros(3, 4, ACTION_DIM), step_mask=torch.ones(3, 4))


def test_inference_refuses_non_finite_inputs_naming_them():
    """Issue 40, case 2: predict_actions / WorldModel.step with a NaN state returned NaN actions / states."""
    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig(hidden_dim=16, num_layers=1, chunk_size=2, velocity_input=True)).eval()
    world = WorldModel(WorldModelConfig(hidden_dim=8, token_mlp_dim=8, channel_mlp_dim=8, num_layers=1,
                                        num_ensemble=2, velocity_input=True)).eval()
    state, action = torch.randn(3, STATE_DIM), torch.zeros(3, ACTION_DIM)
    broken = state.clone()
    broken[2, 5] = float("nan")
    cases = [
        (lambda: policy.predict_actions(broken, INSTRUCTIONS[0]), "state: row 2"),
        (lambda: policy.predict_actions(state, INSTRUCTIONS[0], prev_state=broken), "prev_state: row 2"),
        (lambda: world.step(broken, action, INSTRUCTIONS[0]), "state: row 2"),
        (lambda: world.step(state, action + torch.tensor([0, float("inf")] + [0] * 5), INSTRUCTIONS[0]), "action: row 0"),
        (lambda: world.step(state, action, INSTRUCTIONS[0], prev_state=broken), "prev_state: row 2"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=rf"^{message} holds NaN or inf"):
            call()
    assert policy.predict_actions(state, INSTRUCTIONS[0]).isfinite().all()


@pytest.mark.parametrize("edit", ["drop", "add", "reshape"])
def test_weights_that_do_not_fit_the_config_are_refused(tiny_llama, tmp_path, edit):
    """Issue 40, case 4: a folder whose weights do not match its config loaded with freshly initialised weights."""
    torch.manual_seed(0)
    models = {
        "vla": VLAPolicy(tiny_vla_config(tiny_llama)),
        "mlp": MLPPolicy(MLPPolicyConfig(hidden_dim=16, num_layers=1, chunk_size=2)),
        "world": WorldModel(WorldModelConfig(hidden_dim=8, token_mlp_dim=8, channel_mlp_dim=8, num_layers=1, num_ensemble=2)),
    }
    for name, model in models.items():
        folder = tmp_path / name
        model.save_pretrained(folder)
        assert type(model).from_pretrained(folder) is not None  # as saved: nothing missing, nothing unexpected
        weights = load_file(folder / "model.safetensors")
        key = sorted(weights)[-1]
        if edit == "drop":
            del weights[key]
        elif edit == "add":
            weights["extra.weight"] = torch.zeros(2)
        else:
            weights[key] = torch.zeros(*weights[key].shape[:-1], weights[key].shape[-1] + 1)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        kind = {"drop": "missing", "add": "unexpected", "reshape": "of another shape"}[edit]
        with pytest.raises(ValueError, match=rf"its weights do not fit its config.json .*1 weights {kind} \("):
            type(model).from_pretrained(folder)


def yaw_state(batch: int, eef_yaw: torch.Tensor, object_yaw: torch.Tensor) -> torch.Tensor:
    """Random states whose gripper and object rot6 are pure turns about z by the given angles."""
    state = torch.randn(batch, STATE_DIM, generator=torch.Generator().manual_seed(0))
    for offset, yaw in ((EEF_ROT6_OFFSET, eef_yaw), (OBJECT_ROT6_OFFSET, object_yaw)):
        c, s = yaw.cos(), yaw.sin()
        zero = torch.zeros_like(yaw)
        state[:, offset : offset + 6] = torch.stack([c, s, zero, -s, c, zero], -1)
    return state


def test_relative_yaw_features_see_the_nearest_face_not_the_absolute_turn():
    eef, obj = torch.tensor([0.3, -2.0, 1.0]), torch.tensor([0.8, -1.1, 1.0])
    features = modeling_vla.relative_yaw_features(yaw_state(3, eef, obj), [1, 4])
    angles = torch.stack([obj - eef, 4 * (obj - eef)], -1)
    torch.testing.assert_close(features, torch.cat([angles.cos(), angles.sin()], -1))
    # A cube turned a quarter more looks the same: k = 4 does not change, k = 1 does.
    turned = modeling_vla.relative_yaw_features(yaw_state(3, eef, obj + torch.pi / 2), [1, 4])
    torch.testing.assert_close(turned[:, [1, 3]], features[:, [1, 3]], atol=1e-5, rtol=0)
    assert (turned[:, [0, 2]] - features[:, [0, 2]]).abs().max() > 0.5


def test_yaw_sawtooth_is_the_turn_to_the_nearest_face_jump_included():
    eef = torch.zeros(6)
    obj = torch.tensor([0.1, -0.3, 0.7, 0.785, 0.786, 3.0])  # 0.785 / 0.786 straddle the cube's 45-degree branch
    features = modeling_vla.relative_yaw_features(yaw_state(6, eef, obj), [1, 4], sawtooth=True)
    assert features.shape == (6, 6)  # cos, sin, then the sawtooth, each for k = 1, 4
    nearest_face_turn = torch.remainder(obj + torch.pi / 4, torch.pi / 2) - torch.pi / 4
    torch.testing.assert_close(features[:, 5], nearest_face_turn * 4 / torch.pi, atol=1e-5, rtol=0)
    torch.testing.assert_close(features[:, 4], obj / torch.pi, atol=1e-5, rtol=0)  # all within (-pi, pi)
    assert features[3, 5] > 0.99 and features[4, 5] < -0.99  # the jump is in the input, not left to the network
    no_saw = modeling_vla.relative_yaw_features(yaw_state(6, eef, obj), [1, 4])
    torch.testing.assert_close(features[:, :4], no_saw)


@pytest.mark.parametrize("policy", ["mlp", "vla"])
def test_policy_reads_yaw_features_and_a_saved_model_can_start_reading_them_unchanged(policy, tiny_llama):
    torch.manual_seed(0)
    if policy == "mlp":
        model = MLPPolicy(MLPPolicyConfig(hidden_dim=32, num_layers=2, chunk_size=4)).eval()
    else:
        model = VLAPolicy(tiny_vla_config(tiny_llama)).eval()
    batch = synthetic_batch(batch=8, horizon=4)
    before = model.predict_actions(batch["state"], batch["instruction"])
    model.add_relative_yaw_input([1, 2, 4])
    assert model.input_dim == STATE_DIM + 6 and model.config.relative_yaw_harmonics == [1, 2, 4]
    for layer, _ in model.state_input_layers():
        assert layer.weight.shape[1] == layer.in_features
    torch.testing.assert_close(model.predict_actions(batch["state"], batch["instruction"]), before)
    losses = train_losses(model.train(), batch, steps=5)  # and it trains, new columns included
    assert losses[-1] < losses[0]
    assert all(layer.weight.grad is not None for layer, _ in model.state_input_layers())
    with pytest.raises(ValueError, match=r"relative_yaw_harmonics: the model already reads \[1, 2, 4\]"):
        model.add_relative_yaw_input([4])
    # A model reading the harmonics can start reading their sawtooth too, again unchanged at first.
    before = model.eval().predict_actions(batch["state"], batch["instruction"])
    model.add_relative_yaw_input(sawtooth=True)
    assert model.input_dim == STATE_DIM + 9 and model.config.relative_yaw_sawtooth
    torch.testing.assert_close(model.predict_actions(batch["state"], batch["instruction"]), before)
    with pytest.raises(ValueError, match="relative_yaw_sawtooth: the model already reads it"):
        model.add_relative_yaw_input(sawtooth=True)
    bare = MLPPolicy(MLPPolicyConfig(hidden_dim=32, num_layers=2, chunk_size=4))
    with pytest.raises(ValueError, match="relative_yaw_sawtooth: expected false without relative_yaw_harmonics"):
        bare.add_relative_yaw_input(sawtooth=True)  # nothing to wrap
    assert not bare.config.relative_yaw_sawtooth and bare.input_dim == STATE_DIM


def test_mlp_policy_with_velocity_input_round_trips(tmp_path):
    torch.manual_seed(0)
    config = MLPPolicyConfig(hidden_dim=32, num_layers=2, dropout=0.0, chunk_size=4, velocity_input=True,
                             velocity_scale=[0.05 + 0.01 * i for i in range(STATE_DIM)])
    model = MLPPolicy(config)
    train_losses(model, held_or_moving_batch(16), steps=3)
    model.save_pretrained(tmp_path / "mlp")
    inputs = {"state": torch.randn(5, STATE_DIM), "prev_state": torch.randn(5, STATE_DIM)}
    expected = model.predict_actions(inputs["state"], INSTRUCTIONS[0], prev_state=inputs["prev_state"])
    loaded = outputs_in_fresh_process(tmp_path / "mlp", inputs, [INSTRUCTIONS[0]] * 5, tmp_path)
    assert torch.equal(loaded["actions"], expected)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_empty_instruction_is_rejected(tiny_llama):
    state = torch.zeros(2, STATE_DIM)
    policies = [MLPPolicy(MLPPolicyConfig(hidden_dim=16, num_layers=1)), VLAPolicy(tiny_vla_config(tiny_llama))]
    for policy in policies:
        with pytest.raises(ValueError, match=r"instruction\[1\].*non-empty"):
            policy.predict_actions(state, ["Lift the red cube", "  "])
    with pytest.raises(ValueError, match=r"instruction\[0\].*non-empty"):
        WorldModel(tiny_world_config()).step(state, torch.zeros(2, ACTION_DIM), "")


def test_unknown_backbone_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "no-such-org/no-such-model-7b"
    with pytest.raises(OSError, match=r"not in the local Hugging Face cache \(HF_HUB_OFFLINE=1\).*huggingface-cli download"):
        VLAPolicy(VLAConfig(backbone=name))


def test_config_default_layout_mirrors_the_data_layout() -> None:
    """configuration_vla.py cannot import data_prep (it ships inside model folders), so it copies the layout."""
    from configuration_vla import DEFAULT_STATE_LAYOUT, DEFAULT_STATE_TOKEN_GROUPS
    from data_prep.tasks import MAX_SLOTS, SLOT_DIM, STATE_LAYOUT, STATE_SLICES, slot_offset
    from modeling_geometry import MAX_SLOTS as GEOMETRY_SLOTS
    from modeling_geometry import SLOT_DIM as GEOMETRY_SLOT_DIM

    assert DEFAULT_STATE_LAYOUT == STATE_LAYOUT and WorldModelConfig().state_dim == STATE_DIM
    assert (GEOMETRY_SLOTS, GEOMETRY_SLOT_DIM) == (MAX_SLOTS, SLOT_DIM)
    token_edges = [sum(DEFAULT_STATE_TOKEN_GROUPS[: i + 1]) for i in range(len(DEFAULT_STATE_TOKEN_GROUPS))]
    robot = [STATE_SLICES[name].stop for name in ("eef pos", "eef rot", "gripper")]
    assert token_edges == robot + [slot_offset(slot + 1) for slot in range(MAX_SLOTS)]  # one token per object
    offsets = (EEF_POS_OFFSET, EEF_ROT6_OFFSET, OBJECT_POS_OFFSET, OBJECT_ROT6_OFFSET, RELATIVE_POS_OFFSET,
               RELATIVE_ROT6_OFFSET)
    assert offsets == tuple(STATE_SLICES[name].start for name in ("eef pos", "eef rot", "object pos", "object rot",
                                                                  "object-eef pos", "object-eef rot"))


def test_vla_backbone_dropout_sets_the_frozen_backbones_dropout(tiny_llama):
    def rates(model: VLAPolicy) -> set[float]:  # the backbone's own dropout layers, not LoRA's
        return {m.p for n, m in model.base_backbone.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" not in n}

    assert rates(VLAPolicy(VLAConfig(head_hidden_dim=32, chunk_size=4))) == {0.1}  # MiniLM's own
    quiet = VLAPolicy(VLAConfig(head_hidden_dim=32, chunk_size=4, backbone_dropout=0.0))
    assert rates(quiet) == {0.0}
    assert quiet.config.backbone_config["attention_probs_dropout_prob"] == 0.0  # saved with the model
    llama = VLAPolicy(tiny_vla_config(tiny_llama, backbone_dropout=0.2))
    assert llama.base_backbone.config.attention_dropout == 0.2
    with pytest.raises(ValueError, match="backbone_dropout"):
        VLAConfig(backbone_dropout=1.5)


def test_vla_with_a_bf16_backbone_trains_its_adapters_in_fp32(tiny_llama):
    """The CPU recipe's frozen backbone in bf16 (AMX matmuls); LoRA, head and the instruction-prefix attention stay
    fp32, and training still fits the batch."""
    torch.manual_seed(0)
    model = VLAPolicy(tiny_vla_config(tiny_llama, backbone_dtype="bfloat16", lora_dropout=0.0))
    assert model.base_backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    losses = train_losses(model, synthetic_batch(batch=8, horizon=4), steps=30)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0], losses
    actions = model.predict_actions(torch.randn(3, STATE_DIM), ["Lift the red cube", "lift it", "lift it"])
    assert actions.dtype == torch.float32 and torch.isfinite(actions).all()


def test_world_model_success_head_reads_the_goal_from_the_instruction():
    """Issue 46: two cubes, the same states under two instructions (relabelled episodes): the success head must say
    "red lifted" for the red instruction and "green lifted" for the green one, which only the words tell apart."""
    gen = torch.Generator().manual_seed(0)
    batch, red_z, green_z = 256, 11 + 2, 11 + 18 + 2  # the cubes' heights: slot 0 and slot 1 of the state
    mask = torch.zeros(STATE_DIM)
    mask[: 11 + 12] = 1.0
    mask[11 + 18 : 11 + 18 + 12] = 1.0
    def heights(n: int) -> torch.Tensor:  # everything still but the two cubes' heights
        state = torch.zeros(n, STATE_DIM)
        state[:, [red_z, green_z]] = torch.randn(n, 2, generator=gen)
        return state

    state = heights(batch)
    next_states = state.unsqueeze(1).repeat(1, 2, 1)
    goals = ["Lift the red cube", "Lift the green cube"]
    instruction = [goals[i % 2] for i in range(batch)]
    red = torch.tensor([i % 2 == 0 for i in range(batch)])
    lifted = torch.where(red, next_states[..., 0, red_z], next_states[..., 0, green_z]) > 0
    data = {"instruction": instruction, "state": state, "state_mask": mask.expand(batch, -1),
            "actions": torch.zeros(batch, 2, ACTION_DIM), "next_states": next_states, "step_mask": torch.ones(batch, 2),
            "success": lifted.float().unsqueeze(1).repeat(1, 2), "done": torch.zeros(batch, 2)}
    torch.manual_seed(0)
    model = WorldModel(tiny_world_config(multi_step=2))
    train_losses(model, data, steps=150, lr=1e-2)
    test_state = heights(batch)
    for goal, z in zip(goals, (red_z, green_z), strict=True):
        _, _, p_success, _ = model.step(test_state, torch.zeros(batch, ACTION_DIM), [goal] * batch,
                                        state_mask=mask.expand(batch, -1))
        label = test_state[:, z] > 0
        predicted = p_success > 0.5
        balanced = ((predicted & label).sum() / label.sum() + (~predicted & ~label).sum() / (~label).sum()) / 2
        assert balanced > 0.9, (goal, balanced)


def test_an_acting_policy_masks_padding_and_empty_slots_as_in_training():
    """Given only a state, a policy reads its mask off it (layout_mask): a Lift state's empty slots and padding
    normalise to 0, not to (0 - mean) / std of another scene's objects (issue 46: slot 1 holds the cubes scene's)."""
    torch.manual_seed(0)
    config = MLPPolicyConfig(hidden_dim=16, num_layers=1, chunk_size=2, state_mean=[0.8] * STATE_DIM,
                             state_std=[0.02] * STATE_DIM)
    model = MLPPolicy(config).eval()
    state = torch.zeros(2, STATE_DIM)
    state[:, : 11 + 12] = torch.rand(2, 11 + 12) + 0.5  # the robot and a cube: slot 0's first 12 numbers
    lift_mask = (torch.arange(STATE_DIM) < 11 + 12).float().expand(2, -1)
    acting = model.predict_actions(state, INSTRUCTIONS[0])
    torch.testing.assert_close(acting, model.predict_actions(state, INSTRUCTIONS[0], state_mask=lift_mask))
    assert not torch.allclose(acting, model.predict_actions(state, INSTRUCTIONS[0], state_mask=torch.ones(2, STATE_DIM)))
