"""The one model-level CPU stand-in: Megatron's RotaryEmbedding without a GPU.

Megatron-Core's `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()`
on first use (megatron-core 0.16.1 to 0.19.2), which fails where there is no GPU and the
CPU backend (megatron_sed.backend.cpu) is not installed: the evaluation, export and RL
processes build models on the CPU without it. `make_rotary_cpu_safe(model)` gives the
model's RotaryEmbedding this module's `get_emb` (same state, same numbers); with a GPU, or
with the backend installed, Megatron's own runs. It can go when upstream builds the
embedding on `inv_freq`'s device.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class CPURotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding that keeps `inv_freq` on the CPU when there is no GPU."""

    def get_emb(self, max_seq_len: int, offset: int = 0):
        if torch.cuda.is_available():
            return super().get_emb(max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]


def make_rotary_cpu_safe(model: torch.nn.Module) -> None:
    """Swap the class of `model.rotary_pos_emb` (Megatron's plain RotaryEmbedding only:
    the YaRN / multimodal subclasses keep theirs) for CPURotaryEmbedding, in place."""
    if type(getattr(model, "rotary_pos_emb", None)) is RotaryEmbedding:
        model.rotary_pos_emb.__class__ = CPURotaryEmbedding
