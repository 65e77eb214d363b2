"""CPU (gloo) training machinery: the minimal equivalent of Megatron-Core's
forward_backward_no_pipelining + DistributedDataParallel + finalize_model_grads +
optimizer with gradient clipping, over Megatron's process groups.

Megatron-Core's schedules, DDP and get_megatron_optimizer hard-code CUDA, so on CPU:
- micro-batches run forward+backward one after the other, losses scaled exactly as
  Megatron's forward_step does (1 / tokens / micro-batches, or per-token);
- gradients are summed over the data-parallel group in one flat all-reduce and averaged
  (or divided by the global token count with --calculate-per-token-loss);
- parameters replicated across TP ranks but fed different sequence shards
  (`sequence_parallel` attribute, e.g. norms under --sequence-parallel) get their
  gradients all-reduced over the TP group, like finalize_model_grads;
- the gradient norm counts TP-duplicated parameters once (Megatron's
  param_is_not_tensor_parallel_duplicate) and is reduced over the model-parallel group;
- torch AdamW with Megatron's parameter groups (no weight decay on biases and norms),
  driven by Megatron-Core's OptimizerParamScheduler.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state as ps


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Megatron's default: no weight decay on biases and 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    for g in groups:
        g["weight_decay"] = weight_decay * g["wd_mult"]
    return [g for g in groups if g["params"]]


def build_cpu_optimizer(model, args) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps, weight_decay=args.weight_decay,
    )


def forward_backward_cpu(forward_step, data_iterator, model, num_microbatches: int,
                         calculate_per_token_loss: bool, forward_only: bool = False):
    """Megatron's forward_backward_no_pipelining on CPU. Returns (reports, total tokens)."""
    reports = []
    total_tokens = torch.zeros((), dtype=torch.int)
    for _ in range(num_microbatches):
        output, loss_fn = forward_step(data_iterator, model)
        loss, num_tokens, report = loss_fn(output)
        if not calculate_per_token_loss:
            loss = loss / torch.clamp(num_tokens, min=1) / num_microbatches
        if not forward_only:
            loss.backward()
        total_tokens += num_tokens
        reports.append(report)
    return reports, total_tokens


def finalize_grads_cpu(model, total_tokens: torch.Tensor, calculate_per_token_loss: bool) -> None:
    """What DDP + finalize_model_grads do: DP all-reduce (+ TP all-reduce of sequence-
    parallel params), then the loss normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sp = [p for p in params if getattr(p, "sequence_parallel", False)]
    tp_group = ps.get_tensor_model_parallel_group()
    if sp and dist.get_world_size(tp_group) > 1:
        _allreduce_flat([p.grad for p in sp], tp_group)
    dp_group = ps.get_data_parallel_group()
    dp = dist.get_world_size(dp_group)
    grads = [p.grad for p in params]
    if dp > 1:
        _allreduce_flat(grads, dp_group)
    if calculate_per_token_loss:
        tokens = total_tokens.to(torch.float64).clone()
        if dp > 1:
            dist.all_reduce(tokens, group=dp_group)
        scale = 1.0 / max(tokens.item(), 1.0)
    else:
        scale = 1.0 / dp
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)


def _allreduce_flat(tensors, group) -> None:
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, r in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


def grad_norm_cpu(model) -> float:
    """L2 norm of all gradients of the model, each TP-duplicated parameter counted once."""
    sq = torch.zeros((), dtype=torch.float64)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for p in model.parameters():
        if p.grad is None:
            continue
        duplicate = not getattr(p, "tensor_model_parallel", False) and tp_rank > 0
        if not duplicate:
            sq += p.grad.detach().double().pow(2).sum()
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return math.sqrt(sq.item())


def clip_grads_cpu(model, max_norm: float, total_norm: float) -> None:
    if max_norm > 0 and total_norm > max_norm:
        coef = max_norm / (total_norm + 1e-6)
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)


def train_step_cpu(forward_step, data_iterator, model, optimizer, scheduler, args):
    """One iteration. Returns (reports, grad_norm, total_tokens)."""
    optimizer.zero_grad(set_to_none=True)
    reports, total_tokens = forward_backward_cpu(
        forward_step, data_iterator, model, args.num_microbatches, args.calculate_per_token_loss
    )
    finalize_grads_cpu(model, total_tokens, args.calculate_per_token_loss)
    norm = grad_norm_cpu(model)
    if not math.isfinite(norm):
        return reports, norm, total_tokens, False  # skip the update, like Megatron
    clip_grads_cpu(model, args.clip_grad, norm)
    optimizer.step()
    scheduler.step(increment=args.global_batch_size)
    return reports, norm, total_tokens, True
