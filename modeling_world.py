"""The world model: a vectorised ensemble of MLP-Mixers (or of plain MLPs) predicting s_{t+1}, success and done from
(s_t, a_t, instruction), in raw units; `WorldModel.step` dreams, `WorldModel.pool` joins training runs.

Copied into saved model folders, with the sibling modules it imports (trust_remote_code); imports only torch,
transformers and its siblings.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init

try:  # inside a saved model folder (loaded as a package by trust_remote_code)
    from .configuration_vla import WorldModelConfig
    from .modeling_geometry import relative_pose_from_poses
    from .modeling_shared import (
        NormalizedModelMixin,
        RobotModelOutput,
        check_instructions,
        get_sentence_embedder,
        masked_mean,
        valid_steps,
    )
except ImportError:  # inside the project
    from configuration_vla import WorldModelConfig
    from modeling_geometry import relative_pose_from_poses
    from modeling_shared import (
        NormalizedModelMixin,
        RobotModelOutput,
        check_instructions,
        get_sentence_embedder,
        masked_mean,
        valid_steps,
    )

# WorldModel.step's rows per pass. On a CPU, 512 keeps the [K, rows, T, C] activations cache-sized (thousands of
# dreams otherwise go memory-bound). On a GPU, small passes are kernel-launch-bound instead (65,536 dreams in 512-row
# passes ran at 0.3 M imagined steps/s on an H200); 32,768 rows bound the activations to ~1 GiB.
STEP_CHUNK_ROWS = {"cpu": 512}
STEP_CHUNK_ROWS_ACCELERATOR = 32768


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


# save_pretrained then copies this module (and the siblings it imports) and writes auto_map into config.json.
WorldModel.register_for_auto_class("AutoModel")
AutoModel.register(WorldModelConfig, WorldModel, exist_ok=True)
