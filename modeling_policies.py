"""The policies: a pretrained transformer + LoRA + action-chunk head (VLAPolicy) and the MLP behaviour-cloning
baseline (MLPPolicy), with their shared chunk loss and inference (ChunkPolicyMixin). Raw units in and out.

Copied into saved model folders, with the sibling modules it imports (trust_remote_code); imports only torch,
transformers, peft, safetensors and its siblings.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

try:  # inside a saved model folder (loaded as a package by trust_remote_code)
    from .configuration_vla import DEFAULT_STATE_DIM, DEFAULT_STATE_LAYOUT, MLPPolicyConfig, VLAConfig
    from .modeling_geometry import layout_mask, relative_yaw_features
    from .modeling_prefix import PREFIX_ATTENTION, InstructionPrefix
    from .modeling_shared import (
        NormalizedModelMixin,
        RobotModelOutput,
        check_instructions,
        get_sentence_embedder,
        masked_mean,
        resolve_pretrained_path,
        valid_steps,
    )
except ImportError:  # inside the project
    from configuration_vla import DEFAULT_STATE_DIM, DEFAULT_STATE_LAYOUT, MLPPolicyConfig, VLAConfig
    from modeling_geometry import layout_mask, relative_yaw_features
    from modeling_prefix import PREFIX_ATTENTION, InstructionPrefix
    from modeling_shared import (
        NormalizedModelMixin,
        RobotModelOutput,
        check_instructions,
        get_sentence_embedder,
        masked_mean,
        resolve_pretrained_path,
        valid_steps,
    )

HEAD_WEIGHTS_FILE = "policy_head.safetensors"


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
        """[normalised s_t] or, with config.velocity_input, [normalised s_t, v_t]; prev_state None = at rest.

        Without `state_mask` (a policy acting: it sees a state, not its task), the mask is read off the state
        (`layout_mask`), as the training rows' masks were: padding and empty slots normalise to 0 either way."""
        self._check_layout(state)
        if state_mask is not None:
            mask = torch.as_tensor(state_mask, dtype=state.dtype, device=state.device)
        elif self.config.state_layout == DEFAULT_STATE_LAYOUT and state.shape[-1] == DEFAULT_STATE_DIM:
            mask = layout_mask(state)
        else:
            mask = torch.ones_like(state)
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


for _model_class in (VLAPolicy, MLPPolicy):
    # save_pretrained then copies this module (and the siblings it imports) and writes auto_map into config.json.
    _model_class.register_for_auto_class("AutoModel")
    AutoModel.register(_model_class.config_class, _model_class, exist_ok=True)
