"""The scripted expert as a policy of the rollout loop. It reads ground-truth object poses that exist only inside the
simulator, so it runs only with a `RobosuiteEnv` (never in a dream)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.errors import UserError
from common.policies import Policy
from evaluation.envs import RobosuiteEnv


class ExpertPolicy(Policy):
    """The scripted expert of `data_prep.experts`, run next to each real simulator."""

    name = "expert"

    def __init__(self, env: Any):
        if not isinstance(env, RobosuiteEnv):
            raise UserError(
                "the scripted expert reads the simulator's ground truth, so it runs only in real robosuite "
                "(use --env real with --policy expert)"
            )
        self.env = env

    def act(self, states: np.ndarray, instructions: Sequence[str], active: np.ndarray) -> np.ndarray:
        actions, self.errors = self.env.expert_actions(active)
        return actions
