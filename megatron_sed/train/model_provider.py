"""Megatron's model_provider: a Megatron-Core GPTModel built from Megatron's parsed args.

The TransformerConfig comes from the plugin's one builder
(megatron_sed.model.config.transformer_config_from_args), which is Megatron's own
`core_transformer_config_from_args`, so every Megatron-LM model, precision and recompute
flag means what it means there; eval, export and RL rebuild checkpoints through the same
builder. The specs are
the ones Megatron's own GPT provider builds from that config (megatron_sed.model.gpt:
the decoder block with dense or MoE layers and QK-norm, the MTP block): Megatron-Core's
Transformer Engine spec with `--transformer-impl transformer_engine` (FP8 through
`--fp8-format`), its local spec with torch SDPA attention and torch norms (see
megatron_sed.model.specs) with `--transformer-impl local`. Model flags it cannot honour
are refused at argument validation (megatron_sed.model.support).
The SED loss is not part of the model: forward_step hands it to GPTModel per call
(megatron_sed.train.step).
"""

from __future__ import annotations

from typing import Optional

from megatron.training import get_args, print_rank_0

from megatron_sed.model import build_gpt_model, transformer_config_from_args


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    config=None,
    pg_collection=None,
):

    args = get_args()
    if config is None:
        config = transformer_config_from_args(args)
    print_rank_0(f"> building GPTModel ({args.transformer_impl} layers) ...")
    return build_gpt_model(
        args,
        config=config,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
