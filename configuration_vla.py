"""Configurations of the three models: the MLP-Mixer world model, the LoRA VLA policy and the MLP baseline.

Each config carries everything a saved model folder needs to be used on its own: the state layout id,
the normalisation statistics (raw units in, raw units out), the text encoder / backbone name and, for
the VLA, the backbone's architecture (`backbone_config`) so `from_pretrained(folder)` never needs the
original backbone weights.

This file is copied into saved model folders (trust_remote_code), so it imports nothing from the project;
`DEFAULT_STATE_LAYOUT` mirrors `data_prep.tasks.STATE_LAYOUT` for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig

DEFAULT_STATE_LAYOUT = "eef_pos3+eef_rot6+gripper_qpos2+slots4x18pad.rot6"
DEFAULT_STATE_DIM = 83
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# One mixer token per semantic slice of the 83-D state: eef_pos, eef_rot6, gripper_qpos, then one token per object
# slot (pos, rot6, relative pos, relative rot6; an object-centric mixer, issue 46). Few tokens keep the per-step cost
# low: dreams evaluate the whole ensemble thousands of times per rollout on CPU.
DEFAULT_STATE_TOKEN_GROUPS = [3, 6, 2, 18, 18, 18, 18]
LOSSES = ("l1", "mse")
POOLINGS = ("auto", "state", "mean", "last")
WORLD_MODEL_ARCHITECTURES = ("mixer", "mlp")
WORLD_MODEL_LOSS_UNITS = ("state_std", "step")
# How robosuite 1.5 observes a task's object-to-eef block (checked against live simulators in tests/test_tasks.py):
# "world": object - eef position in the world frame, same step (Lift; its relative-rotation slots are padding);
# "eef_lagged": the object's pose in the eef frame, with the object pose of the *previous* control step (Can, Square,
# the nuts and bins scenes).
RELATIVE_POSE_FRAMES = ("world", "eef_lagged")
BACKBONE_DTYPES = ("float32", "bfloat16", "float16")


def _fail(config: object, field: str, expected: str, value: Any) -> None:
    raise ValueError(f"{type(config).__name__}.{field}: expected {expected}, got {value!r}")


def _check_positive_int(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(config, field, "a positive integer", value)


def _check_fraction(config: object, *fields: str, low_open: bool = False) -> None:
    for field in fields:
        value = getattr(config, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        if not ok or (low_open and value == 0.0):
            _fail(config, field, "a number in (0, 1]" if low_open else "a number in [0, 1]", value)


def _check_non_negative(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            _fail(config, field, "a non-negative number", value)


def _check_choice(config: object, field: str, choices: Sequence[str]) -> None:
    if getattr(config, field) not in choices:
        _fail(config, field, f"one of {list(choices)}", getattr(config, field))


def _check_yaw_harmonics(config: RobotModelConfig) -> None:
    """relative_yaw_harmonics: None/[] (off) or distinct positive integers, read from the default layout's slots;
    relative_yaw_sawtooth: a bool, only with harmonics."""
    value = config.relative_yaw_harmonics
    harmonics = [] if value is None else value
    if (
        isinstance(harmonics, (str, bytes))
        or not isinstance(harmonics, Sequence)
        or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in harmonics)
        or len(set(harmonics)) != len(harmonics)
    ):
        _fail(config, "relative_yaw_harmonics", "a list of distinct positive integers, e.g. [1, 2, 4]", value)
    if harmonics and config.state_layout != DEFAULT_STATE_LAYOUT:
        _fail(config, "relative_yaw_harmonics", f"[] with state_layout {config.state_layout!r} (it reads "
              f"{DEFAULT_STATE_LAYOUT!r})", value)
    config.relative_yaw_harmonics = list(harmonics)
    if not isinstance(config.relative_yaw_sawtooth, bool):
        _fail(config, "relative_yaw_sawtooth", "true or false", config.relative_yaw_sawtooth)
    if config.relative_yaw_sawtooth and not harmonics:
        _fail(config, "relative_yaw_sawtooth", "false without relative_yaw_harmonics (it wraps k * d for each k)",
              config.relative_yaw_sawtooth)


def _vector(config: object, field: str, dim_field: str, default: float, positive: bool = False) -> list[float]:
    """Fill a stats vector with its default and check its length and values."""
    value, length = getattr(config, field), getattr(config, dim_field)
    if value is None:
        return [default] * length
    try:
        vector = [float(v) for v in value]
    except (TypeError, ValueError):
        _fail(config, field, f"a list of {length} numbers", value)
    if len(vector) != length:
        _fail(config, field, f"a list of {dim_field}={length} numbers", f"{len(vector)} numbers")
    if not all(math.isfinite(v) for v in vector) or (positive and min(vector) < 0):
        _fail(config, field, f"{length} finite{' non-negative' if positive else ''} numbers", value)
    return vector


class RobotModelConfig(PretrainedConfig):
    """Fields shared by the three models: dims, layout, normalisation statistics, tasks trained on."""

    state_dim: int = DEFAULT_STATE_DIM
    action_dim: int = 7
    state_layout: str = DEFAULT_STATE_LAYOUT
    state_mean: list[float] | None = None  # None -> zeros
    state_std: list[float] | None = None  # None -> ones; entries < 1e-6 are treated as 1 (constant dims)
    action_mean: list[float] | None = None
    action_std: list[float] | None = None
    tasks: list[str] | None = None  # task names trained on (informative; the model cards list them)
    # The state holds poses but no velocities. With velocity_input the model also reads v_t = s_t - s_{t-1}
    # in normalised units divided by velocity_scale (the train split's per-dim std of one-step changes, so v is
    # O(1)); v = 0 at a reset. The world model needs it for dynamics; a policy for telling a gripper held still
    # by a contact from one passing through the same pose.
    velocity_input: bool = False
    velocity_scale: list[float] | None = None  # None -> ones; filled in by the trainer from the dataset

    def __post_init__(self, **kwargs: Any) -> None:
        _check_positive_int(self, "state_dim", "action_dim")
        if not isinstance(self.state_layout, str) or not self.state_layout:
            _fail(self, "state_layout", "a non-empty layout id string", self.state_layout)
        self.state_mean = _vector(self, "state_mean", "state_dim", 0.0)
        self.state_std = _vector(self, "state_std", "state_dim", 1.0, positive=True)
        self.action_mean = _vector(self, "action_mean", "action_dim", 0.0)
        self.action_std = _vector(self, "action_std", "action_dim", 1.0, positive=True)
        self.tasks = list(self.tasks) if self.tasks is not None else []
        if not isinstance(self.velocity_input, bool):
            _fail(self, "velocity_input", "true or false", self.velocity_input)
        self.velocity_scale = _vector(self, "velocity_scale", "state_dim", 1.0, positive=True)
        self.validate_fields()
        super().__post_init__(**kwargs)

    def validate_fields(self) -> None:
        """Model-specific checks; subclasses raise ValueError naming the field."""

    @property
    def reads_velocity_scale(self) -> bool:
        """Whether the trainer must fill in velocity_scale from the dataset before training."""
        return self.velocity_input

    def set_normalization(self, stats: Mapping[str, Any], source: str = "normalization.json") -> None:
        """Copy the statistics of a dataset's normalization.json (train split) into this config.

        Refuses statistics of another state layout: a model must never normalise with the wrong slots.
        """
        layout = stats.get("state_layout")
        if layout != self.state_layout:
            raise ValueError(f"{source}: state_layout {layout!r} does not match the model's {self.state_layout!r}")
        for kind in ("state", "action"):
            block = stats.get(kind)
            if not isinstance(block, Mapping) or "mean" not in block or "std" not in block:
                raise ValueError(f"{source}: expected a {kind!r} object with 'mean' and 'std'")
            for moment in ("mean", "std"):
                field = f"{kind}_{moment}"
                setattr(self, field, list(block[moment]))
                setattr(self, field, _vector(self, field, f"{kind}_dim", 0.0, positive=moment == "std"))


class WorldModelConfig(RobotModelConfig):
    """MLP-Mixer ensemble predicting s_{t+1} - s_t (normalised), success and done from (s_t, a_t, instruction).

    Token layout: one token per entry of `state_token_groups` (consecutive slices of the state, default
    eef_pos 3 | eef_rot6 6 | gripper 2 | object pos+rot6 9 | object relative pos+rot6 9), one action token and one
    text token (the MiniLM sentence embedding) -> 7 tokens of width `hidden_dim`. Defaults: ~0.5M parameters
    for the 5-member ensemble, ~5 MFLOP per ensemble step.

    With `velocity_input`, every state token also reads its block of v_t = s_t - s_{t-1} (scaled); `linear_skip`
    adds a linear path from [state, velocity, action] to the change; `token_readout` lets each state token predict
    its own block's change (the head on the token mean then only gives the success and done logits).

    `architecture="mlp"` is the plain-MLP ablation: [state, action, text embedding] concatenated -> `num_layers`
    x (Linear to `hidden_dim`, LayerNorm, GELU) -> the same heads, ensemble and losses (`state_token_groups`,
    `token_mlp_dim` and `channel_mlp_dim` are then unused).
    """

    model_type = "vla_world_model"

    architecture: str = "mixer"  # "mixer" | "mlp"
    text_encoder: str = MINILM_NAME
    text_embed_dim: int = 384
    state_token_groups: list[int] | None = None  # None -> DEFAULT_STATE_TOKEN_GROUPS (must sum to state_dim)
    hidden_dim: int = 64
    token_mlp_dim: int = 16
    channel_mlp_dim: int = 128
    num_layers: int = 4
    dropout: float = 0.0
    num_ensemble: int = 5
    # Each member trains on its own random subset of every batch (bootstrap-style) so the ensemble
    # disagrees where data is thin; 1.0 turns this off.
    ensemble_data_fraction: float = 0.8
    multi_step: int = 8  # open-loop horizon of the multi-step loss (clipped to the batch's H)
    loss_one_step: float = 1.0
    loss_multi_step: float = 0.5
    loss_success: float = 0.1
    loss_done: float = 0.1
    state_mask: list[float] | None = None  # dims this model ever predicts (None -> all); ANDed with batch masks
    # velocity_input / velocity_scale (RobotModelConfig): the arm's next pose depends on how fast it moves.
    # velocity_scale is also read by scale_change and input_noise.
    # A linear path from [state, velocity, action] to the state change, next to the trunk: over one 50 ms
    # step the dynamics are mostly linear (a least-squares fit beats an undertrained net), so the trunk
    # only has to learn the contacts and the rest. Zero-initialised: training starts as without it.
    linear_skip: bool = False
    # Mixer only: each state token predicts its own block's change (a per-token readout) instead of one head on
    # the mean of all tokens, which has to squeeze 83 per-dim answers through one pooled vector.
    token_readout: bool = False
    # The network outputs the change in units of velocity_scale (each dim's typical one-step change) instead of
    # the state's std: one-step changes are 10-100x smaller than the state's spread and differ by that much
    # between dims, so unscaled the outputs must be tiny and unevenly small (the targets-normalisation of PETS/MBPO).
    scale_change: bool = False
    # Training only: Gaussian noise added to the normalised s_t and s_{t-1} of every training window, std =
    # input_noise x each dim's velocity_scale (its typical one-step change). The targets stay the recorded future
    # states, so the model learns to steer a slightly-off state back to the data instead of compounding the error:
    # an open-loop dream feeds the model its own imperfect predictions ("training noise", Sanchez-Gonzalez et al.
    # 2020, Learning to Simulate Complex Physics with Graph Networks). 0 turns it off.
    input_noise: float = 0.0
    # With velocity_input: s_{t-1} gets the same noise as s_t, so the velocity input stays exact. Independent noise
    # (false) also blurs the velocity by ~0.42x its typical size, and a regression on a blurred input learns to
    # trust it less (regression dilution; docs/experiments/030).
    input_noise_shared: bool = False
    # Unit of the state-prediction errors in the loss. "state_std": each dim's spread over the data, where a
    # 1 mm/step error in the end effector's motion is ~1e-4 of the loss, too small to learn that an arm pushed
    # against the table or the nut does not move. "step": each dim's typical one-step change (velocity_scale), the
    # delta-normalised targets of PETS / MBPO, where the same error counts far more (tried, not adopted:
    # docs/experiments/034).
    loss_units: str = "state_std"
    # The object-to-eef block is a function of the eef and object poses. With derive_relative_pose, every predicted
    # state's block is recomputed from its predicted poses (robosuite's formula, per task as in relative_pose_frames)
    # before the multi-step loss scores it and the next step reads it, as the dream does (DreamEnv's default): training
    # then matches use, and the model's own block output is never used (nor trained). Needs the default state layout;
    # relative_pose_frames (task -> one of RELATIVE_POSE_FRAMES) is filled in by the trainer from the dataset's tasks.
    # Off in configs/world_model.yaml: its dreams were further from reality (docs/experiments/039).
    derive_relative_pose: bool = False
    relative_pose_frames: dict[str, str] | None = None

    @property
    def reads_velocity_scale(self) -> bool:
        return self.velocity_input or self.scale_change or self.input_noise > 0 or self.loss_units == "step"

    def relative_pose_in_eef_frame(self, task: str) -> bool:
        """Whether `task`'s object-to-eef block is the object's pose in the eef frame, one step late ("eef_lagged"),
        rather than the world-frame position ("world"), per relative_pose_frames."""
        frames = self.relative_pose_frames or {}
        if task not in frames:
            raise ValueError(f"derive_relative_pose: task {task!r} has no entry in config.relative_pose_frames {frames}")
        return frames[task] == RELATIVE_POSE_FRAMES[1]

    def _validate_relative_pose(self) -> None:
        if not isinstance(self.derive_relative_pose, bool):
            _fail(self, "derive_relative_pose", "true or false", self.derive_relative_pose)
        if self.derive_relative_pose and self.state_layout != DEFAULT_STATE_LAYOUT:
            _fail(self, "derive_relative_pose", f"false with state_layout {self.state_layout!r} (it reads "
                  f"{DEFAULT_STATE_LAYOUT!r})", True)
        frames = {} if self.relative_pose_frames is None else self.relative_pose_frames
        if not isinstance(frames, Mapping) or not all(
            isinstance(task, str) and frame in RELATIVE_POSE_FRAMES for task, frame in frames.items()
        ):
            _fail(self, "relative_pose_frames", f"a mapping task -> one of {list(RELATIVE_POSE_FRAMES)}", frames)
        self.relative_pose_frames = dict(frames)

    def validate_fields(self) -> None:
        _check_choice(self, "architecture", WORLD_MODEL_ARCHITECTURES)
        _check_choice(self, "loss_units", WORLD_MODEL_LOSS_UNITS)
        self._validate_relative_pose()
        for flag in ("linear_skip", "token_readout", "scale_change", "input_noise_shared"):
            if not isinstance(getattr(self, flag), bool):
                _fail(self, flag, "true or false", getattr(self, flag))
        if self.token_readout and self.architecture != "mixer":
            _fail(self, "token_readout", "false with architecture 'mlp' (it reads out the mixer's tokens)", True)
        _check_positive_int(
            self, "text_embed_dim", "hidden_dim", "token_mlp_dim", "channel_mlp_dim", "num_layers", "num_ensemble",
            "multi_step",
        )
        _check_fraction(self, "dropout")
        _check_fraction(self, "ensemble_data_fraction", low_open=True)
        _check_non_negative(self, "loss_one_step", "loss_multi_step", "loss_success", "loss_done", "input_noise")
        groups = DEFAULT_STATE_TOKEN_GROUPS if self.state_token_groups is None else self.state_token_groups
        if self.state_token_groups is None and self.state_dim != sum(groups):
            groups = [self.state_dim]  # a non-default state width gets a single state token unless told otherwise
        if (
            not isinstance(groups, Sequence)
            or not groups
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in groups)
            or sum(groups) != self.state_dim
        ):
            _fail(self, "state_token_groups", f"positive integers summing to state_dim={self.state_dim}", groups)
        self.state_token_groups = list(groups)
        mask = _vector(self, "state_mask", "state_dim", 1.0)
        if any(v not in (0.0, 1.0) for v in mask):
            _fail(self, "state_mask", "0/1 values", self.state_mask)
        self.state_mask = mask


class VLAConfig(RobotModelConfig):
    """A pretrained transformer (MiniLM by default, any AutoModel) + LoRA + an action-chunk head.

    Input sequence: `num_state_tokens` tokens projected from the normalised state, plus the tokenised
    instruction; encoders (BERT-like) mean-pool the final hidden states, decoders (Llama-like) read the
    last token (state tokens go last, instruction left-padded).
    """

    model_type = "vla_policy"

    backbone: str = MINILM_NAME  # hub name (resolved in the local cache / PyPI package) or a local path
    backbone_config: dict | None = None  # the backbone's architecture, filled in when it is first loaded
    backbone_dtype: str = "float32"  # "bfloat16" for billion-parameter backbones on GPU
    # The frozen backbone's dropout (hidden and attention probabilities) while the adapters train; None keeps the
    # pretrained config's (MiniLM: 0.1).
    backbone_dropout: float | None = None
    use_lora: bool = True
    lora_r: int = 16  # the reference Llama-3-8B setup uses 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None -> per architecture (BERT: query,value; Llama: q_proj,v_proj)
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward (non-reentrant)
    chunk_size: int = 8  # H: actions predicted per call
    num_state_tokens: int = 2
    state_hidden_dim: int = 256  # hidden width of the state -> tokens MLP
    head_hidden_dim: int = 256
    head_num_layers: int = 1  # hidden layers of the action head (Linear, GELU, Dropout each)
    head_dropout: float = 0.0
    # Readout of the backbone: "state" = mean of the state tokens' final hidden states (they attend to the
    # instruction; a mean over every token would drown the state in ~15 text tokens), "last" = last token
    # (decoders: the last state token, which sees everything causally), "mean" = all tokens.
    # auto: "state" for masked-LM encoders, "last" otherwise.
    pooling: str = "auto"
    # Also feed the normalised state straight to the head (a proprio skip), so precise positions need not
    # survive the trip through a frozen language model; the backbone supplies the instruction's meaning.
    state_skip: bool = True
    max_instruction_tokens: int = 32
    # Encode each distinct instruction once per batch and let the state tokens attend to its keys/values in every
    # layer; the instruction does not attend to the state. Exact for decoders (causal anyway), a deliberate change
    # for encoders; ~9x less work per sample (docs/experiments: "instruction as a key/value prefix").
    # Needs pooling "state" or "last" (the readout must be a state token). False: one joint sequence.
    instruction_prefix: bool = True
    loss: str = "l1"
    # Also read cos/sin(k * d) for each k, d = the object's yaw minus the gripper's. A cube looks the same every
    # 90 degrees and the nut's handle every 180, so the turn to the nearest face is a sawtooth of d that a policy
    # reading rot6 alone did not learn (docs/experiments/035). [1, 2, 4] gives each symmetry its own smooth input.
    relative_yaw_harmonics: list[int] | None = None
    # Also read wrap(k * d) / pi for each k: the turn to the nearest face itself, jump included, which a network
    # fed only the smooth cos / sin blurs into turns the wrong way near the jump (docs/experiments/035).
    relative_yaw_sawtooth: bool = False

    def validate_fields(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone.strip():
            _fail(self, "backbone", "a model name or local path", self.backbone)
        if self.backbone_config is not None and (
            not isinstance(self.backbone_config, Mapping) or "model_type" not in self.backbone_config
        ):
            _fail(self, "backbone_config", "a transformers config dict with 'model_type'", type(self.backbone_config))
        _check_choice(self, "backbone_dtype", BACKBONE_DTYPES)
        if self.backbone_dropout is not None:
            _check_fraction(self, "backbone_dropout")
        _check_positive_int(
            self, "lora_r", "chunk_size", "num_state_tokens", "state_hidden_dim", "head_hidden_dim", "head_num_layers",
            "max_instruction_tokens",
        )
        _check_non_negative(self, "lora_alpha")
        _check_fraction(self, "lora_dropout", "head_dropout")
        if self.lora_target_modules is not None and (
            isinstance(self.lora_target_modules, str)
            or not self.lora_target_modules
            or not all(isinstance(m, str) and m for m in self.lora_target_modules)
        ):
            _fail(self, "lora_target_modules", "a non-empty list of module names or None", self.lora_target_modules)
        _check_choice(self, "pooling", POOLINGS)
        if not isinstance(self.instruction_prefix, bool):
            _fail(self, "instruction_prefix", "true or false", self.instruction_prefix)
        if self.instruction_prefix and self.pooling == "mean":
            _fail(self, "pooling", "'auto', 'state' or 'last' with instruction_prefix (its readout is a state token)",
                  self.pooling)
        _check_choice(self, "loss", LOSSES)
        _check_yaw_harmonics(self)


class MLPPolicyConfig(RobotModelConfig):
    """Behaviour-cloning baseline: [normalised state, MiniLM instruction embedding] -> MLP -> H x 7."""

    model_type = "vla_mlp_policy"

    text_encoder: str = MINILM_NAME
    text_embed_dim: int = 384
    hidden_dim: int = 512
    num_layers: int = 3
    dropout: float = 0.1
    chunk_size: int = 8
    loss: str = "l1"
    relative_yaw_harmonics: list[int] | None = None  # as VLAConfig's
    relative_yaw_sawtooth: bool = False  # as VLAConfig's

    def validate_fields(self) -> None:
        _check_positive_int(self, "text_embed_dim", "hidden_dim", "num_layers", "chunk_size")
        _check_fraction(self, "dropout")
        _check_choice(self, "loss", LOSSES)
        _check_yaw_harmonics(self)


for _config_class in (WorldModelConfig, VLAConfig, MLPPolicyConfig):
    # save_pretrained then writes auto_map and copies this file next to the weights (trust_remote_code).
    _config_class.register_for_auto_class()
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
