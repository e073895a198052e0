"""The VLA's instruction as a key/value prefix (VLAConfig.instruction_prefix): the distinct instructions run through the
backbone once with every layer's keys/values recorded, then the state tokens attend to them; registered as a
transformers attention implementation.

Copied into saved model folders with the policies (trust_remote_code): imports only torch and transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
