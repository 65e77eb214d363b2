"""Rollouts: n samples per prompt from the KV-cache sampler (eval.sampler), scored by the
verifiable reward, and their packing into right-padded token batches for the updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_sed.eval.sampler import Sampler, SamplingParams
from megatron_sed.rl.reward import REWARDS


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # the generated ids, INCLUDING the stop id that ended it: the
    # policy chose to stop, so that token is trained like any other
    text: str
    reward: float
    entropy_sum: float  # sampler's untempered entropy summed over the generated positions
    stopped: bool

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)


def sample_group(
    sampler: Sampler, tokenizer, prompt, n: int, params: SamplingParams, generator, reward: str = "boxed"
) -> list[Rollout]:
    """The n rollouts of one prompt (an eval.prompts.EvalPrompt: messages + answer), scored
    by REWARDS[reward]."""
    score = REWARDS[reward]
    ids = tokenizer.encode_prompt(prompt.messages)
    out = []
    for s in sampler.generate(ids, n, params, stop_ids=tokenizer.stop_ids, generator=generator):
        text = tokenizer.detokenize(s.ids)
        response = list(s.ids) + ([s.stop_id] if s.stop_id is not None else [])
        out.append(Rollout(ids, response, text, score(text, prompt.answer), s.entropy_sum, s.stopped))
    return out


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [b, L] prompt + response, right-padded
    mask: torch.Tensor  # [b, L - 1] 1 where the TARGET tokens[:, 1:] is a response token

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def pack(rollouts: Sequence[Rollout], pad_id: int) -> TokenBatch:
    """Right padding: under a causal mask the pad never influences the real positions."""
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    length = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length - 1), dtype=torch.float32)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        p = len(r.prompt_ids)
        mask[i, p - 1 : p - 1 + r.num_response_tokens] = 1.0  # target j is tokens[j + 1]
    return TokenBatch(tokens, mask)
