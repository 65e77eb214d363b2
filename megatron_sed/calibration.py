"""Calibrating the SED threshold tau (the paper's `cumsum_ratio`), and tracking it with an EMA.

The SED mask regularises token t when its top-k probability mass P_topk(t) < tau. The paper
sets tau once before training: run the *initial* model over held-out SFT samples, collect
P_topk of the supervised tokens and take the quantile at `ratio` (their cumsum_ratio 0.7 is
ratio 0.3 here), so that a fraction `ratio` of supervised tokens is regularised.

Choices made here (and why):
- Same k as the loss (the authors' code calibrates with k=10 but trains with k=2).
- Supervised (loss-masked) tokens only: the regulariser only ever sees those.
- Exact under data parallelism: every DP rank's masses are all-gathered (variable lengths)
  and the quantile is taken over the union, so the result is bit-identical to one process
  seeing all samples. The masses are small (4 bytes per supervised token; 100 samples of
  1k tokens = 400 kB), so no histogram approximation is needed. Tensor-parallel ranks
  already hold identical masses (the loss op combines the vocab shards), so the gather runs
  over the DP group only: gathering over TP too would duplicate every value.
- Quantile: linear interpolation between order statistics (numpy's / torch's default), in
  float64, so the fraction of tokens strictly below tau is `ratio` up to one token (plus
  ties). Implemented with sort + index, not torch.quantile, which refuses > 16M values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- pure math


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor with linear interpolation (numpy's default method),
    computed in float64."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must lie in [0, 1], got {q}")
    v = values.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        raise ValueError("cannot take a quantile of zero values (no supervised tokens?)")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("top-k masses contain NaN/inf: the model's logits are not finite")
    v, _ = torch.sort(v)
    pos = (v.numel() - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    frac = pos - lo
    return float(v[lo] + (v[hi] - v[lo]) * frac)


def fraction_below(values: torch.Tensor, tau: float) -> float:
    """Fraction of values strictly below tau: the share of tokens the SED mask would select."""
    v = values.reshape(-1)
    return float((v < tau).to(torch.float64).mean()) if v.numel() else float("nan")


# ----------------------------------------------------------------------------- distributed


def gather_variable_length(local: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths; returns their concatenation in rank
    order on every rank. No communication when torch.distributed is not initialised or the
    group has one rank."""
    local = local.reshape(-1)
    if not dist.is_available() or not dist.is_initialized():
        return local
    world = dist.get_world_size(group=group)
    if world == 1:
        return local
    size = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(bufs, sizes)])


def threshold_from_masses(local_masses: torch.Tensor, ratio: float, group=None) -> tuple[float, int, float]:
    """tau = the `ratio` quantile (a level in (0, 1)) of the masses of all ranks of `group` (the DP group).
    Returns (tau, number of tokens, fraction of tokens below tau), identical on every rank."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"quantile level must lie in (0, 1), got {ratio}")
    everything = gather_variable_length(local_masses.detach().float(), group)
    tau = exact_quantile(everything, ratio)
    return tau, int(everything.numel()), fraction_below(everything, tau)


# ----------------------------------------------------------------------------- model side

# Which side of tau the SED mask selects, per --sed-mask.
QUANTILE_SIDE = {"topk_mass": "below", "entropy": "above"}


def mask_statistic(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   top_k: int, tp_group=None, mask: str = "topk_mass") -> torch.Tensor:
    """The statistic the SED mask thresholds, for every supervised token, as a 1-D fp32
    tensor: P_topk (mask "topk_mass", the paper) or the entropy in nats (mask "entropy").

    logits: [s, b, V/tp] (this rank's vocab shard; not modified); labels and loss_mask:
    [b, s] (Megatron's batch layout). Uses the loss op itself, so the statistic is defined
    exactly as the mask in training sees it (same k, same vocab-parallel combination)."""
    from megatron_sed import SEDConfig, vocab_parallel_sed_loss

    if mask not in QUANTILE_SIDE:
        raise ValueError(f"threshold calibration needs --sed-mask topk_mass or entropy, got {mask!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got shape {tuple(logits.shape)}")
    s, b = logits.shape[0], logits.shape[1]
    if tuple(labels.shape) != (b, s) or tuple(loss_mask.shape) != (b, s):
        raise ValueError(
            f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must be "
            f"[b, s] = {(b, s)} for logits of shape {tuple(logits.shape)}"
        )
    cfg = SEDConfig(coef=1.0, top_k=int(top_k), threshold=1.0, mask="topk_mass")
    target = labels.t().contiguous().long()
    with torch.no_grad():
        _, stats = vocab_parallel_sed_loss(logits.detach().clone(), target, cfg, tp_group=tp_group)
    keep = loss_mask.t().bool()
    return stats[mask][keep].float().reshape(-1)


def topk_masses(logits, labels, loss_mask, top_k: int, tp_group=None) -> torch.Tensor:
    """P_topk of every supervised token (see mask_statistic)."""
    return mask_statistic(logits, labels, loss_mask, top_k, tp_group, "topk_mass")


def quantile_level(mask: str, ratio: float) -> float:
    """topk_mass regularises tokens BELOW tau (quantile `ratio`); entropy regularises tokens
    ABOVE tau (quantile 1 - ratio). Either way a fraction `ratio` is selected."""
    return ratio if QUANTILE_SIDE[mask] == "below" else 1.0 - ratio


@dataclass
class CalibrationResult:
    tau: float
    ratio: float
    top_k: int
    num_samples: int
    num_tokens: int
    fraction_below: float
    mask: str = "topk_mass"

    @property
    def fraction_selected(self) -> float:
        """Share of the calibration tokens the mask selects at this tau (about `ratio`)."""
        return self.fraction_below if QUANTILE_SIDE[self.mask] == "below" else 1.0 - self.fraction_below

    def log_line(self) -> str:
        what = f"top-{self.top_k} mass" if self.mask == "topk_mass" else "entropy"
        return (
            f" > calibrated SED threshold tau={self.tau:.6g} ({what}, --sed-mask-ratio "
            f"{self.ratio:g}) on {self.num_tokens} supervised tokens of {self.num_samples} "
            f"held-out samples: {100 * self.fraction_selected:.2f}% of them regularised"
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


def heldout_batches(dataset, num_steps: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int) -> Iterator[dict]:
    """This DP rank's micro-batches of `dataset`, in Megatron's order: at step i, rows
    i*dp*mbs + dp_rank*mbs + [0, mbs), collated like Megatron's DataLoader does. Rows past
    the end wrap around (the caller masks them out): every rank runs every step."""
    from torch.utils.data import default_collate

    n = len(dataset)
    for i in range(num_steps):
        first = i * dp_size * micro_batch_size + dp_rank * micro_batch_size
        items = [dataset[j % n] for j in range(first, first + micro_batch_size)]
        # Keys a dataset fills with None (e.g. no attention mask) stay None, as get_batch expects.
        yield {k: None if items[0][k] is None else default_collate([it[k] for it in items])
               for k in items[0]}


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on some rank (an error on one rank must stop
    all of them, not leave the others waiting in a collective)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def calibrate_with_forward_step(args, model, forward_step: Callable,
                                heldout: Callable[[int], object]) -> CalibrationResult:
    """tau for --sed-mask-ratio from the first --sed-calibration-samples rows of the
    held-out dataset `heldout(num_rows)` (it must hold at least that many rows; TP ranks
    other than 0 may get None when the data comes to them through forward_step).

    Each micro-batch runs through `forward_step(batches, model)` (Megatron's interface:
    it returns the model output and `partial(loss_func, loss_mask, ...)`) in eval mode
    without gradients; the model must compute SED, whose per-token statistics (popped
    from megatron_sed.model.loss_hook) give the masked statistic of every supervised
    token. Every data-parallel rank runs the same number of forwards (rows past the
    requested samples are masked out, not skipped: a rank that skipped a forward would
    leave the others waiting in its collectives). The quantile is exact over DP x CP.
    Pipeline parallelism is not supported (only the last stage has logits)."""
    from megatron.core import parallel_state as ps

    from megatron_sed.model.loss_hook import pop_sed_stats

    if getattr(args, "pipeline_model_parallel_size", 1) > 1:
        raise ValueError("--sed-mask-ratio calibration does not support pipeline parallelism "
                         "(only the last stage has logits); calibrate at PP=1 and pass "
                         "--sed-threshold")
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
            "--sed-threshold")
    batches = heldout_batches(dataset, num_steps, mbs, dp_rank, dp_size) if dataset is not None else None

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
                                   "calibration")
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


# ----------------------------------------------------------------------------- EMA tracking


class ThresholdEMA:
    """--sed-threshold-update ema: after each batch, re-estimate the `ratio` quantile of the
    top-k masses of that batch's supervised tokens (exact, gathered over DP) and track it:
    tau <- decay * tau + (1 - decay) * q_batch. The new tau applies from the next batch on
    (the current batch's mask was already computed with the old one). The state goes into
    the checkpoint so a resumed run continues the same trajectory."""

    def __init__(self, ratio: float, decay: float, tau: float, mask: str = "topk_mass"):
        if mask not in QUANTILE_SIDE:
            raise ValueError(f"--sed-threshold-update ema needs --sed-mask topk_mass or entropy, got {mask!r}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"--sed-mask-ratio must lie in (0, 1), got {ratio}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--sed-threshold-ema must lie in [0, 1), got {decay}")
        if mask == "topk_mass" and not 0.0 < tau <= 1.0:
            raise ValueError(f"initial tau must lie in (0, 1], got {tau}")
        self.mask = mask
        self.ratio = float(ratio)
        self.decay = float(decay)
        self.tau = float(tau)
        self.num_updates = 0
        self.last_batch_quantile = float("nan")

    def update(self, local_masses: torch.Tensor, group=None) -> float:
        """Feed this rank's statistic of the batch's supervised tokens (every DP rank calls
        it: the quantile is over the union); returns the new tau."""
        everything = gather_variable_length(local_masses.detach().float().reshape(-1), group)
        if everything.numel() == 0:  # a batch without supervised tokens: nothing to learn
            return self.tau
        q = exact_quantile(everything, quantile_level(self.mask, self.ratio))
        self.last_batch_quantile = q
        tau = self.decay * self.tau + (1.0 - self.decay) * q
        if self.mask == "topk_mass":  # a valid probability threshold (masses are > 0 anyway)
            tau = min(1.0, max(1e-12, tau))
        self.tau = tau
        self.num_updates += 1
        return self.tau

    def state_dict(self) -> dict:
        return {"tau": self.tau, "ratio": self.ratio, "decay": self.decay,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.tau = float(state["tau"])
        self.ratio = float(state["ratio"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
