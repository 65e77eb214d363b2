"""python -m megatron_sed.rl: GRPO on a checkpoint of megatron-sed-train (or of an earlier
RL run, which it resumes), on one process. See docs/rl.md.

    python -m megatron_sed.rl --load ckpt/sft --save ckpt/rl --prompts train.jsonl \\
        --eval-prompts test.jsonl --eval-interval 5 --train-iters 20 --lr 1e-4 \\
        --metrics-file rl.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_sed.checkpointing import single_process_group
from megatron_sed.checkpointing.layout import CheckpointError, has_checkpoint
from megatron_sed.data.tokenizer import sft_tokenizer_from_args
from megatron_sed.eval.loading import load_model
from megatron_sed.eval.prompts import PromptsFileError, load_prompts
from megatron_sed.eval.run import eval_system_prompt
from megatron_sed.rl.checkpoint import save_rl_checkpoint
from megatron_sed.rl.config import GRPOConfig
from megatron_sed.rl.train import LoopOptions, make_optimizer, train_grpo

_D = GRPOConfig()  # the defaults, shown in --help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_sed.rl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("checkpoints and data")
    g.add_argument(
        "--load",
        required=True,
        help="a trainer --save dir (or iter_/release dir), or an RL --save dir to resume",
    )
    g.add_argument(
        "--ckpt-step", type=int, default=None, help="iteration of a --load save dir (default: latest)"
    )
    g.add_argument("--save", default=None, help="save dir (trainer layout); default: no checkpoint")
    g.add_argument(
        "--save-interval", type=int, default=0, help="also save every N iterations (always at the end)"
    )
    g.add_argument(
        "--prompts", required=True, help="training prompts: JSON lines with question|prompt|messages + answer"
    )
    g.add_argument("--num-prompts", type=int, default=None, help="use only the first N training prompts")
    g.add_argument("--eval-prompts", default=None, help="held-out prompts (same format) for avg@n / pass@n")
    g.add_argument("--eval-num-prompts", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=0, help="evaluate every N iterations (0: never)")
    g.add_argument("--eval-n", type=int, default=None, help="samples per held-out prompt (default: --n)")
    g.add_argument("--system-prompt", default=None, help="as megatron-sed-eval's (default: the checkpoint's)")
    g.add_argument(
        "--metrics-file", default=None, help="JSON lines, one record per iteration (written atomically)"
    )
    g.add_argument("--log-interval", type=int, default=1)
    g = p.add_argument_group("GRPO (defaults: the authors' verl settings)")
    g.add_argument(
        "--train-iters", type=int, required=True, help="total RL iterations (a resumed run continues)"
    )
    g.add_argument("--n", type=int, default=_D.n, help="rollouts per prompt")
    g.add_argument("--temperature", type=float, default=_D.temperature)
    g.add_argument("--top-p", type=float, default=_D.top_p)
    g.add_argument("--max-new-tokens", type=int, default=_D.max_new_tokens)
    g.add_argument("--prompts-per-step", type=int, default=_D.prompts_per_step, help="verl train_batch_size")
    g.add_argument(
        "--mini-batch-prompts", type=int, default=_D.mini_batch_prompts, help="verl ppo_mini_batch_size"
    )
    g.add_argument("--micro-batch-size", type=int, default=_D.micro_batch_size, help="sequences per forward")
    g.add_argument("--ppo-epochs", type=int, default=_D.ppo_epochs)
    g.add_argument("--clip-low", type=float, default=_D.clip_low)
    g.add_argument("--clip-high", type=float, default=_D.clip_high)
    g.add_argument("--clip-ratio-c", type=float, default=_D.clip_ratio_c, help="dual clip for A < 0; 0: off")
    g.add_argument("--entropy-coeff", type=float, default=_D.entropy_coeff)
    g.add_argument(
        "--reward",
        default=_D.reward,
        help="boxed: the last \\boxed{} answer matches (the authors'); checked: also every equation "
        "holds and the last one gives the boxed answer (for tasks whose answer is in the prompt)",
    )
    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", type=float, default=_D.lr, help="the authors' 1e-6 is for 3B/7B; toy models ~1e-4")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    g.add_argument("--adam-beta1", type=float, default=_D.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=_D.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=_D.adam_eps)
    g.add_argument("--clip-grad", type=float, default=_D.clip_grad, help="gradient norm clip (0: off)")
    g.add_argument("--seed", type=int, default=_D.seed)
    return p


def config_from_args(args) -> GRPOConfig:
    return GRPOConfig(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        prompts_per_step=args.prompts_per_step,
        mini_batch_prompts=args.mini_batch_prompts,
        micro_batch_size=args.micro_batch_size,
        ppo_epochs=args.ppo_epochs,
        clip_low=args.clip_low,
        clip_high=args.clip_high,
        clip_ratio_c=args.clip_ratio_c or None,
        entropy_coeff=args.entropy_coeff,
        lr=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        seed=args.seed,
        reward=args.reward,
    )


def _check_flags(args) -> None:
    for name in ("train_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_interval", "eval_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.eval_interval and not args.eval_prompts:
        raise ValueError("--eval-interval needs --eval-prompts")
    if args.eval_n is not None and args.eval_n < 1:
        raise ValueError(f"--eval-n must be >= 1, got {args.eval_n}")


def _history(metrics_file, upto: int) -> list[dict]:
    """The records of a resumed run up to its checkpoint (later ones are redone)."""
    if not metrics_file or not Path(metrics_file).is_file():
        return []
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("iteration", 0) <= upto]


def run(args) -> list[dict]:
    cfg = config_from_args(args)
    _check_flags(args)
    if args.save and has_checkpoint(args.save) and Path(args.save).resolve() != Path(args.load).resolve():
        raise CheckpointError(
            f"--save {args.save} already holds a checkpoint: resume with --load {args.save}"
        )
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            return _run(args, cfg)
        finally:
            ps.destroy_model_parallel()


def _run(args, cfg: GRPOConfig) -> list[dict]:
    model, _, ckpt_dir, common = load_model(args.load, args.ckpt_step, flag="--ckpt-step")
    ckpt_args = common["args"]
    tok = sft_tokenizer_from_args(ckpt_args)
    system = eval_system_prompt(args, ckpt_args)
    prompts = load_prompts(args.prompts, args.num_prompts, system)
    eval_prompts = (
        load_prompts(args.eval_prompts, args.eval_num_prompts, system) if args.eval_prompts else None
    )
    optimizer = make_optimizer(model, cfg)
    rl_state = common.get("rl_state")
    start = int(common.get("iteration", 0)) if rl_state else 0  # a trainer checkpoint: start at 0
    if rl_state:
        optimizer.load_state_dict(rl_state["optimizer"])  # exact resume: Adam moments too
    source = rl_state["source"] if rl_state else str(ckpt_dir)
    print(
        f" > loaded {ckpt_dir} ({'resuming RL at' if rl_state else 'SFT checkpoint, iteration'} "
        f"{common.get('iteration', 0)}); {len(prompts)} training prompts; {cfg.updates_per_step} "
        f"updates per iteration",
        flush=True,
    )

    def save(it: int) -> None:
        if args.save:
            out = save_rl_checkpoint(
                args.save, it, model, ckpt_args, optimizer, dict(config=cfg.to_dict(), source=source)
            )
            print(f" > saved {out}", flush=True)

    opts = LoopOptions(
        train_iters=args.train_iters,
        start_iteration=start,
        log_interval=args.log_interval,
        eval_prompts=eval_prompts,
        eval_interval=args.eval_interval,
        eval_n=args.eval_n,
        metrics_file=args.metrics_file,
        save_interval=args.save_interval,
        save=save,
        history=_history(args.metrics_file, start) if rl_state else [],
    )
    return train_grpo(model, tok, prompts, cfg, opts, optimizer)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        run(args)
    except (CheckpointError, PromptsFileError, ValueError) as err:
        print(f"megatron_sed.rl: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f" > done in {time.time() - t0:.1f} s", flush=True)
