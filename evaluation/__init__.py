"""Evaluation: dream rollouts in the world model, real rollouts in robosuite, metrics, plots, videos.

    from evaluation import DreamEnv, RobosuiteEnv, ChunkPolicy, ExpertPolicy, rollout
    records = rollout(env, policy, starts, instructions, horizon)

The command line is `vla-rollout` (evaluation/cli.py).
"""

from common.policies import ChunkExecution, ChunkPolicy, Policy
from evaluation.envs import DreamEnv, Env, RobosuiteEnv, Start, StepResult, VideoSpec
from evaluation.expert_policy import ExpertPolicy
from evaluation.metrics import agreement, summarize, wilson_interval
from evaluation.records import EpisodeRecord
from evaluation.rollout import rollout

__all__ = [
    "ChunkExecution",
    "ChunkPolicy",
    "DreamEnv",
    "Env",
    "EpisodeRecord",
    "ExpertPolicy",
    "Policy",
    "RobosuiteEnv",
    "Start",
    "StepResult",
    "VideoSpec",
    "agreement",
    "rollout",
    "summarize",
    "wilson_interval",
]
