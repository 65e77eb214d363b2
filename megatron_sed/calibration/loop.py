"""The calibration loop: tau for --sed-mask-ratio from held-out samples run through a
Megatron-style forward_step, so megatron-sed-train and the Megatron-LM glue feed the same
steps (collect the statistic at the recipe's positions -> gather over DP x CP -> the
recipe's order statistic).

The SED mask regularises token t when its top-k probability mass P_topk(t) < tau. The paper
sets tau once before training by running the *initial* model over held-out samples; the
recipes (megatron_sed.calibration.recipes, --sed-calibration) say which statistic, over
which positions and which order statistic: the authors' (top-10 mass at every position)
or the supervised one (the loss's own statistic at the supervised tokens). The caller's
forward_step computes SED with the recipe's k, and its loss mask marks the positions
that count (the callers build the held-out samples accordingly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.utils.data import default_collate

from megatron_sed.calibration.quantile import QUANTILE_SIDE, fraction_below, gather_variable_length
from megatron_sed.calibration.recipes import recipe_from_args
from megatron_sed.model.sed_route import last_sed_context


@dataclass
class CalibrationResult:
    tau: float
    ratio: float
    top_k: int  # k of the calibration's top-k mass (the recipe's)
    num_samples: int
    num_tokens: int  # positions counted (supervised tokens, or every position: authors)
    fraction_below: float
    mask: str = "topk_mass"
    recipe: str = "supervised"

    @property
    def fraction_selected(self) -> float:
        """Share of the calibration positions the mask selects at this tau."""
        return self.fraction_below if QUANTILE_SIDE[self.mask] == "below" else 1.0 - self.fraction_below

    def log_line(self) -> str:
        what = f"top-{self.top_k} mass" if self.mask == "topk_mass" else "entropy"
        if self.recipe == "authors":
            return (
                f" > calibrated SED threshold tau={self.tau:.6g} (authors' recipe: {what} at all "
                f"{self.num_tokens} positions of {self.num_samples} held-out samples, "
                f"sorted(x)[-int({1 - self.ratio:g} N)], --sed-mask-ratio {self.ratio:g}): "
                f"{100 * self.fraction_selected:.2f}% of those positions below tau; the share of "
                "supervised tokens regularised is the log's 'sed mask rate'"
            )
        return (
            f" > calibrated SED threshold tau={self.tau:.6g} (supervised recipe: {what}, "
            f"--sed-mask-ratio {self.ratio:g}) on {self.num_tokens} supervised tokens of "
            f"{self.num_samples} held-out samples: {100 * self.fraction_selected:.2f}% of them regularised"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _comm_device(group) -> torch.device:
    """Where an (empty) tensor must live to take part in a collective of `group`."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_and_size(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=group), dist.get_world_size(group=group)
    return 0, 1


def heldout_batches(
    dataset, num_steps: int, micro_batch_size: int, dp_rank: int, dp_size: int, num_samples=None
) -> Iterator[dict]:
    """This DP rank's micro-batches of `dataset`, in Megatron's order: at step i, rows
    i*dp*mbs + dp_rank*mbs + [0, mbs), collated like Megatron's DataLoader does. Rows past
    the end wrap around: every rank runs every step. Rows from `num_samples` on get a zero
    loss mask, so they count for no layout (the THD layout flattens the rows and context
    parallelism splits them: the loss mask is what travels with every token)."""

    n = len(dataset)
    for i in range(num_steps):
        first = i * dp_size * micro_batch_size + dp_rank * micro_batch_size
        items = [dataset[j % n] for j in range(first, first + micro_batch_size)]
        if num_samples is not None:
            items = [
                it if first + r < num_samples else {**it, "loss_mask": torch.zeros_like(it["loss_mask"])}
                for r, it in enumerate(items)
            ]
        # Keys a dataset fills with None (e.g. no attention mask) stay None, as get_batch expects.
        yield {k: None if items[0][k] is None else default_collate([it[k] for it in items]) for k in items[0]}


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on some rank (an error on one rank must stop
    all of them, not leave the others waiting in a collective)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def calibrate_with_forward_step(
    args, model, forward_step: Callable, heldout: Callable[[int], object]
) -> CalibrationResult:
    """tau for --sed-mask-ratio from the first --sed-calibration-samples rows of the
    held-out dataset `heldout(num_rows)` (it must hold at least that many rows; TP ranks
    other than 0 may get None when the data comes to them through forward_step).

    Each micro-batch runs through `forward_step(batches, model)` (Megatron's interface:
    it returns the model output and `partial(loss_func, loss_mask, ...)`) in eval mode
    without gradients; the model must compute SED with the recipe's top-k (the caller
    configures it), whose per-token statistics (popped from megatron_sed.model.loss_hook)
    give the statistic at every position the returned loss mask marks (the supervised
    tokens, or every position for the authors' recipe: the caller's held-out samples say
    which). Every data-parallel rank runs the same number of forwards (rows past the
    requested samples are masked out, not skipped: a rank that skipped a forward would
    leave the others waiting in its collectives). The order statistic is exact over DP x CP.
    Pipeline parallelism is refused when the flags are validated (megatron_sed.flags:
    only the last stage has logits)."""

    num_samples = int(args.sed_calibration_samples)
    mbs = int(args.micro_batch_size)
    if dist.is_initialized():
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        gather_group = ps.get_data_parallel_group(with_context_parallel=True)
        needs_data = ps.get_tensor_model_parallel_rank() == 0
    else:
        dp_rank, dp_size, gather_group, needs_data = 0, 1, None, True
    num_steps = math.ceil(num_samples / (dp_size * mbs))
    dataset = heldout(num_steps * dp_size * mbs)
    have = len(dataset) if dataset is not None else 0
    if _any_rank(needs_data and have < num_samples):
        raise ValueError(
            f"--sed-mask-ratio calibrates tau on --sed-calibration-samples {num_samples} held-out "
            f"samples, but the validation data has {have}: give --split a validation part "
            "(e.g. 98,2,0) or --valid-data-path, lower --sed-calibration-samples, or pass "
            "--sed-threshold"
        )
    batches = (
        heldout_batches(dataset, num_steps, mbs, dp_rank, dp_size, num_samples)
        if dataset is not None
        else None
    )

    recipe = recipe_from_args(args)
    mask_kind = recipe.mask
    local = []
    chunks = model if isinstance(model, list) else [model]
    was_training = [m.training for m in chunks]
    for m in chunks:
        m.eval()
    try:
        for _ in range(num_steps):
            with torch.no_grad():
                _, loss_fn = forward_step(batches, model)
            loss_mask = loss_fn.args[0]  # forward_step returns partial(loss_func, loss_mask, ...)
            # the forward's SED context: handed to megatron-sed-train's loss_func, or the
            # model's latest (Megatron-LM's pretrain_gpt.py)
            ctx = (getattr(loss_fn, "keywords", None) or {}).get("sed") or last_sed_context(model)
            stats = ctx.take_stats() if ctx is not None else None
            if stats is None:
                raise RuntimeError("--sed-mask-ratio: the model did not compute SED during calibration")
            values = stats[mask_kind]  # [s, b]
            s, b = values.shape
            keep = loss_mask.reshape(b, s).t().bool()  # rows past num_samples: all False
            local.append(values[keep].float().reshape(-1))
    finally:
        for m, mode in zip(chunks, was_training):
            m.train(mode)
        _clear_moe_aux_losses()
    masses = torch.cat(local) if local else torch.zeros(0, device=_comm_device(gather_group))
    everything = gather_variable_length(masses.detach().float(), gather_group)
    tau = recipe.threshold(everything)
    return CalibrationResult(
        tau=tau,
        ratio=float(args.sed_mask_ratio),
        top_k=recipe.top_k,
        num_samples=num_samples,
        num_tokens=int(everything.numel()),
        fraction_below=fraction_below(everything, tau),
        mask=mask_kind,
        recipe=recipe.name,
    )


def _clear_moe_aux_losses() -> None:
    """MoE layers record aux losses on every forward; the calibration forwards must not
    show up in the first iteration's logged values."""
    try:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker  # noqa: PLC0415 (absent in some megatron-core versions)
    except ImportError:
        return
    try:
        clear_aux_losses_tracker()
    except Exception:  # no tracker yet (dense model): nothing recorded
        pass
