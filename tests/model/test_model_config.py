"""The one TransformerConfig builder (megatron_sed.model.config): Megatron's own
core_transformer_config_from_args on Megatron's parsed args, checkpoint args completed with
Megatron's parser defaults, and the CPU rules applied to a GPU run's saved args."""

import argparse
import dataclasses
import importlib.util

import pytest
import torch

from megatron_sed.model.config import CPU_MODEL_SETTINGS, transformer_config_from_args
from tests.helpers.model_args import TINY_MODEL_FLAGS, tiny_model_args

needs_megatron_training = pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is None, reason="megatron.training (megatron-core >= 0.19)"
)


def _fields(cfg) -> dict:
    """The config's plain values (callables such as init_method are built per config)."""
    return {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not callable(getattr(cfg, f.name))
    }


@needs_megatron_training
def test_config_is_megatrons_own_for_parsed_args():
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_sed.model.config import parse_megatron_args

    # Model flags the trainer passes through to Megatron (a hand-written builder dropped
    # the first two: the model would silently differ from the flags).
    extra = ["--apply-residual-connection-post-layernorm", "--no-rope-fusion", "--qk-layernorm"]
    args = parse_megatron_args(TINY_MODEL_FLAGS + extra + ["--init-method-std", "0.01"])
    cfg = transformer_config_from_args(args)
    want = core_transformer_config_from_args(
        argparse.Namespace(**{**vars(args), "params_dtype": torch.float32, **CPU_MODEL_SETTINGS})
    )
    assert _fields(cfg) == _fields(want)
    assert cfg.apply_residual_connection_post_layernorm and cfg.qk_layernorm
    assert cfg.init_method_std == 0.01 and cfg.num_query_groups == 2 and cfg.hidden_dropout == 0.0
    assert not hasattr(args, "params_dtype"), "the builder must not modify its args"


@needs_megatron_training
def test_linear_fusion_leaves_megatrons_own_losses_its_native_fused_ce():
    """--cross-entropy-fusion-impl linear is the plugin's (the main head); the losses
    Megatron computes itself (the MTP heads') get its native fused CE: with 'linear' in
    the config, megatron-core's compute_language_model_loss computes nothing (it raised
    UnboundLocalError in an MTP run)."""
    from megatron_sed.model.config import parse_megatron_args
    from megatron_sed.train.arguments import add_trainer_args  # adds the 'linear' choice

    fusion = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl"]
    for impl, want in (("linear", "native"), ("native", "native")):
        args = parse_megatron_args(TINY_MODEL_FLAGS + fusion + [impl], extra_args_provider=add_trainer_args)
        cfg = transformer_config_from_args(args)
        assert cfg.cross_entropy_loss_fusion and cfg.cross_entropy_fusion_impl == want, impl
        assert args.cross_entropy_fusion_impl == impl  # the plugin reads its choice from the args


@needs_megatron_training
def test_checkpoint_args_are_completed_with_megatrons_defaults():
    """A converted checkpoint's args record the model only; what they lack is what the
    trainer's parser would give a run that loads them (not TransformerConfig's own
    defaults, which differ, e.g. attention_softmax_in_fp32)."""
    from megatron_sed.convert.shape import ModelShape, megatron_args

    shape = ModelShape(
        model_type="qwen2",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=256,
        max_position_embeddings=64,
        rotary_base=1e6,
        norm_epsilon=1e-6,
        tie_embeddings=False,
        add_qkv_bias=True,
    )
    saved = argparse.Namespace(
        **megatron_args(shape), tensor_model_parallel_size=1, pipeline_model_parallel_size=1
    )
    assert not hasattr(saved, "attention_softmax_in_fp32")
    cfg = transformer_config_from_args(saved)
    assert cfg.attention_softmax_in_fp32 is False  # Megatron's parser default; the dataclass says True
    assert cfg.layernorm_epsilon == 1e-6 and cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert cfg.params_dtype == torch.float32 and cfg.kv_channels == 16


@pytest.mark.compat
def test_gpu_run_args_rebuilt_on_the_cpu_get_the_cpu_rules():
    """A GPU run's saved args ask for CUDA fusions and GPU initialisation; rebuilt on a
    machine without a GPU (or with device="cpu") the model gets the CPU settings."""
    saved = tiny_model_args(
        use_cpu_initialization=False,
        gradient_accumulation_fusion=True,
        masked_softmax_fusion=True,
        bias_swiglu_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=True,
        no_persist_layer_norm=False,
    )
    cfg = transformer_config_from_args(saved)
    assert cfg.use_cpu_initialization is True
    for name in ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion"):
        assert getattr(cfg, name) is False, name
    assert not cfg.bias_dropout_fusion and not cfg.apply_rope_fusion and not cfg.persist_layer_norm
    assert saved.gradient_accumulation_fusion is True  # the caller's namespace is untouched


@needs_megatron_training
def test_a_parallel_runs_args_rebuild_in_one_process():
    """eval / export / RL rebuild a checkpoint saved at any layout in one process: the
    builder reads every Megatron layout field, so eval_args must reset them all."""
    from megatron_sed.eval.loading import eval_args

    saved = tiny_model_args(
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        decoder_first_pipeline_num_layers=1,
        context_parallel_size=2,
        sequence_parallel=True,
        expert_model_parallel_size=2,
        hidden_dropout=0.1,
        fp8="hybrid",
        gradient_accumulation_fusion=True,
    )
    cfg = transformer_config_from_args(eval_args(saved))
    layout = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
    assert [getattr(cfg, n) for n in layout] == [1, 1, 1] and cfg.expert_model_parallel_size == 1
    assert cfg.num_layers_in_first_pipeline_stage is None and not cfg.sequence_parallel
    assert cfg.hidden_dropout == 0.0 and cfg.fp8 is None and not cfg.gradient_accumulation_fusion
