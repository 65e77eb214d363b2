"""On-disk layout of a preprocessed SFT corpus, and its atomic writer / reader.

A corpus ``PREFIX`` is five files:

* ``PREFIX.bin`` / ``PREFIX.idx``: a Megatron-Core ``IndexedDataset`` with one sequence
  per sample (document) holding its token ids (dtype: the smallest unsigned type for the
  vocabulary). Megatron-LM's ``GPTDataset`` can read it unchanged.
* ``PREFIX_loss_mask.bin`` / ``PREFIX_loss_mask.idx``: an ``IndexedDataset`` of ``uint8``
  with exactly the same sequence lengths; ``mask[j] == 1`` iff token ``j`` is an assistant
  token that the model must learn to predict (from tokens ``< j``).
* ``PREFIX.json``: metadata (``num_samples``, ``num_tokens``, ``num_supervised_tokens``,
  ``num_skipped``, ``num_truncated``, the tokenizer, ...). It is renamed into place last
  and is the commit marker: a reader refuses a prefix whose ``.json`` is missing or whose
  files disagree with it.

All files are written under temporary names and renamed once complete, so an interrupted
run leaves no partial ``PREFIX.*`` (the temporaries are removed on failure).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

FORMAT_VERSION = 1
MASK_SUFFIX = "_loss_mask"


def metadata_path(prefix: str) -> str:
    return prefix + ".json"


def final_paths(prefix: str) -> list[str]:
    """Every file of a corpus, the metadata (commit marker) last."""
    return [
        prefix + ".bin",
        prefix + ".idx",
        prefix + MASK_SUFFIX + ".bin",
        prefix + MASK_SUFFIX + ".idx",
        metadata_path(prefix),
    ]


class SFTIndexedWriter:
    """Append (tokens, loss_mask) samples; ``commit(metadata)`` makes the corpus visible.

    Use as a context manager: leaving the block with an exception removes the temporaries.
    """

    def __init__(self, prefix: str, vocab_size: int) -> None:

        self.prefix = prefix
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise ValueError(f"--output-prefix {prefix!r}: directory {directory!r} does not exist")
        # Hidden temporaries that do not match PREFIX.*, even if a hard kill leaves them behind.
        self._tmp = os.path.join(directory, f".{os.path.basename(prefix)}.tmp-{os.getpid()}")
        self.dtype = DType.optimal_dtype(vocab_size)
        self._tok = IndexedDatasetBuilder(self._tmp + ".tok.bin", dtype=self.dtype)
        self._mask = IndexedDatasetBuilder(self._tmp + ".mask.bin", dtype=np.uint8)
        self.num_samples = 0
        self.num_tokens = 0
        self.num_supervised = 0
        self._committed = False

    def _tmp_paths(self) -> list[str]:
        t = self._tmp
        return [t + ".tok.bin", t + ".tok.idx", t + ".mask.bin", t + ".mask.idx", t + ".json"]

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        if len(ids) != len(mask):
            raise ValueError(f"tokens ({len(ids)}) and loss mask ({len(mask)}) lengths differ")
        ids = np.asarray(ids, dtype=self.dtype)
        mask = np.asarray(mask, dtype=np.uint8)
        self._tok.add_document(ids, [ids.size])
        self._mask.add_document(mask, [mask.size])
        self.num_samples += 1
        self.num_tokens += int(ids.size)
        self.num_supervised += int(mask.sum())

    def commit(self, metadata: dict) -> dict:
        t = self._tmp
        self._tok.finalize(t + ".tok.idx")
        self._mask.finalize(t + ".mask.idx")
        meta = dict(metadata)
        meta.update(  # the writer's own facts win over caller-supplied keys
            format="megatron-sed-sft",
            format_version=FORMAT_VERSION,
            num_samples=self.num_samples,
            num_tokens=self.num_tokens,
            num_supervised_tokens=self.num_supervised,
            loss_mask_prefix_suffix=MASK_SUFFIX,
            token_dtype=np.dtype(self.dtype).name,
        )
        with open(t + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # A previous corpus at this prefix stops being valid the moment its data changes:
        # drop its commit marker first so no reader ever sees old metadata with new data.
        if os.path.exists(metadata_path(self.prefix)):
            os.unlink(metadata_path(self.prefix))
        renamed = []
        try:
            for src, dst in zip(self._tmp_paths(), final_paths(self.prefix)):
                os.replace(src, dst)
                renamed.append(dst)
        except BaseException:
            for dst in renamed:  # never leave a partial PREFIX.* behind
                if os.path.exists(dst):
                    os.unlink(dst)
            raise
        self._committed = True
        return meta

    def abort(self) -> None:
        for builder in (self._tok, self._mask):
            if not builder.data_file.closed:
                builder.data_file.close()
        for p in self._tmp_paths():
            if os.path.exists(p):
                os.unlink(p)

    def __enter__(self) -> SFTIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()


def read_metadata(prefix: str) -> dict:
    path = metadata_path(prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {prefix!r} is not a preprocessed SFT corpus "
            "(run `python -m megatron_sed.data.preprocess --output-prefix ...`)"
        )
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != "megatron-sed-sft":
        raise ValueError(f"{path} is not megatron-sed SFT metadata")
    return meta


class SFTIndexedData:
    """Read-only view of a corpus: ``get(i) -> (tokens, loss_mask)`` as numpy arrays."""

    def __init__(self, prefix: str) -> None:

        self.prefix = prefix
        self.meta = read_metadata(prefix)
        for p in final_paths(prefix)[:4]:
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} is missing (corpus {prefix!r} is incomplete)")
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX)
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if len(self.tokens) != self.meta["num_samples"] or not np.array_equal(
            self.lengths, self.masks.sequence_lengths
        ):
            raise ValueError(f"corpus {prefix!r}: token, loss-mask and metadata files disagree")

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[int(i)], self.masks[int(i)]

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad"])

    @property
    def tokenizer_info(self) -> dict:
        return self.meta["tokenizer"]


def tokenizer_compatible(a: dict, b: dict) -> bool:
    keys = ("type", "vocab_size", "eod", "pad")
    return all(a.get(k) == b.get(k) for k in keys)
