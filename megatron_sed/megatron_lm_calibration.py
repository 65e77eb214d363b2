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
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_sed.calibration import CalibrationResult, calibrate_with_forward_step
from megatron_sed.rank0 import print_rank_0

__all__ = ["THRESHOLD_FILE", "calibrate_in_pretrain_gpt", "resolve_sed_threshold"]

THRESHOLD_FILE = "sed_threshold.json"


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
    """tau from pretrain_gpt's own validation dataset and forward_step (the engine is
    megatron_sed.calibration.calibrate_with_forward_step). Rows are what pretrain_gpt's
    dataset yields: sequences of --seq-length tokens (packed for --sft)."""

    def heldout(num_rows):
        # Ranks that hold no data (TP rank > 0) get None from Megatron's builder and receive
        # the batch from TP rank 0 inside forward_step.
        return datasets_provider([1, num_rows, 1])[1]

    return calibrate_with_forward_step(args, model, forward_step, heldout)
