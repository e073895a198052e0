"""The models, as the project imports them: the MLP-Mixer world-model ensemble, the LoRA VLA policy and the MLP
behaviour-cloning baseline.

All of them take and return raw units (state [B, 83], action [B, 7] / chunks [B, H, 7]) and normalise
internally with the statistics in their config. `model(**batch)` (batch as in docs/DESIGN.md, "Training
batches") returns a `RobotModelOutput` with `.loss` and `.metrics`.

The code lives in sibling modules, each copied into the saved model folders that need it (trust_remote_code:
transformers copies a model's module and the siblings it imports relatively); this file only gathers their names:

    modeling_shared.py     text models and the sentence embedder, output type, normalisation, masked losses
    modeling_geometry.py   rot6, yaw and the object-to-eef formula
    modeling_world.py      WorldModel and its ensemble layers
    modeling_prefix.py     the VLA's instruction-prefix attention
    modeling_policies.py   ChunkPolicyMixin, VLAPolicy, MLPPolicy
"""

from __future__ import annotations

from modeling_geometry import (
    EEF_POS_OFFSET,
    EEF_ROT6_OFFSET,
    OBJECT_POS_OFFSET,
    OBJECT_ROT6_OFFSET,
    RELATIVE_POS_OFFSET,
    RELATIVE_ROT6_OFFSET,
    relative_pose_from_poses,
    relative_yaw_features,
    rot6_to_matrix,
    yaw_of_rot6,
)
from modeling_policies import (
    BACKBONE_DROPOUT_FIELDS,
    HEAD_WEIGHTS_FILE,
    ChunkPolicyMixin,
    MLPPolicy,
    VLAPolicy,
    default_lora_targets,
    enable_activation_checkpointing,
    load_backbone,
)
from modeling_prefix import (
    PREFIX_ATTENTION,
    InstructionPrefix,
    instruction_prefix_attention,
)
from modeling_shared import (
    MIN_STD,
    NormalizedModelMixin,
    RobotModelOutput,
    SentenceEmbedder,
    check_instructions,
    get_sentence_embedder,
    masked_mean,
    resolve_pretrained_path,
    valid_steps,
)
from modeling_world import (
    STEP_CHUNK_ROWS,
    STEP_CHUNK_ROWS_ACCELERATOR,
    EnsembleLayerNorm,
    EnsembleLinear,
    EnsembleMixerBlock,
    EnsembleMLPTrunk,
    EnsembleStateTokenizer,
    EnsembleTokenMixing,
    EnsembleTokenReadout,
    WorldModel,
)

__all__ = [
    "EEF_POS_OFFSET",
    "EEF_ROT6_OFFSET",
    "OBJECT_POS_OFFSET",
    "OBJECT_ROT6_OFFSET",
    "RELATIVE_POS_OFFSET",
    "RELATIVE_ROT6_OFFSET",
    "relative_pose_from_poses",
    "relative_yaw_features",
    "rot6_to_matrix",
    "yaw_of_rot6",
    "BACKBONE_DROPOUT_FIELDS",
    "ChunkPolicyMixin",
    "HEAD_WEIGHTS_FILE",
    "MLPPolicy",
    "VLAPolicy",
    "default_lora_targets",
    "enable_activation_checkpointing",
    "load_backbone",
    "InstructionPrefix",
    "PREFIX_ATTENTION",
    "instruction_prefix_attention",
    "MIN_STD",
    "NormalizedModelMixin",
    "RobotModelOutput",
    "SentenceEmbedder",
    "check_instructions",
    "get_sentence_embedder",
    "masked_mean",
    "resolve_pretrained_path",
    "valid_steps",
    "EnsembleLayerNorm",
    "EnsembleLinear",
    "EnsembleMLPTrunk",
    "EnsembleMixerBlock",
    "EnsembleStateTokenizer",
    "EnsembleTokenMixing",
    "EnsembleTokenReadout",
    "STEP_CHUNK_ROWS",
    "STEP_CHUNK_ROWS_ACCELERATOR",
    "WorldModel",
]
