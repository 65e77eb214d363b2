"""megatron-sed: SED-SFT for Megatron-Core.

Public API::

    from megatron_sed import SEDConfig, vocab_parallel_sed_loss
    loss, stats = vocab_parallel_sed_loss(vocab_parallel_logits, target, cfg, tp_group=None)

`stats` is an SEDStats (one [s, b] tensor per statistic; also a read-only mapping);
`reduce_sed_stats(stats, loss_mask, group)` gives the means a training log shows.
"""

from megatron_sed.utils import fallbacks as _fallbacks

_fallbacks.collect()  # before anything imports megatron-core (see megatron_sed.utils.fallbacks)

from megatron_sed.ops.config import KernelOptions, SEDConfig  # noqa: E402
from megatron_sed.ops.sed_loss import SEDLoss, vocab_parallel_sed_loss  # noqa: E402
from megatron_sed.ops.stats import STAT_FIELDS, SEDStats, reduce_sed_stats, sed_report  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "KernelOptions",
    "SEDConfig",
    "SEDLoss",
    "SEDStats",
    "STAT_FIELDS",
    "reduce_sed_stats",
    "sed_report",
    "vocab_parallel_sed_loss",
]
