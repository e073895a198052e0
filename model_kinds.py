"""The model kinds: each is a config class and a model class, registered here once.

    from model_kinds import ModelKind, register_kind
    register_kind(ModelKind("mine", MyConfig, MyPolicy, role="policy", config="configs/mine.yaml",
                            repo_name="my-policy", label="mine", title="Mine"))

A kind is a world model (`role="world"`: `step(state, action, instruction)`, learns the executed `action`, window
length `multi_step`) or a policy (`role="policy"`: `predict_actions(state, instruction) -> [B, H, 7]`, learns the
expert's `expert_action`, window length `chunk_size`). The trainer (`vla-train --model <name>`), evaluation
(`vla-rollout --policy` / `--world-model`), the cards and `vla-export`, `vla-pipeline` and the benchmarks (`--<label>`)
read their tables from here. Kinds defined outside the project register from a plugin module (`VLA_PLUGINS`,
common/plugins.py); their classes live in a module of their own, which `save_pretrained` copies next to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from common.errors import UserError
from common.plugins import load_plugins
from configuration_vla import MLPPolicyConfig, VLAConfig, WorldModelConfig
from modeling_vla import MLPPolicy, VLAPolicy, WorldModel

ROLES = ("world", "policy")
ACTION_COLUMNS = {"world": "action", "policy": "expert_action"}  # the dataset column each role learns as its actions
HORIZON_FIELDS = {"world": "multi_step", "policy": "chunk_size"}  # the config field that sets the window length H


@dataclass(frozen=True)
class CardText:
    """A kind's model-card prose (hub_cards renders it around the numbers of the results files)."""

    title: str
    summary: str
    tags: tuple[str, ...] = ()
    architecture_keys: tuple[str, ...] = ()  # config fields listed under "Model details"
    usage: str = ""  # body of the `with torch.no_grad():` block of the loading snippet
    intended_use: str = ""
    limitations: str = ""


@dataclass(frozen=True)
class ModelKind:
    name: str  # `vla-train --model <name>`, the pipeline's run name
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    role: str  # "world" or "policy"
    config: str  # the YAML `vla-pipeline` trains it with (relative to the project, or absolute)
    repo_name: str  # the exported repo: <org>/dreaming-vla-<repo_name>
    label: str = ""  # policies: the name in evaluation tables and benchmark flags (`--<label>`)
    title: str = ""  # policies: the name in benchmark tables
    card: CardText | None = field(default=None, repr=False)  # None: a card made of the names above

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def action_column(self) -> str:
        return ACTION_COLUMNS[self.role]

    @property
    def horizon_field(self) -> str:
        return HORIZON_FIELDS[self.role]

    @property
    def card_text(self) -> CardText:
        return self.card or CardText(title=f"Dreaming VLA {self.title or self.name} ({self.role})",
                                     summary=f"A `{self.model_class.__name__}` of the dreaming-vla project.")


_KINDS: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind) -> ModelKind:
    """Add `kind` (a name and model_type of its own), and register its classes with transformers' Auto classes so that
    `save_pretrained` writes `auto_map` and copies their code (trust_remote_code)."""
    if kind.role not in ROLES:
        raise ValueError(f"model kind {kind.name!r}: role {kind.role!r}, expected one of {list(ROLES)}")
    if kind.role == "policy" and not kind.label:
        raise ValueError(f"model kind {kind.name!r}: a policy needs a label (its name in tables and flags)")
    for other in _KINDS.values():
        for what in ("name", "model_type", "label"):
            if getattr(kind, what) and getattr(kind, what) == getattr(other, what):
                raise ValueError(f"model kind {kind.name!r}: {what} {getattr(kind, what)!r} is taken by kind {other.name!r}")
    kind.config_class.register_for_auto_class()
    kind.model_class.register_for_auto_class("AutoModel")
    AutoConfig.register(kind.model_type, kind.config_class, exist_ok=True)
    AutoModel.register(kind.config_class, kind.model_class, exist_ok=True)
    _KINDS[kind.name] = kind
    return kind


def kinds(role: str | None = None) -> list[ModelKind]:
    """Every registered kind (of `role`), in registration order."""
    load_plugins()
    return [kind for kind in _KINDS.values() if role is None or kind.role == role]


def kind_names() -> list[str]:
    return [kind.name for kind in kinds()]


def get_kind(name: str) -> ModelKind:
    for kind in kinds():
        if kind.name == name:
            return kind
    raise UserError(f"unknown model kind {name!r}; expected one of {kind_names()}")


def kind_of_type(model_type: str | None, source: str = "config.json") -> ModelKind:
    """The kind whose config class has `model_type` (the field of a saved config.json)."""
    for kind in kinds():
        if kind.model_type == model_type:
            return kind
    raise UserError(f"{source}: model_type {model_type!r} is not one of this project's models "
                    f"{sorted(k.model_type for k in kinds())}")


def model_types(role: str) -> tuple[str, ...]:
    """The model_type of every kind of `role` (what `vla-rollout --policy` / `--world-model` accept)."""
    return tuple(kind.model_type for kind in kinds(role))


# ----- the project's kinds -----------------------------------------------------------------------------------------
_SHARED_LIMITS = (
    "- Low-dimensional state only (robot proprioception + object pose from the simulator); no cameras.\n"
    "- Trained on a small set of demonstrations for the listed tasks only; it does not generalise to other objects, "
    "robots or controllers (robosuite OSC_POSE delta, 20 Hz).\n"
    "- Instructions are embedded by a small sentence encoder; phrasings far from the training paraphrases may "
    "select the wrong task.\n"
    "- Simulation only. Never run on a real robot without an independent safety layer."
)

_POLICY_LIMITS = _SHARED_LIMITS + (
    "\n- On Lift a policy reading the state alone does not turn the gripper to the cube's nearest face as the expert "
    "does: it meets the cube 20-30 degrees off (median), and the VLA's failures are the most turned ones "
    "(`benchmarks/diagnostics/grasp_yaw.py`). Reading the relative yaw (`relative_yaw_harmonics`) taught the MLP-BC the turn but "
    "cost it Lift successes (a square grasp needs more precision in xy than it has). The VLA fine-tuned with it and "
    "its sawtooth (`relative_yaw_sawtooth`) turns only partway (median 10-12 degrees off) and still turns away from "
    "the nearest face in about one Lift episode in six; those are where its Lift failures have been (the project's "
    "docs/RESULTS.md)."
)

WORLD_MODEL_CARD = CardText(
    title="Dreaming VLA world model (MLP-Mixer ensemble)",
    tags=("world-model", "mlp-mixer"),
    summary="Predicts the next robot/object state, task success and episode end from the current state (and, "
    "with `velocity_input`, the previous one), a 7-D action and a language instruction (frozen MiniLM sentence "
    "embedding). An ensemble of MLP-Mixers; the spread of its members is the uncertainty of every imagined step.",
    architecture_keys=("text_encoder", "hidden_dim", "token_mlp_dim", "channel_mlp_dim", "num_layers",
                       "num_ensemble", "multi_step", "state_token_groups", "velocity_input", "linear_skip",
                       "input_noise", "loss_units"),
    usage="    next_state, std, p_success, p_done = model.step(state, torch.zeros(1, 7), [\"Lift the red cube\"],\n"
    "                                                    prev_state=state)  # s_{t-1}; state itself = at rest",
    intended_use="Imagining rollouts (\"dreams\") of a policy to estimate its success and to visualise what it "
    "would do, for research on world models and model-based evaluation of VLA policies in robosuite.",
    limitations=_SHARED_LIMITS + "\n- Errors compound over long open-loop dreams (several cm after 50 steps), and "
    "the ensemble spread (`std`) can stay narrow after a long dream has left the training data: compare with real "
    "rollouts before trusting a dreamed success rate. The success head (the evaluation default) can fire on states "
    "that are not successes; judged by robosuite's rule on the imagined state instead (`--dream-success state`), "
    "tasks with cm tolerances (Square) are dreamed pessimistically. The state's object-to-eef block is a function of "
    "the eef and object poses, which the model predicts separately and not always consistently: the project's "
    "`DreamEnv` derives it from the predicted poses (`data_prep.tasks.relative_pose_from_poses`) by default. "
    "Training through that formula (`derive_relative_pose`) dreamed Can worse and is off.\n- Trained on expert demos plus perturbed \"play\" episodes "
    "with failures and a policy's own roll-outs; trained on successful demos alone, it dreams success for policies "
    "that fail. Training noise on the input state (`input_noise`) keeps long dreams physically coherent, but the "
    "dreamed Square success rate still moves by tens of points between training runs of one recipe: train "
    "several seeds (`--set seed=N`) and pass them all to `vla-rollout --world-model`, which reports the spread, "
    "or pool them into one ensemble (`vla-pool-world-models`), which dreams with the mean of all "
    "runs' members (the project's docs/RESULTS.md has the measurements).\n- A gripper held still by contact "
    "(pushed against the table or an object) is dreamed moving, many times faster than reality even on the training "
    "data's own stalls, so a dream walks out of a stall that holds the real robot: a policy that stalls is dreamed "
    "too optimistically (`benchmarks/diagnostics/stalls.py --world-model`).",
)
VLA_CARD = CardText(
    title="Dreaming VLA policy (pretrained transformer + LoRA)",
    tags=("lora", "peft", "vision-language-action"),
    summary="A pretrained transformer reads the instruction tokens plus state tokens and a continuous head emits "
    "a chunk of 7-D end-effector actions. The backbone is fine-tuned with LoRA (peft).",
    architecture_keys=("backbone", "use_lora", "lora_r", "lora_alpha", "lora_target_modules", "chunk_size",
                       "num_state_tokens", "pooling", "loss", "relative_yaw_harmonics", "relative_yaw_sawtooth"),
    usage="    actions = model.predict_actions(state, [\"Lift the red cube\"])  # [1, chunk_size, 7]",
    intended_use="Controlling a simulated robosuite Panda arm from a language instruction on the listed tasks; "
    "a baseline for research on language-conditioned policies evaluated in learned world models.",
    limitations=_POLICY_LIMITS,
)
MLP_CARD = CardText(
    title="Dreaming VLA MLP behaviour-cloning baseline",
    tags=("behavior-cloning", "baseline"),
    summary="The baseline policy: normalised state plus a frozen MiniLM instruction embedding through an MLP "
    "that predicts a chunk of 7-D end-effector actions.",
    architecture_keys=("text_encoder", "hidden_dim", "num_layers", "dropout", "chunk_size", "loss",
                       "relative_yaw_harmonics", "relative_yaw_sawtooth"),
    usage="    actions = model.predict_actions(state, [\"Lift the red cube\"])  # [1, chunk_size, 7]",
    intended_use="A reference point for the VLA policy on the same data and tasks.",
    limitations=_POLICY_LIMITS,
)

register_kind(ModelKind("world", WorldModelConfig, WorldModel, role="world", config="configs/world_model.yaml",
                        repo_name="world-model", card=WORLD_MODEL_CARD))
register_kind(ModelKind("policy", VLAConfig, VLAPolicy, role="policy", config="configs/vla_minilm_cpu.yaml",
                        repo_name="vla-policy", label="vla", title="VLA", card=VLA_CARD))
register_kind(ModelKind("mlp", MLPPolicyConfig, MLPPolicy, role="policy", config="configs/mlp_bc.yaml",
                        repo_name="mlp-policy", label="mlp", title="MLP-BC", card=MLP_CARD))
