"""--sed-mask-ratio inside Megatron-LM's `pretrain_gpt.py`: calibrate tau before training.

Megatron-LM has no hook between building the model and the first training step, so the
calibration runs lazily, in the first `forward_step` (the patch calls `install_sed_loss`
there with pretrain_gpt's own `forward_step` and `train_valid_test_datasets_provider`):

1. the validation dataset is built with Megatron-LM's own provider (so --data-path,
   --split, --sft, the tokenizer, ... mean what they mean for training);
2. the first --sed-calibration-samples samples are run through pretrain_gpt's own
   `forward_step` in eval mode without gradients, micro-batch by micro-batch, in
   Megatron's data-parallel order (DP rank r gets rows i*dp*mbs + r*mbs + [0, mbs) at
   step i). That reuses everything forward_step does to a batch (TP broadcast, context-
   parallel slicing, packed sequences); the SED op computes the statistic the mask
   thresholds (P_topk, or the entropy) for every token, and the loss mask comes back in
   forward_step's loss function partial;
3. tau is the exact quantile over all supervised tokens, gathered over the data- and
   context-parallel ranks (megatron_sed.calibration: the same math as our trainer;
   tensor-parallel ranks hold identical statistics and are not gathered);
4. tau goes into `args.sed_threshold` (so Megatron-LM saves it with every checkpoint's
   args) and into `<--save>/sed_threshold.json` (atomic). A resumed run (`--load` of a
   checkpoint at iteration > 0, not --finetune) reuses that file's tau instead of
   calibrating the half-trained model again.

Pipeline parallelism is not supported (only the last stage has logits, and the pipeline
schedule owns the stages' communication): pass --sed-threshold there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from megatron_sed.calibration import (
    CalibrationResult,
    _comm_device,
    quantile_level,
    threshold_from_masses,
)
from megatron_sed.model.loss_hook import pop_sed_stats
from megatron_sed.rank0 import print_rank_0

__all__ = ["THRESHOLD_FILE", "calibrate_in_pretrain_gpt", "calibration_batches", "resolve_sed_threshold"]

THRESHOLD_FILE = "sed_threshold.json"


def _groups():
    """(DP rank, DP size, group to gather the statistics over: DP x CP)."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        return 0, 1, None
    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.get_data_parallel_group(with_context_parallel=True))


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on some rank (an error on one rank must stop
    all of them, not leave the others waiting in a collective)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(None))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def calibration_batches(dataset, num_steps: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> Iterator[dict]:
    """This DP rank's micro-batches of `dataset`, in Megatron's order: at step i, rows
    i*dp*mbs + dp_rank*mbs + [0, mbs), collated like Megatron's DataLoader does."""
    from torch.utils.data import default_collate

    for i in range(num_steps):
        first = i * dp_size * micro_batch_size + dp_rank * micro_batch_size
        items = [dataset[j] for j in range(first, first + micro_batch_size)]
        # Keys a dataset fills with None (e.g. no attention mask) stay None, as get_batch expects.
        yield {k: None if items[0][k] is None else default_collate([it[k] for it in items])
               for k in items[0]}


def _threshold_file(directory: Optional[str]) -> Optional[Path]:
    return Path(directory) / THRESHOLD_FILE if directory else None


def _write_threshold_file(directory: str, record: dict) -> None:
    path = _threshold_file(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a killed job never leaves half a file


def _resumed(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "load", None)) and getattr(args, "iteration", 0) > 0 \
        and not getattr(args, "finetune", False)


def resolve_sed_threshold(args: argparse.Namespace, model, forward_step: Optional[Callable],
                          datasets_provider: Optional[Callable]) -> Optional[float]:
    """The tau --sed-mask-ratio asks for in pretrain_gpt.py (None when nothing to do:
    --sed-threshold given, or no --sed-mask-ratio). Sets `args.sed_threshold`."""
    if args.sed_threshold is not None or getattr(args, "sed_mask_ratio", None) is None:
        return None
    if _resumed(args):
        path = _threshold_file(args.load)
        if not path.is_file():
            raise ValueError(
                f"--sed-mask-ratio: resuming from {args.load} (iteration {args.iteration}) but "
                f"{path} is missing, so the tau this run calibrated at its start is unknown; "
                "pass it as --sed-threshold (it is in the first run's log: 'calibrated SED "
                "threshold tau=...'), or use --finetune to calibrate on the loaded model"
            )
        record = json.loads(path.read_text())
        tau = float(record["tau"])
        print_rank_0(f" > megatron-sed: resumed run reuses the calibrated SED threshold "
                      f"tau={tau:.6f} from {path}")
    else:
        if forward_step is None or datasets_provider is None:
            raise ValueError(
                "--sed-mask-ratio needs the patched pretrain_gpt.py of this megatron-sed "
                "version (install_sed_loss(..., forward_step=..., datasets_provider=...)); "
                "re-apply scripts/apply_megatron_patch.sh or pass --sed-threshold"
            )
        result = calibrate_in_pretrain_gpt(args, model, forward_step, datasets_provider)
        tau = result.tau
        print_rank_0(" > megatron-sed: " + result.log_line().lstrip(" >"))
        if getattr(args, "save", None) and (not torch.distributed.is_initialized()
                                            or torch.distributed.get_rank() == 0):
            _write_threshold_file(args.save, {**result.to_dict(), "source": "calibrated",
                                              "loss_type": "sed"})
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the file exists for every rank once this returns
    args.sed_threshold = tau
    return tau


def calibrate_in_pretrain_gpt(args: argparse.Namespace, model, forward_step: Callable,
                              datasets_provider: Callable) -> CalibrationResult:
    """Run the model (wrapped as forward_step sees it) over the held-out samples and
    return tau (see the module doc). The model must already compute SED (its stats give
    the masked statistic); it is left in the train/eval mode it was in."""
    if getattr(args, "pipeline_model_parallel_size", 1) > 1:
        raise ValueError("--sed-mask-ratio calibration does not support pipeline parallelism "
                         "(only the last stage has logits); calibrate at PP=1 (e.g. with "
                         "megatron-sed-train) and pass --sed-threshold")
    num_samples = int(args.sed_calibration_samples)
    mbs = int(args.micro_batch_size)
    dp_rank, dp_size, gather_group = _groups()
    num_steps = math.ceil(num_samples / (dp_size * mbs))
    # Build exactly the samples needed; ranks that hold no data (TP rank > 0) get None
    # from Megatron's builder and receive the batch from TP rank 0 inside forward_step.
    _, valid_ds, _ = datasets_provider([1, num_steps * dp_size * mbs, 1])
    holds_data = valid_ds is not None
    from megatron.core import parallel_state as ps

    needs_data = ps.get_tensor_model_parallel_rank() == 0 if torch.distributed.is_initialized() else True
    short = needs_data and (not holds_data or len(valid_ds) < num_steps * dp_size * mbs)
    if _any_rank(short):
        size = len(valid_ds) if holds_data else 0
        raise ValueError(
            f"--sed-mask-ratio calibrates tau on --sed-calibration-samples {num_samples} held-out "
            f"samples, but the validation dataset has {size}: give --split a validation part "
            "(e.g. 98,2,0) or --valid-data-path, lower --sed-calibration-samples, or pass "
            "--sed-threshold"
        )
    batches = calibration_batches(valid_ds, num_steps, mbs, dp_rank, dp_size) if holds_data else None

    mask_kind = args.sed_mask
    local = []
    chunks = model if isinstance(model, list) else [model]
    was_training = [m.training for m in chunks]
    for m in chunks:
        m.eval()
    try:
        for step in range(num_steps):
            with torch.no_grad():
                _, loss_fn = forward_step(batches, model)
            loss_mask = loss_fn.args[0]  # forward_step returns partial(loss_func, loss_mask, ...)
            stats = pop_sed_stats()
            if stats is None:
                raise RuntimeError("--sed-mask-ratio: the model did not compute SED during "
                                   "calibration (is install_sed_loss applied to it?)")
            values = stats[mask_kind]  # [s, b]
            s, b = values.shape
            keep = loss_mask.reshape(b, s).t().bool()
            if b == mbs:  # drop rows past --sed-calibration-samples (not for packed THD batches)
                first = step * dp_size * mbs + dp_rank * mbs
                rows = torch.arange(first, first + b, device=keep.device) < num_samples
                keep = keep & rows.view(1, b)
            local.append(values[keep].float().reshape(-1))
    finally:
        for m, mode in zip(chunks, was_training):
            m.train(mode)
        _clear_moe_aux_losses()
    masses = torch.cat(local) if local else torch.zeros(0, device=_comm_device(gather_group))
    tau, n_tok, below = threshold_from_masses(masses, quantile_level(mask_kind, args.sed_mask_ratio),
                                              gather_group)
    return CalibrationResult(tau=tau, ratio=float(args.sed_mask_ratio), top_k=int(args.sed_top_k),
                             num_samples=num_samples, num_tokens=n_tok, fraction_below=below,
                             mask=mask_kind)


def _clear_moe_aux_losses() -> None:
    """MoE layers record aux losses on every forward; the calibration forwards must not
    show up in the first iteration's logged values."""
    try:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    except ImportError:
        return
    try:
        clear_aux_losses_tracker()
    except Exception:  # no tracker yet (dense model): nothing recorded
        pass
