"""GPU (NCCL) training machinery: Megatron-Core's own DistributedDataParallel,
get_megatron_optimizer (optionally the distributed optimizer), get_forward_backward_func
(pipeline schedules) and finalize_model_grads. Model, loss, data and logging are the same
objects the CPU loop uses."""

from __future__ import annotations

import torch

from megatron.core import parallel_state as ps


def wrap_model_gpu(model, args):
    """Move to the GPU, wrap bf16/fp16 in Float16Module, then in Megatron-Core's DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = model.config
    model.cuda(torch.cuda.current_device())
    if args.bf16 or args.fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # What Megatron-LM's training.setup_model_and_optimizer wires into the config.
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if args.overlap_grad_reduce else None
    config.finalize_model_grads_func = finalize_model_grads
    config.calculate_per_token_loss = args.calculate_per_token_loss
    return ddp


def build_gpu_optimizer(ddp_model, args):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_sed.model.config import params_dtype_from_args

    cfg = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=params_dtype_from_args(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(cfg, [ddp_model])
    if args.overlap_param_gather and args.use_distributed_optimizer:
        ddp_model.config.param_sync_func = ddp_model.start_param_sync
    return optimizer


def train_step_gpu(forward_step, data_iterator, ddp_model, optimizer, scheduler, args):
    """One iteration with Megatron-Core's schedule. Returns (reports, grad_norm, tokens, ok)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=[ddp_model],
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        reports = []  # losses exist on the last stage only
    return reports, float(grad_norm) if grad_norm is not None else float("nan"), None, update_successful


def eval_step_gpu(forward_step, data_iterator, ddp_model, args):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[ddp_model],
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length, forward_only=True,
    )
