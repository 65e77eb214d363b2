"""Training log output: Megatron-style lines, --metrics-file JSON lines, TensorBoard."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

# Metrics-file keys of the issue; log-line labels as Megatron-LM writes them.
LINE_FIELDS = (
    ("lm_loss", "lm loss"),
    ("sed_reg", "sed reg"),
    ("sed_mask_rate", "sed mask rate"),
    ("entropy", "entropy"),
    ("target_prob", "target prob"),
    ("top1_acc", "top1 acc"),
)


def format_train_line(it: int, train_iters: int, m: Dict) -> str:
    parts = [
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {it:8d}/{train_iters:8d}",
        f"consumed samples: {m['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {m['iter_time_ms']:.1f}",
        f"learning rate: {m['lr']:.6E}",
        f"global batch size: {m['global_batch_size']:5d}",
    ]
    for key, label in LINE_FIELDS:
        if m.get(key) is not None:
            parts.append(f"{label}: {m[key]:.6E}")
    parts.append(f"grad norm: {m['grad_norm']:.3f}")
    parts.append(f"tokens per sec: {m['tokens_per_sec']:.1f}")
    parts.append(f"number of skipped iterations: {m['skipped_iterations']:3d}")
    parts.append(f"number of nan iterations: {m['nan_iterations']:3d}")
    return " | ".join(parts) + " |"


def format_eval_line(it: int, m: Dict) -> str:
    loss = m["lm_loss"]
    ppl = math.exp(min(20.0, loss))
    extra = " | ".join(f"{label}: {m[k]:.6E}" for k, label in LINE_FIELDS[1:] if m.get(k) is not None)
    return (f" validation loss at iteration {it} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} | {extra} |")


class MetricsWriter:
    """JSON lines (flushed per record) and optional TensorBoard; only on the logging rank."""

    def __init__(self, metrics_file: Optional[str], tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        if metrics_file:
            d = os.path.dirname(os.path.abspath(metrics_file))
            os.makedirs(d, exist_ok=True)
            self.file = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(" > --tensorboard-dir given but tensorboard is not installed; skipping", flush=True)
            else:
                self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)

    def write(self, record: Dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            it = record["iteration"]
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, it)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
