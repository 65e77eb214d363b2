"""Evaluate a saved checkpoint the way megatron-sed-eval does (megatron_sed.eval.loading),
in a fresh single-process group."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.helpers.dist import run_distributed


def _logits_worker(rank, world, load, tokens_file, out_file):
    from megatron.core import parallel_state as ps

    from megatron_sed.eval.loading import load_model

    ps.initialize_model_parallel()
    model, args, _, _ = load_model(load)
    tokens = torch.load(tokens_file)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    torch.save(logits.float(), out_file)


def checkpoint_logits(load, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, V] logits of the model saved at `load` (a --save directory) on `tokens`."""
    with tempfile.TemporaryDirectory() as d:
        tok, out = Path(d) / "tokens.pt", Path(d) / "logits.pt"
        torch.save(tokens, tok)
        run_distributed(_logits_worker, 1, str(load), str(tok), str(out))
        return torch.load(out)
