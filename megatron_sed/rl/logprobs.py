"""Per-token log-probabilities of given tokens under the Megatron-Core GPTModel, from one
full forward (teacher forcing), with gradients when the caller wants them. The RL ratio
needs the same distribution the sampler drew from at temperature 1: the softmax over the
tokenizer's real vocabulary (padded output rows excluded, as the sampler excludes them)."""

from __future__ import annotations

from typing import Optional

import torch


def token_logprobs(
    model, tokens: torch.Tensor, vocab_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), both [b, L - 1] float32: log p(tokens[:, j + 1] | tokens[:, :j + 1])
    and the entropy of that next-token distribution."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    # attention_mask None: GPTModel's causal mask; labels None: it returns the logits [b, s, V].
    logits = model(tokens, positions, None)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
