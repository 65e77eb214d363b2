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
from collections.abc import Callable, Iterable
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
            f" > calibrated SED threshold tau={self.tau:.6f} ({what}, --sed-mask-ratio "
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


def calibrate_threshold(
    logits_fn: Callable[[dict], torch.Tensor],
    batches: Iterable[dict],
    *,
    ratio: float,
    top_k: int,
    num_samples: int,
    dp_group=None,
    tp_group=None,
    mask: str = "topk_mass",
) -> CalibrationResult:
    """Run the (initial) model over the first `num_samples` held-out samples and return tau.

    batches: this DP rank's micro-batches, dicts with "labels" and "loss_mask" ([b, s]) plus
        whatever logits_fn needs. The global sample order is Megatron's: at step i, DP rank r
        holds rows i*dp*mbs + r*mbs + [0, mbs); rows past `num_samples` are dropped, so the
        selected samples (and tau) do not depend on the DP size.
    logits_fn(batch) -> [s, b, V/tp] logits of the model in eval mode (called under no_grad).
    Every DP rank must be given the same number of batches (it is: they step together).
    """
    if num_samples < 1:
        raise ValueError(f"--sed-calibration-samples must be >= 1, got {num_samples}")
    dp_rank, dp_size = _rank_and_size(dp_group)
    local: list[torch.Tensor] = []
    seen = 0  # global rows consumed before the current step
    it = iter(batches)
    while seen < num_samples:
        try:
            batch = next(it)
        except StopIteration:
            break
        mbs = int(batch["labels"].shape[0])
        first = seen + dp_rank * mbs
        take = max(0, min(mbs, num_samples - first))
        if take > 0:
            with torch.no_grad():
                logits = logits_fn(batch)
            local.append(mask_statistic(logits[:, :take], batch["labels"][:take],
                                        batch["loss_mask"][:take], top_k, tp_group, mask))
        seen += dp_size * mbs
    used = min(seen, num_samples)
    if used < num_samples:
        raise ValueError(
            f"--sed-calibration-samples {num_samples}: the held-out data has only {used} "
            "samples; lower the flag or give a larger validation split"
        )
    masses = torch.cat(local) if local else torch.zeros(0, device=_comm_device(dp_group))
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--sed-mask-ratio must lie in (0, 1), got {ratio}")
    tau, n_tok, below = threshold_from_masses(masses, quantile_level(mask, ratio), dp_group)
    return CalibrationResult(tau=tau, ratio=ratio, top_k=int(top_k), num_samples=used,
                             num_tokens=n_tok, fraction_below=below, mask=mask)


def calibrate_model(model, batches: Iterable[dict], *, ratio: float, top_k: int, num_samples: int,
                    dp_group=None, tp_group=None, mask: str = "topk_mass") -> CalibrationResult:
    """calibrate_threshold for a Megatron-Core GPTModel (e.g. megatron_sed's SEDGPTModel).

    batches: model-input dicts as the trainer builds them (tokens, position_ids,
    attention_mask, labels, loss_mask [b, s], optional packed_seq_params), this DP rank's
    share in Megatron's order. The model runs in eval mode (no dropout) without labels,
    so it returns logits [b, s, V/tp]. Pipeline parallelism is not supported here (only
    the last stage has logits): pass --sed-threshold explicitly for PP > 1."""
    if getattr(getattr(model, "config", None), "pipeline_model_parallel_size", 1) > 1:
        raise ValueError("--sed-mask-ratio calibration does not support pipeline parallelism; "
                         "calibrate at PP=1 and pass --sed-threshold")

    def logits_fn(b):
        out = model(b["tokens"], b["position_ids"], b["attention_mask"],
                    packed_seq_params=b.get("packed_seq_params"))
        return out.transpose(0, 1)  # [b, s, V/tp] -> [s, b, V/tp], a view

    was_training = model.training
    model.eval()
    try:
        return calibrate_threshold(logits_fn, batches, ratio=ratio, top_k=top_k,
                                   num_samples=num_samples, dp_group=dp_group,
                                   tp_group=tp_group, mask=mask)
    finally:
        model.train(was_training)


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
