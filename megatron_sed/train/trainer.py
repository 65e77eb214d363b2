"""The SFT trainer: setup (process groups, model, optimizer, data, checkpoint), the
training loop, evaluation and logging. CPU and GPU differ only in the loop machinery
(loop_cpu / loop_gpu) and the checkpoint writer."""

from __future__ import annotations

import datetime
import logging
import os
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from megatron_sed.rank0 import print_rank_0
from megatron_sed.train import loop_cpu
from megatron_sed.train.arguments import ArgumentError, parse_args
from megatron_sed.train.checkpoint import TRACKER, has_checkpoint, load_checkpoint, save_checkpoint
from megatron_sed.train.data import batch_iterator, build_datasets, to_model_inputs
from megatron_sed.train.metrics import MetricsWriter, format_eval_line, format_train_line
from megatron_sed.train.step import make_forward_step

logger = logging.getLogger("megatron_sed.train")


def print_rank_last(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(msg, flush=True)


def init_distributed(args) -> None:
    if not dist.is_initialized():
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "MASTER_ADDR" not in os.environ:  # plain `python -m megatron_sed.train`
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            args.distributed_backend,
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(args) -> None:
    """Megatron's seeding: same seed on every TP/DP rank (identical init), offset per PP stage."""
    seed = args.seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if args.device == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_scheduler(optimizer, args):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=None if args.lr_decay_style != "WSD" else args.lr_decay_iters * gbs // 10,
        lr_wsd_decay_style="linear",
    )


def _reduce_sums(reports: List[Dict]) -> Optional[torch.Tensor]:
    sums = [r["sed_sums"] for r in reports if r.get("sed_sums") is not None]
    if not sums:
        return None
    return torch.stack(sums).sum(0)


def _allreduce_dp(t: torch.Tensor) -> torch.Tensor:
    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, group=group)
    return t.cpu()


class Trainer:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.on_gpu = args.device == "cuda"
        self.train_ds, self.valid_ds, self.tokenizer = build_datasets(args)
        from megatron_sed.model import build_gpt_model, padded_vocab_size

        # keep at least a converted checkpoint's embedding rows (tokenizer may be smaller)
        vocab = max(args.vocab_size, getattr(args, "checkpoint_vocab_size", 0) or 0)
        args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                                   args.tensor_model_parallel_size)
        self.tau = self._initial_tau()
        self.model = build_gpt_model(
            args,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
            sed_config=self._sed_config(),
        )
        if self.on_gpu:
            from megatron_sed.train import loop_gpu

            self.wrapped = loop_gpu.wrap_model_gpu(self.model, args)
            self.optimizer = loop_gpu.build_gpu_optimizer(self.wrapped, args)
        else:
            self.wrapped = self.model
            self.optimizer = loop_cpu.build_cpu_optimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        self.iteration = 0
        self.consumed = 0
        self.tau_restored = False
        self.calibration = None  # megatron_sed.calibration.CalibrationResult as a dict
        self.ema = None
        if args.loss_type == "sed" and args.sed_threshold_update == "ema" and args.sed_mask_ratio is not None:
            from megatron_sed.calibration import ThresholdEMA

            self.ema = ThresholdEMA(args.sed_mask_ratio, args.sed_threshold_ema, self.tau, args.sed_mask)
        if args.load and not has_checkpoint(args.load):
            if args.finetune:  # fine-tuning random weights by accident is worse than failing
                raise FileNotFoundError(
                    f"--finetune --load {args.load}: no checkpoint there (no {TRACKER}, "
                    "no metadata.json)"
                )
            print_rank_0(
                f"WARNING: no checkpoint found at --load {args.load} "
                f"(no {TRACKER}): training from scratch"
            )
        elif args.load:
            state = load_checkpoint(args.load, self.wrapped, self.optimizer, self.scheduler, args)
            self.iteration, self.consumed = state["iteration"], state["consumed_train_samples"]
            saved_tau = state["sed"].get("threshold")
            # Resume: reuse the run's (calibrated / EMA-tracked) tau. --finetune starts a new
            # run from other weights: calibrate again instead (the paper's "initial model").
            if saved_tau is not None and args.sed_threshold is None and not args.finetune:
                self.tau = float(saved_tau)
                self.model.sed_config = self._sed_config()
                self.tau_restored = True
                self.calibration = state["sed"].get("calibration")
                if self.ema is not None and state["sed"].get("ema"):
                    self.ema.load_state_dict(state["sed"]["ema"])
            print_rank_0(f" > loaded checkpoint from {args.load} at iteration {self.iteration} "
                         f"(consumed samples {self.consumed})")
        if not self.tau_restored:
            self._maybe_calibrate()
        self.forward_step = make_forward_step(self.device, args.transformer_impl, args.pack,
                                              mask_stat=args.sed_mask if self.ema is not None else None)
        self.writer = MetricsWriter(args.metrics_file, args.tensorboard_dir,
                                    enabled=dist.get_rank() == dist.get_world_size() - 1)

    # -- SED threshold ------------------------------------------------------------------
    def _initial_tau(self):
        from megatron_sed.arguments import DEFAULT_SED_THRESHOLD

        return self.args.sed_threshold if self.args.sed_threshold is not None else DEFAULT_SED_THRESHOLD

    def _sed_config(self):
        from megatron_sed.arguments import sed_config_from_args

        return sed_config_from_args(self.args, threshold=self.tau)

    def sed_state(self) -> Dict:
        return {"threshold": self.tau, "mask": self.args.sed_mask, "top_k": self.args.sed_top_k,
                "coef": self.args.sed_coef, "calibration": self.calibration,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def _maybe_calibrate(self) -> None:
        """--sed-mask-ratio: set tau from held-out data with the initial model (the logic
        lives in megatron_sed.calibration; an explicit --sed-threshold wins)."""
        args = self.args
        if args.loss_type != "sed" or args.sed_mask_ratio is None or args.sed_threshold is not None:
            return
        if args.sed_mask not in ("topk_mass", "entropy"):
            print_rank_0(f" > --sed-mask-ratio ignored: --sed-mask {args.sed_mask} has no threshold")
            return
        if self.valid_ds is None or len(self.valid_ds) < args.sed_calibration_samples:
            have = 0 if self.valid_ds is None else len(self.valid_ds)
            raise ValueError(
                f"--sed-mask-ratio calibrates tau on --sed-calibration-samples "
                f"{args.sed_calibration_samples} held-out sequences, but the validation split has "
                f"{have}: lower the flag, or give a larger validation share (--split) or "
                "--valid-data-path")
        from megatron_sed.calibration import calibrate_model

        batches = (to_model_inputs(b, self.device, args.transformer_impl, args.pack)
                   for b in self._data_iterator(self.valid_ds, 0))
        res = calibrate_model(self.model, batches, ratio=args.sed_mask_ratio, top_k=args.sed_top_k,
                              num_samples=args.sed_calibration_samples,
                              dp_group=ps.get_data_parallel_group(),
                              tp_group=ps.get_tensor_model_parallel_group(), mask=args.sed_mask)
        print_rank_0(res.log_line())
        self.tau = res.tau
        self.calibration = res.to_dict()
        self.model.sed_config = self._sed_config()
        if self.ema is not None:
            self.ema.tau = res.tau

    def _update_ema(self, reports) -> None:
        """--sed-threshold-update ema: track the quantile on this batch; applies from the next."""
        stats = [r["mask_stat"] for r in reports if r.get("mask_stat") is not None]
        local = torch.cat(stats).cpu() if stats else torch.zeros(0)
        if self.on_gpu:
            local = local.to(self.device)
        self.tau = self.ema.update(local, ps.get_data_parallel_group())
        self.model.sed_config = self._sed_config()

    # -- loop -----------------------------------------------------------------------------
    def _data_iterator(self, dataset, consumed):
        return batch_iterator(dataset, self.args, consumed, ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size())

    def train_step(self, data_iterator):
        if self.on_gpu:
            from megatron_sed.train import loop_gpu

            return loop_gpu.train_step_gpu(self.forward_step, data_iterator, self.wrapped,
                                           self.optimizer, self.scheduler, self.args)
        return loop_cpu.train_step_cpu(self.forward_step, data_iterator, self.model, self.optimizer,
                                       self.scheduler, self.args)

    def evaluate(self) -> Optional[Dict]:
        from megatron_sed import summarize_sed_stat_sums

        if self.valid_ds is None:
            return None
        args = self.args
        self.wrapped.eval()
        it = self._data_iterator(self.valid_ds, 0)
        total = None
        with torch.no_grad():
            for _ in range(args.eval_iters):
                if self.on_gpu:
                    from megatron_sed.train import loop_gpu

                    reports = loop_gpu.eval_step_gpu(self.forward_step, it, self.wrapped, args)
                else:
                    reports, _ = loop_cpu.forward_backward_cpu(
                        self.forward_step, it, self.model, args.num_microbatches,
                        args.calculate_per_token_loss, forward_only=True)
                s = _reduce_sums(reports)
                if s is not None:
                    total = s if total is None else total + s
        self.wrapped.train()
        if total is None:
            return None
        return summarize_sed_stat_sums(_allreduce_dp(total))

    def train(self) -> Dict:
        from megatron_sed import summarize_sed_stat_sums

        args = self.args
        self.wrapped.train()
        data_iterator = self._data_iterator(self.train_ds, self.consumed)
        interval_sums = None
        interval_start = time.time()
        interval_iters = 0
        skipped = nan_iters = 0
        last = {}
        print_rank_0(f" > training {args.loss_type} from iteration {self.iteration} to {args.train_iters}: "
                     f"world {args.world_size} (TP {args.tensor_model_parallel_size}, PP "
                     f"{args.pipeline_model_parallel_size}, DP {args.data_parallel_size}), "
                     f"global batch {args.global_batch_size} = {args.num_microbatches} micro-batches x "
                     f"{args.micro_batch_size} x DP, device {args.device}")
        while self.iteration < args.train_iters:
            reports, grad_norm, _, ok = self.train_step(data_iterator)
            if self.ema is not None:
                self._update_ema(reports)
            self.iteration += 1
            self.consumed += args.global_batch_size
            interval_iters += 1
            if not ok:
                skipped += 1
                nan_iters += 1
            s = _reduce_sums(reports)
            if s is not None:
                interval_sums = s if interval_sums is None else interval_sums + s
            if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                elapsed = time.time() - interval_start
                sums = _allreduce_dp(interval_sums) if interval_sums is not None else None
                stats = summarize_sed_stat_sums(sums) if sums is not None else {}
                m = {
                    "iteration": self.iteration,
                    "consumed_samples": self.consumed,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "tokens_per_sec": interval_iters * args.global_batch_size * args.seq_length / max(elapsed, 1e-9),
                    "iter_time_ms": 1000.0 * elapsed / interval_iters,
                    "global_batch_size": args.global_batch_size,
                    "skipped_iterations": skipped,
                    "nan_iterations": nan_iters,
                }
                for k in ("lm_loss", "sed_reg", "sed_mask_rate", "entropy", "target_prob", "top1_acc",
                          "topk_mass", "num_tokens"):
                    if k in stats:
                        m[k] = stats[k]
                m["sed_threshold"] = self.tau
                print_rank_last(format_train_line(self.iteration, args.train_iters, m))
                self.writer.write({k: m[k] for k in m if k not in ("global_batch_size",)})
                last = m
                interval_sums, interval_iters, skipped, nan_iters = None, 0, 0, 0
                interval_start = time.time()
            if args.eval_interval and self.iteration % args.eval_interval == 0:
                self._run_eval()
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and self.iteration % args.exit_interval == 0:
                if args.save and not (args.save_interval and self.iteration % args.save_interval == 0):
                    self.save()
                print_rank_0(f" > exiting at iteration {self.iteration} (--exit-interval)")
                return last
        if args.save and not (args.save_interval and self.iteration % args.save_interval == 0):
            self.save()
        if args.eval_interval and self.iteration % args.eval_interval != 0:
            self._run_eval()
        return last

    def _run_eval(self):
        m = self.evaluate()
        if m is not None:
            print_rank_last(format_eval_line(self.iteration, m))
            self.writer.write({"iteration": self.iteration, **{f"valid_{k}": v for k, v in m.items()}},
                              prefix="valid")

    def save(self):
        t0 = time.time()
        path = save_checkpoint(self.args.save, self.iteration, self.wrapped, self.optimizer,
                               self.scheduler, self.args, self.consumed, self.sed_state())
        print_rank_0(f" > saved checkpoint {path} in {time.time() - t0:.2f}s")


def main(argv=None) -> int:
    # Like Megatron: informational output from rank 0 only.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s")
    try:
        args = parse_args(argv)
    except ArgumentError as err:
        print(f"megatron-sed-train: error: {err}", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    init_distributed(args)
    try:
        set_seed(args)
        trainer = Trainer(args)
        t0 = time.time()
        last = trainer.train()
        trainer.writer.close()
        if last:
            print_rank_last(
                f" > done: {trainer.iteration} iterations in {time.time() - t0:.1f}s; final lm loss "
                f"{last.get('lm_loss', float('nan')):.4f}, sed reg {last.get('sed_reg', float('nan')):.4f}, "
                f"top1 acc {last.get('top1_acc', float('nan')):.3f}, entropy "
                f"{last.get('entropy', float('nan')):.3f}")
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
