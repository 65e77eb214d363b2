"""The GPU check's trainer runtime: the `syncs` rows (no host syncs), the `engine` rows
(megatron-sed-train on the device) and the `kernels` row of the THD context-parallel split.

Host syncs: torch.cuda.set_sync_debug_mode("error") (on CPU, the dry run uses the
TorchFunctionMode stand-in of tests/helpers/host_sync.py) around an SED forward/backward
(Triton with a fixed and with a tensor tau, torch), one EMA tracker step, and a training
step of a tiny plugin GPTModel (forward with the SED loss hook at a fixed tau, masked
mean, backward). Megatron's loop around it (optimizer, logging) syncs by design and is
not checked here.

Engine: `python -m megatron_sed.train` subprocesses on a tiny model and the built-in
synthetic set: 3 iterations --bf16 (saving a checkpoint), 3 iterations --fp16, and
--finetune from that checkpoint with --lr 0, whose validation loss must equal the saved
model's (the weights do not move); --fp8-format hybrid only where Transformer Engine
imports.

THD split: megatron_sed's torch split of packed samples under context parallelism
against Transformer Engine's tex.thd_get_partitioned_indices.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from gpu_check_registry import FAIL, PASS, Check, Context, Outcome, skip, verdict

from megatron_sed import SEDConfig, vocab_parallel_sed_loss
from megatron_sed.calibration import ThresholdEMA


def checks(dry_run: bool) -> list[Check]:
    return [
        Check("kernels", "THD CP split = TE's", thd_partition_row),
        Check("syncs", "SED fwd+bwd triton, fixed tau", without_syncs(sed_step, "triton", False)),
        Check("syncs", "SED fwd+bwd triton, tensor tau", without_syncs(sed_step, "triton", True)),
        Check("syncs", "SED fwd+bwd torch, fixed tau", without_syncs(sed_step, "torch", False)),
        Check("syncs", "EMA tracker step", without_syncs(ema_step)),
        Check("syncs", "tiny GPTModel training step, fixed tau", without_syncs(model_step)),
        Check("engine", "bf16 train + save", bf16_row),
        Check("engine", "fp16 train", fp16_row),
        Check("engine", "finetune --lr 0", finetune_row),
        Check("engine", "fp8 hybrid", fp8_row),
    ]


# -- host syncs -----------------------------------------------------------------------


def without_syncs(step, *args):
    """The check that `step(device, *args)` runs without a host sync (one raises: a FAIL
    row saying where, written by the runner)."""
    return partial(sync_row, step=step, args=args)


def sync_row(ctx: Context, step, args) -> Outcome:
    step(ctx.device, *args)
    how = 'set_sync_debug_mode("error")' if ctx.device.type == "cuda" else "CPU stand-in (TorchFunctionMode)"
    return Outcome(PASS, "no sync", how)


@contextlib.contextmanager
def no_host_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        from megatron_sed.ops import sed_loss
        from tests.helpers.host_sync import NoHostSync

        # the op's synchronous target check runs on CPU tensors only (asynchronous on CUDA)
        with NoHostSync(allowed=(sed_loss._check_inputs,)):
            yield


def sed_step(device, impl: str, tensor_tau: bool):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(64, 2, 4096 if device.type == "cuda" else 256, generator=g, device=device) * 3).to(
        torch.bfloat16
    )
    x.requires_grad_(True)
    t = torch.randint(0, x.shape[-1], (64, 2), generator=g, device=device)
    tau = torch.tensor(0.7, dtype=torch.float64, device=device) if tensor_tau else 0.7
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=tau, impl=impl)
    with no_host_sync(device):
        loss, _ = vocab_parallel_sed_loss(x, t, cfg)
        loss.sum().backward()


def ema_step(device):
    ema = ThresholdEMA(0.3, 0.9, 0.9, device=device)
    values = torch.rand(128, 2, device=device)
    mask = (torch.rand(2, 128, device=device) < 0.8).float()
    with no_host_sync(device):
        for _ in range(2):
            ema.observe(values, mask.t())
        ema.step()


def model_step(device):
    """A tiny plugin GPTModel: forward with the SED loss hook (fixed tau), the loss
    function's masked mean and the SED report, backward."""
    from gpu_loss_bench import init_megatron_tp1

    from megatron_sed.model import build_gpt_model
    from megatron_sed.model.sed_route import SEDLossContext, attach_sed
    from megatron_sed.ops.stats import sed_report
    from tests.helpers.model_args import tiny_model_args

    init_megatron_tp1(device)
    torch.manual_seed(0)
    args = tiny_model_args(
        device=device.type, padded_vocab_size=512, seq_length=64, max_position_embeddings=64
    )
    if device.type == "cuda":
        args.bf16 = True
    model = build_gpt_model(args).to(device)
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.9)
    tokens = torch.randint(0, 500, (2, 64), device=device)
    pos = torch.arange(64, device=device).repeat(2, 1)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(2, 64, device=device)
    # warm-up (first-call allocations, lazy inits)
    model(tokens, pos, None, labels=labels, **attach_sed(model, SEDLossContext(cfg)))
    with no_host_sync(device):
        ctx = SEDLossContext(cfg)
        per_token = model(tokens, pos, None, labels=labels, **attach_sed(model, ctx))
        loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
        sed_report(ctx.take_stats(), loss_mask)
        loss.backward()


# -- THD context-parallel split --------------------------------------------------------


def thd_partition_row(ctx: Context) -> Outcome:
    """megatron_sed's torch THD split (the one the trainer uses
    for packed samples under context parallelism) against Transformer Engine's
    tex.thd_get_partitioned_indices, for random samples padded to 2 x CP, CP 2 / 4 / 8,
    every rank. Without TE: SKIP, after checking that the torch split puts every token on
    exactly one rank."""
    from megatron_sed.model.context_parallel import thd_partition_indices

    try:
        import transformer_engine_torch as tex
    except ImportError:
        tex = None
    device = ctx.device
    g = torch.Generator().manual_seed(0)
    cases = 0
    for cp in (2, 4, 8):
        lengths = torch.randint(1, 40, (12,), generator=g) * 2 * cp
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        total = int(cu[-1])
        ours = [thd_partition_indices(cu.to(device), total, cp, r) for r in range(cp)]
        if sorted(torch.cat(ours).tolist()) != list(range(total)):
            return Outcome(FAIL, f"CP {cp}", "the torch split does not put every token on one rank")
        if tex is not None:
            for r in range(cp):
                theirs = tex.thd_get_partitioned_indices(cu.to(device), total, cp, r)
                if not torch.equal(ours[r], theirs.to(ours[r].dtype)):
                    return Outcome(FAIL, f"CP {cp} rank {r}", "differs from tex.thd_get_partitioned_indices")
                cases += 1
    if tex is None:
        return skip("transformer_engine_torch not importable (the torch split covers every token once)")
    return Outcome(
        PASS, f"{cases} ranks", "equal to tex.thd_get_partitioned_indices, CP 2/4/8, 12 samples each"
    )


# -- engine ---------------------------------------------------------------------------


def te_available() -> bool:
    from megatron_sed.model.specs import te_available as te

    return te()


def engine_flags(tmp: Path, dry: bool) -> list[str]:
    from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags

    flags = [*TINY_MODEL, *RUN, *synthetic_flags(tmp, 40), "--loss-type", "sed", "--sed-threshold", "0.95"]
    if not dry and not te_available():
        flags += ["--transformer-impl", "local"]
    return flags


def run_engine(tmp: Path, name: str, flags: list[str], timeout: float):
    """One megatron-sed-train process, with its own rendezvous: this process's group
    (MASTER_PORT etc., set for the kernel checks) must not leak into it."""
    import os

    from tests.helpers.engine import train

    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        return train(tmp, name, 1, flags, timeout=timeout)
    finally:
        os.environ.update(saved)


def finite(values) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


ENGINE_TIMEOUT = 300  # seconds per trainer run


def engine_dir(ctx: Context) -> Path:
    return ctx.once("engine dir", lambda: Path(tempfile.mkdtemp(prefix="gpu_check_engine_")))


def engine_iters(ctx: Context) -> str:
    return "2" if ctx.dry_run else "3"


def engine_run(ctx: Context, name: str, extra: list[str]):
    """(run or None, seconds, None or the failure's last line): one trainer run of the
    tiny model with `extra` flags."""
    tmp = engine_dir(ctx)
    t0 = time.time()
    try:
        run = run_engine(tmp, name, [*engine_flags(tmp, ctx.dry_run), *extra], ENGINE_TIMEOUT)
        return run, time.time() - t0, None
    except Exception as exc:  # noqa: BLE001 - a failed run is a FAIL row saying why (its last line)
        return None, time.time() - t0, str(exc).splitlines()[-1][:200] if str(exc) else type(exc).__name__


def bf16_run(ctx: Context):
    """The bf16 run, which saves the checkpoint the finetune row loads: run once."""
    iters = engine_iters(ctx)
    ck = str(engine_dir(ctx) / "ck")
    flags = ["--bf16", "--train-iters", iters, "--save", ck, "--save-interval", iters]
    return ctx.once("engine bf16", lambda: engine_run(ctx, "bf16", flags))


def trained_row(run, secs: float, err, iters) -> Outcome:
    """PASS: the run finished with finite lm losses (`iters` of them unless None)."""
    losses = run.series("lm_loss") if run is not None else []
    ok = run is not None and (iters is None or len(losses) == int(iters)) and finite(losses)
    detail = err or f"{len(losses)} iterations, lm loss {[round(x, 4) for x in losses]}"
    return verdict(ok, f"{secs:.0f} s", detail)


def bf16_row(ctx: Context) -> Outcome:
    return trained_row(*bf16_run(ctx), engine_iters(ctx))


def fp16_row(ctx: Context) -> Outcome:
    if ctx.dry_run:
        return skip("dry run: the bf16 run's code path with --fp16")
    iters = engine_iters(ctx)
    return trained_row(*engine_run(ctx, "fp16", ["--fp16", "--train-iters", iters]), iters)


def finetune_row(ctx: Context) -> Outcome:
    """--finetune --lr 0 from the bf16 run's checkpoint: the validation loss must not move."""
    bf16, _, _ = bf16_run(ctx)
    if bf16 is None:
        return skip("no checkpoint (the bf16 run failed)")
    flags = ["--bf16", "--load", str(engine_dir(ctx) / "ck"), "--finetune", "--lr", "0", "--min-lr", "0"]
    ft, secs, err = engine_run(ctx, "finetune", [*flags, "--lr-warmup-iters", "0", "--train-iters", "2"])
    if ft is None:
        return Outcome(FAIL, f"{secs:.0f} s", err)
    saved = [r.get("valid_lm_loss") for r in bf16.valid][-1:]
    after = [r.get("valid_lm_loss") for r in ft.valid]
    ok = bool(saved) and bool(after) and all(a == saved[0] for a in after)
    return verdict(
        ok, f"{secs:.0f} s", f"validation lm loss of the saved model {saved} vs after lr-0 steps {after}"
    )


def fp8_row(ctx: Context) -> Outcome:
    if ctx.device.type != "cuda":
        return skip("dry run on CPU")
    if not te_available():
        return skip("Transformer Engine does not import here")
    flags = ["--bf16", "--fp8-format", "hybrid", "--train-iters", engine_iters(ctx)]
    return trained_row(*engine_run(ctx, "fp8", flags), None)
