"""megatron-sed: SED-SFT for Megatron-Core.

Public API::

    from megatron_sed import SEDConfig, vocab_parallel_sed_loss
    loss, stats = vocab_parallel_sed_loss(vocab_parallel_logits, target, cfg, tp_group=None)
"""

from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.sed_loss import SEDLoss, vocab_parallel_sed_loss
from megatron_sed.ops.stats import STAT_NAMES, reduce_sed_stats, sed_stat_sums, summarize_sed_stat_sums

__version__ = "0.1.0"

__all__ = [
    "SEDConfig",
    "SEDLoss",
    "vocab_parallel_sed_loss",
    "STAT_NAMES",
    "reduce_sed_stats",
    "sed_stat_sums",
    "summarize_sed_stat_sums",
]
