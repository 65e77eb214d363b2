"""A small sampler for Megatron-Core GPTModel: temperature / top-p, KV cache, on CPU or GPU.

Megatron-Core's inference engines (megatron.core.inference) assume CUDA throughout, but its
*static* KV cache lives in the attention layers and works on CPU with one exception: the
cache buffers are allocated on `torch.cuda.current_device()` on first use. We therefore
pre-allocate them ourselves (`StaticInferenceContext.key_value_memory_dict`) on the
model's device, after which Megatron's own attention code fills and reads them. A
full-recompute path (`use_kv_cache=False`) is kept as the reference the cache is tested
against.

All n samples of a prompt run as one batch (same prompt length, so no padding); a sample
stops at its first stop id and its later positions are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention


@dataclass
class Sample:
    ids: list[int]  # generated ids, stop id excluded
    stopped: bool  # ended with a stop id (False: ran into max_new_tokens)
    entropy_sum: float  # sum over generated positions (stop position included) of H(p), nats
    num_tokens: int  # generated positions counted in entropy_sum
    token_entropies: list[float] = field(default_factory=list)
    stop_id: Optional[int] = None  # the stop id that ended it (RL trains on it), None if not stopped
    first_entropy: float = float("nan")  # H(p) at the first response position: the choice of
    # how to start (e.g. pick3's three first steps), the same for the n samples of a prompt


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) in nats over the last dim, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sample_from_logits(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One token per row of [b, V] logits: greedy at temperature 0, otherwise softmax at
    the temperature restricted to the top-p nucleus (the smallest set of most likely
    tokens whose mass reaches top_p; the most likely token is always kept)."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = torch.where(before < params.top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _attention_layers(model):

    return [m for m in model.modules() if isinstance(m, Attention)]


class Sampler:
    """sampler = Sampler(model, vocab_size=tokenizer.vocab_size)
    samples = sampler.generate(prompt_ids, n=8, params=SamplingParams(...), stop_ids=[...])

    vocab_size: the tokenizer's real vocabulary; the padded rows of the output layer are
    never sampled and excluded from the entropy. With TP > 1 every rank must call
    generate with the same generator state (the logits are gathered, so ranks agree)."""

    def __init__(self, model, vocab_size: Optional[int] = None, use_kv_cache: bool = True):
        self.model = model
        self.vocab_size = vocab_size
        self.use_kv_cache = use_kv_cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # -- model calls ---------------------------------------------------------------

    def _real_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            logits = logits[..., : self.vocab_size]
        return logits.float()

    def _new_context(self, batch: int, max_len: int):
        """A static KV-cache context whose buffers already live on the model's device."""

        ctx = StaticInferenceContext(batch, max_len)
        for layer in _attention_layers(self.model):
            k = (
                layer.key_hidden_size
                if hasattr(layer, "key_hidden_size")
                else layer.hidden_size_per_attention_head
            )
            v = (
                layer.val_hidden_size
                if hasattr(layer, "val_hidden_size")
                else layer.hidden_size_per_attention_head
            )
            groups = layer.num_query_groups_per_partition
            ctx.key_value_memory_dict[layer.layer_number] = (
                torch.empty(max_len, batch, groups, k, dtype=self.dtype, device=self.device),
                torch.empty(max_len, batch, groups, v, dtype=self.dtype, device=self.device),
            )
        return ctx

    def _forward(self, tokens: torch.Tensor, start: int, ctx) -> torch.Tensor:
        """Logits of the last position, [b, V]. tokens [b, t] hold positions start..start+t-1."""
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)
        positions = positions.unsqueeze(0).expand_as(tokens)
        # runtime_gather_output: the full vocabulary on every TP rank (Megatron requires it
        # in inference mode).
        out = self.model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
        if ctx is not None:
            ctx.sequence_len_offset += tokens.shape[1]
        return self._real_vocab(out[:, -1, :])

    # -- generation ----------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        n: int,
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        generator: Optional[torch.Generator] = None,
        keep_token_entropies: bool = False,
    ) -> list[Sample]:
        if len(prompt_ids) == 0:
            raise ValueError("empty prompt")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        max_pos = getattr(self.model, "max_sequence_length", None)
        total = len(prompt_ids) + params.max_new_tokens
        if max_pos is not None and total > max_pos:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({params.max_new_tokens}) "
                f"= {total} exceeds the model's maximum sequence length {max_pos}"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(
                list(prompt_ids), n, params, set(int(s) for s in stop_ids), generator, keep_token_entropies
            )
        finally:
            self.model.train(was_training)

    def _generate(self, prompt, n, params, stops, generator, keep):
        seq = torch.tensor([prompt] * n, dtype=torch.long, device=self.device)
        ctx = self._new_context(n, len(prompt) + params.max_new_tokens) if self.use_kv_cache else None
        logits = self._forward(seq, 0, ctx)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(n, dtype=torch.bool, device=self.device)
        ent_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        counts = torch.zeros(n, dtype=torch.long, device=self.device)
        ent_steps, generated = [], []
        first_entropy = float(entropy_of_logits(logits[:1])[0])
        stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)
        for step in range(params.max_new_tokens):
            active = ~done
            ent = entropy_of_logits(logits)
            ent_sum += torch.where(active, ent.double(), torch.zeros_like(ent_sum))
            counts += active.long()
            if keep:
                ent_steps.append(ent)
            tok = sample_from_logits(logits, params, generator)
            generated.append(tok)
            is_stop = torch.isin(tok, stop_t) if stop_t.numel() else torch.zeros_like(done)
            stopped |= active & is_stop
            done |= is_stop
            if bool(done.all()) or step + 1 == params.max_new_tokens:
                break
            if ctx is not None:
                logits = self._forward(tok[:, None], len(prompt) + step, ctx)
            else:
                seq = torch.cat([seq, tok[:, None]], dim=1)
                logits = self._forward(seq, 0, None)
        gen = torch.stack(generated, dim=1).tolist()
        out = []
        for i in range(n):
            ids = gen[i][: int(counts[i])]
            stop_id = ids[-1] if stopped[i] else None
            if stopped[i]:
                ids = ids[:-1]
            out.append(
                Sample(
                    ids=ids,
                    stopped=bool(stopped[i]),
                    entropy_sum=float(ent_sum[i]),
                    num_tokens=int(counts[i]),
                    token_entropies=[float(e[i]) for e in ent_steps[: int(counts[i])]] if keep else [],
                    stop_id=stop_id,
                    first_entropy=first_entropy,
                )
            )
        return out
