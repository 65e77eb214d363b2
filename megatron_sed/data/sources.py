"""Streaming row sources for preprocessing: local files, ``save_to_disk`` folders, the hub.

Every source yields :class:`Record` s one at a time (memory stays bounded by the batch):
``(source, row, kind, payload)`` with the 1-based ``row`` number used in error messages.
JSON lines are yielded raw (``kind="line"``) and parsed in the worker processes, which is
where most of the time goes; other formats are read with Hugging Face ``datasets``
(streaming / memory-mapped) and yielded as dicts (``kind="row"``).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import NamedTuple, Optional

TABULAR = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


class Record(NamedTuple):
    source: str
    row: int
    kind: str  # "line" (raw JSON text) or "row" (a dict)
    payload: object


class SourceError(ValueError):
    """An input that cannot be opened at all."""


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_json_array(path: str) -> bool:
    with _open_text(path) as f:
        while True:
            ch = f.read(1)
            if not ch or not ch.isspace():
                return ch == "["


def _iter_json_lines(path: str) -> Iterator[Record]:
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".json") and _is_json_array(path):
        # A single JSON array has no line structure to stream; it is loaded whole.
        try:
            with _open_text(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: malformed JSON array: {e}") from e
        for i, row in enumerate(rows, 1):
            yield Record(path, i, "row", row)
        return
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield Record(path, i, "line", line)


def _iter_tabular(path: str, builder: str) -> Iterator[Record]:
    from datasets import load_dataset  # noqa: PLC0415 (heavy; only for that input kind)

    kwargs = {"delimiter": "\t"} if path.endswith(".tsv") else {}
    ds = load_dataset(builder, data_files=path, split="train", streaming=True, **kwargs)
    for i, row in enumerate(ds, 1):
        yield Record(path, i, "row", row)


def _is_saved_dataset(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, f))
        for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _iter_saved(path: str, split: str) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk  # noqa: PLC0415 (heavy; only for that input kind)

    ds = load_from_disk(path)  # memory-mapped Arrow: rows are read lazily
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise SourceError(f"{path}: no split {split!r} (available: {', '.join(ds)}); use --input-split")
        ds = ds[split]
    for i, row in enumerate(ds, 1):
        yield Record(path, i, "row", row)


def _iter_hub(name: str, split: str) -> Iterator[Record]:
    offline_hint = (
        f"--input {name!r} is not a local file or folder, so it was looked up as a Hugging Face hub dataset"
    )
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ).lower() in ("1", "true", "yes", "on"):
        raise SourceError(
            f"{offline_hint}, but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: download it elsewhere "
            "(datasets' save_to_disk or jsonl/parquet files) and pass the local path"
        )
    from datasets import load_dataset  # noqa: PLC0415 (heavy; only for that input kind)

    try:
        ds = load_dataset(name, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # no network, unknown repo, gated dataset, ...
        raise SourceError(
            f"{offline_hint} and could not be loaded ({type(e).__name__}: {e}). Offline, pass a local "
            "file or save_to_disk folder (set HF_DATASETS_OFFLINE=1 to skip the hub lookup)"
        ) from e
    if first is None:
        return
    yield Record(name, 1, "row", first)
    for i, row in enumerate(it, 2):
        yield Record(name, i, "row", row)


def check_inputs(inputs: list[str]) -> None:
    """Fail before any work on inputs that are obviously wrong (missing local files)."""
    if not inputs:
        raise SourceError("--input: at least one input is required")
    for path in inputs:
        # Hub names look like "name" or "owner/name"; anything else is meant to be local.
        looks_hub = (
            not path.startswith((".", "/", "~")) and path.count("/") <= 1 and not os.path.splitext(path)[1]
        )
        if not os.path.exists(path) and not looks_hub:
            raise SourceError(f"--input {path!r} does not exist")


def iter_records(inputs: list[str], split: str = "train") -> Iterator[Record]:
    """All rows of all inputs, in order."""
    for path in inputs:
        if os.path.isdir(path):
            if not _is_saved_dataset(path):
                raise SourceError(f"--input {path!r} is a folder but not a datasets save_to_disk folder")
            yield from _iter_saved(path, split)
        elif os.path.isfile(path):
            base = path[:-3] if path.endswith(".gz") else path
            ext = os.path.splitext(base)[1].lower()
            if ext in (".jsonl", ".json", ".ndjson"):
                yield from _iter_json_lines(path)
            elif ext in TABULAR:
                yield from _iter_tabular(path, TABULAR[ext])
            else:
                raise SourceError(
                    f"--input {path!r}: unsupported extension {ext!r} (jsonl, json, parquet, csv, tsv, arrow)"
                )
        else:
            yield from _iter_hub(path, split)


def total_rows(inputs: list[str], split: str = "train") -> Optional[int]:
    """Row count when cheap to know (save_to_disk folders, parquet metadata), else None."""
    total = 0
    for path in inputs:
        if os.path.isdir(path) and _is_saved_dataset(path):
            from datasets import DatasetDict, load_from_disk  # noqa: PLC0415 (heavy; only for that input kind)

            ds = load_from_disk(path)
            total += (
                len(ds[split])
                if isinstance(ds, DatasetDict) and split in ds
                else (len(ds) if not isinstance(ds, DatasetDict) else 0)
            )
        elif os.path.isfile(path) and path.endswith(".parquet"):
            import pyarrow.parquet as pq  # noqa: PLC0415 (heavy; only for parquet inputs)

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            return None
    return total
