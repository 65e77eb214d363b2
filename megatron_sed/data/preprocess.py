"""``python -m megatron_sed.data.preprocess``: SFT rows -> tokenized, loss-masked indexed dataset.

Example::

    megatron-sed-preprocess --input train.jsonl --output-prefix data/sft \\
        --tokenizer-type hf --tokenizer-model ./tokenizer --max-seq-length 4097 --workers 8

Rows stream through worker processes in batches (memory is bounded by the batches in
flight, not the corpus) and are written in input order. Bad rows stop the run with the
file and 1-based row unless ``--skip-invalid``; see docs/data.md for the output layout.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

import numpy as np
from tqdm import tqdm

from megatron_sed.data.formats import (
    FORMATS,
    FieldNames,
    InvalidSampleError,
    classify_chat_error,
    resolve_system_prompt,
    row_to_messages,
)
from megatron_sed.data.indexed import SFTIndexedWriter
from megatron_sed.data.sources import Record, SourceError, check_inputs, iter_records, total_rows
from megatron_sed.data.tokenizer import ChatFormatError, build_tokenizer
from megatron_sed.utils import fallbacks

logger = logging.getLogger("megatron_sed.data.preprocess")

OVERLENGTH = ("error", "truncate", "drop")


class PreprocessError(Exception):
    """A run that must stop; the message names the input and row."""


class Converter:
    """Row -> (ids, mask) or an InvalidSampleError, with the length policy applied."""

    def __init__(self, opts: dict) -> None:
        self.tokenizer = build_tokenizer(
            opts["tokenizer_type"], opts["tokenizer_model"], opts["chat_template"]
        )
        self.fmt = opts["format"]
        self.fields = FieldNames(**opts["fields"])
        self.system_prompt = opts["system_prompt"]
        self.max_len = opts["max_seq_length"]
        self.overlength = opts["overlength"]

    def convert(self, rec: Record):
        """``("ok", ids, mask, truncated)``, ``("drop",)`` or ``("bad", reason, message)``."""
        try:
            row = rec.payload
            if rec.kind == "line":
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as e:
                    raise InvalidSampleError("malformed_json", f"malformed JSON: {e}") from None
            messages = row_to_messages(row, self.fmt, self.fields, self.system_prompt)
            try:
                ids, mask = self.tokenizer.apply_chat_template(messages)
            except ChatFormatError as e:
                raise InvalidSampleError(classify_chat_error(e), str(e)) from None
            truncated = False
            if self.max_len is not None and len(ids) > self.max_len:
                if self.overlength == "drop":
                    return ("drop",)
                if self.overlength == "error":
                    raise InvalidSampleError(
                        "too_long",
                        f"sample has {len(ids)} tokens > --max-seq-length {self.max_len} "
                        "(use --overlength truncate|drop)",
                    )
                ids, mask = ids[: self.max_len], mask[: self.max_len]
                truncated = True
                if not any(mask):
                    raise InvalidSampleError(
                        "no_supervised_tokens",
                        f"no assistant token left after truncation to --max-seq-length {self.max_len}",
                    )
            return ("ok", np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), truncated)
        except InvalidSampleError as e:
            return ("bad", e.reason, str(e))


_WORKER: Optional[Converter] = None


def _init_worker(opts: dict) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _WORKER = Converter(opts)


def _convert_batch(batch: list[Record]):
    return [(rec.source, rec.row, _WORKER.convert(rec)) for rec in batch]


def _batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def _results(records: Iterable[Record], opts: dict, workers: int, batch_size: int):
    """Converted rows in input order; at most ``2 * workers`` batches in flight."""
    if workers <= 1:
        conv = Converter(opts)
        for rec in records:
            yield rec.source, rec.row, conv.convert(rec)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts,))
    try:
        pending = collections.deque()
        for batch in _batched(records, batch_size):
            pending.append(pool.apply_async(_convert_batch, (batch,)))
            while len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-sed-preprocess",
        description="Tokenize SFT data with a chat template into a loss-masked Megatron indexed dataset.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="jsonl/json/parquet/csv/tsv/arrow files (optionally .gz for json), datasets "
        "save_to_disk folders, or hub dataset names (needs network).",
    )
    p.add_argument(
        "--input-split", default="train", help="Split of save_to_disk DatasetDicts / hub datasets."
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        help="Writes PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, PREFIX.json.",
    )
    p.add_argument("--tokenizer-type", choices=("byte", "hf"), default="byte")
    p.add_argument("--tokenizer-model", default=None, help="Local HF tokenizer folder (--tokenizer-type hf).")
    p.add_argument(
        "--chat-template", default=None, help="Override: 'chatml', a Jinja file, or a Jinja string."
    )
    p.add_argument(
        "--system-prompt",
        default=None,
        help="System prompt for rows without one: text, or 'math' for the default math prompt "
        "(reason step by step, final answer in \\boxed{}).",
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="Row format (auto: detect per row).")
    for name, default in FieldNames().__dict__.items():
        p.add_argument(
            f"--{name}-field", default=default, help=f"Field holding the {name} (default {default!r})."
        )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="Longest sample in tokens (a packed reader with --seq-length S fits S+1).",
    )
    p.add_argument(
        "--overlength",
        choices=OVERLENGTH,
        default="error",
        help="Samples over --max-seq-length: 'error' (an invalid row), 'truncate' or 'drop' "
        "(both counted in PREFIX.json).",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="Skip (and count) invalid rows instead of stopping at the first one.",
    )
    p.add_argument("--workers", type=int, default=1, help="Tokenizer worker processes.")
    p.add_argument("--batch-size", type=int, default=256, help="Rows per worker task.")
    p.add_argument(
        "--log-interval", type=int, default=0, help="Also log a progress line every N rows (0: off)."
    )
    p.add_argument("--no-progress", action="store_true", help="Disable the tqdm progress bar.")
    return p


def _validate(args) -> None:
    if args.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {args.workers}")
    if args.batch_size < 1:
        raise PreprocessError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise PreprocessError(f"--max-seq-length must be >= 2, got {args.max_seq_length}")


def preprocess(args) -> dict:
    """Run the conversion described by parsed ``args``; returns the PREFIX.json metadata."""
    _validate(args)
    try:
        check_inputs(args.input)
    except SourceError as e:
        raise PreprocessError(str(e)) from None
    opts = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        chat_template=args.chat_template,
        format=args.format,
        fields={k: getattr(args, f"{k}_field") for k in FieldNames().__dict__},
        system_prompt=resolve_system_prompt(args.system_prompt),
        max_seq_length=args.max_seq_length,
        overlength=args.overlength,
    )
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.chat_template)
    except ValueError as e:
        raise PreprocessError(str(e)) from None

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(args.output_prefix):
        raise PreprocessError(
            f"--output-prefix {args.output_prefix!r} is a folder; give a file prefix inside it"
        )

    skipped: dict[str, int] = collections.Counter()
    num_rows = num_truncated = num_dropped = 0
    start = time.time()
    bar = None
    if not args.no_progress:
        try:
            total = total_rows(args.input, args.input_split)
        except Exception:
            total = None
        bar = tqdm(total=total, unit="rows", desc="preprocess", dynamic_ncols=True, mininterval=1.0)
    try:
        with SFTIndexedWriter(args.output_prefix, tokenizer.vocab_size) as writer:
            try:
                records = iter_records(args.input, args.input_split)
                for source, row, res in _results(records, opts, args.workers, args.batch_size):
                    num_rows += 1
                    if bar is not None:
                        bar.update(1)
                    if args.log_interval and num_rows % args.log_interval == 0:
                        logger.info(
                            " > processed %d rows (%.0f rows/s)", num_rows, num_rows / (time.time() - start)
                        )
                    status = res[0]
                    if status == "ok":
                        writer.add(res[1], res[2])
                        num_truncated += int(res[3])
                    elif status == "drop":
                        num_dropped += 1
                    else:
                        _, reason, message = res
                        if not args.skip_invalid:
                            raise PreprocessError(
                                f"{source}: row {row}: {message} (pass --skip-invalid to skip and count bad rows)"
                            )
                        skipped[reason] += 1
            except SourceError as e:
                raise PreprocessError(str(e)) from None
            if writer.num_samples == 0:
                raise PreprocessError(f"no valid samples in {', '.join(args.input)}: nothing written")
            elapsed = time.time() - start
            meta = writer.commit(
                dict(
                    num_rows=num_rows,
                    num_skipped=int(sum(skipped.values())),
                    skipped_by_reason=dict(sorted(skipped.items())),
                    num_truncated=num_truncated,
                    num_dropped_overlength=num_dropped,
                    tokenizer=tokenizer.describe(),
                    inputs=list(args.input),
                    row_format=args.format,
                    system_prompt=opts["system_prompt"],
                    max_seq_length=args.max_seq_length,
                    overlength=args.overlength,
                    seconds=round(elapsed, 3),
                )
            )
    finally:
        if bar is not None:
            bar.close()
    logger.info(
        " > wrote %s: %d samples, %d tokens (%d supervised), %d skipped, %d truncated, %d dropped "
        "from %d rows in %.1fs (%.0f rows/s)",
        args.output_prefix,
        meta["num_samples"],
        meta["num_tokens"],
        meta["num_supervised_tokens"],
        meta["num_skipped"],
        num_truncated,
        num_dropped,
        num_rows,
        elapsed,
        num_rows / max(elapsed, 1e-9),
    )
    return meta


def preprocess_rows(rows: Sequence[dict], output_prefix: str, tokenizer_type: str = "byte", **flags) -> dict:
    """Python API: preprocess in-memory rows (e.g. the synthetic set) through a temporary jsonl."""

    directory = os.path.dirname(os.path.abspath(output_prefix))
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=directory, delete=False) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        tmp = f.name
    try:
        argv = [
            "--input",
            tmp,
            "--output-prefix",
            output_prefix,
            "--tokenizer-type",
            tokenizer_type,
            "--no-progress",
        ]
        for k, v in flags.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                argv.append(flag)
            elif v not in (None, False):
                argv += [flag, str(v)]
        return preprocess(build_parser().parse_args(argv))
    finally:
        os.unlink(tmp)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fallbacks.report()
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. a scheduler's kill) unwinds like Ctrl-C so the temporaries are removed.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        preprocess(args)
    except PreprocessError as e:
        print(f"megatron-sed-preprocess: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("megatron-sed-preprocess: interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
