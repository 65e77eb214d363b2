"""Training reader: preprocessed SFT corpora -> fixed-length packed (or padded) samples.

Sample ``i`` of a dataset is a dict of 1-D tensors of length ``seq_length``:

* ``tokens`` (int64): input ids; ``pad`` id on padding.
* ``labels`` (int64): next-token targets, ``-100`` where not supervised (prompt tokens,
  the last token of each packed sample, padding). A label never crosses samples: each
  document of ``L`` tokens contributes ``L - 1`` (input, label) pairs.
* ``loss_mask`` (float32): 1 exactly where ``labels != -100``.
* ``position_ids`` (int64): restart at 0 at each packed sample (0 on padding).
* ``segment_ids`` (int64): index of the packed sample within the sequence, -1 on the
  padding that ends the sequence, -2 on a sample's own padding (below).

With ``pad_multiple`` > 1 (context parallelism: 2 x CP, as Megatron-LM's SFT dataset pads
its packed samples) every sample is followed by padding up to a multiple of
``pad_multiple`` tokens (pad id, label -100, loss mask 0, positions continuing), and
packing counts the padded lengths. The padding sits after the sample's last token, so
under causal attention no real token sees it; context parallelism can then cut each
sample into 2 x CP equal chunks (Transformer Engine's THD partition).

``build_block_causal_mask`` turns ``segment_ids`` into Megatron's boolean attention mask
(True = masked out) for CPU attention; ``packed_seq_params_from_segments`` into THD
``PackedSeqParams`` (``cu_seqlens`` of the real tokens, ``cu_seqlens_padded`` with each
sample's padding) for Transformer Engine on GPU.

Determinism: epoch ``e`` visits the documents in a permutation that is a function of
``(seed, e)`` only, packed greedily in that order; samples are numbered across epochs, so
sample ``i`` is a pure function of ``(data, seed, i)`` and resuming at a consumed-samples
count reproduces the uninterrupted stream.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_sed.data.indexed import SFTIndexedData, tokenizer_compatible

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
END_PADDING = -1  # segment id of the padding that fills the sequence after its last sample
SAMPLE_PADDING = -2  # segment id of a sample's own padding (to a multiple of pad_multiple)


def padded_length(n, multiple: int):
    """``n`` rounded up to a multiple of ``multiple`` (ints or numpy arrays)."""
    return -(-n // multiple) * multiple


def _greedy_pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Boundaries ``b`` such that bin ``k`` holds items ``b[k]:b[k+1]`` (next-fit, in order)."""
    bounds = [0]
    used = 0
    for j, n in enumerate(lengths.tolist()):
        if used + n > capacity and used > 0:
            bounds.append(j)
            used = 0
        used += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


class SFTDataset(torch.utils.data.Dataset):
    """Packed (``pack=True``) or one-sample-per-sequence padded SFT samples from one corpus.

    ``doc_ids``: the documents of this split. ``num_samples``: the dataset length (any
    number; epochs are added as needed); default one epoch. ``pad_multiple``: each
    sample is padded to a multiple of it (``seq_length`` must be one).
    """

    def __init__(
        self,
        data: SFTIndexedData,
        doc_ids: np.ndarray,
        seq_length: int,
        seed: int,
        pack: bool = True,
        shuffle: bool = True,
        num_samples: Optional[int] = None,
        name: str = "train",
        pad_multiple: int = 1,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
        if pad_multiple < 1 or seq_length % pad_multiple:
            raise ValueError(
                f"--seq-length {seq_length} must be a multiple of the sample padding {pad_multiple}"
            )
        self.pad_multiple = int(pad_multiple)
        self.data, self.seq_length, self.seed = data, int(seq_length), int(seed)
        self.pack, self.shuffle, self.name = pack, shuffle, name
        # True: a document's last token is an input position too (its label ignored), as
        # when a whole sequence is fed to a model; the SED authors' calibration counts it.
        self.final_position = False
        lengths = data.lengths[doc_ids]
        keep = lengths >= 2  # a 1-token document has no (input, label) pair
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)[keep]
        if len(self.doc_ids) == 0:
            raise ValueError(f"{name} split of {data.prefix!r} has no usable documents")
        # (input, label) pairs per document, truncated to one sequence.
        self.pairs = np.minimum(data.lengths[self.doc_ids] - 1, self.seq_length)
        self.num_truncated_docs = int((data.lengths[self.doc_ids] - 1 > self.seq_length).sum())
        if self.num_truncated_docs:
            logger.warning(
                "%s: %d of %d documents of %s are longer than --seq-length %d + 1 and get truncated",
                name,
                self.num_truncated_docs,
                len(self.doc_ids),
                data.prefix,
                self.seq_length,
            )
        self.pad_id = data.pad_id
        self._supervised: Optional[int] = None
        self._salt = zlib.crc32(name.encode())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epoch_starts: list[int] = [0]  # global index of each epoch's first sample
        self.num_samples = int(num_samples) if num_samples is not None else self.samples_in_epoch(0)

    # -- supervision ----------------------------------------------------------------------
    def supervised_tokens(self) -> int:
        """Supervised labels this split yields per epoch (within --seq-length): the loss
        mask of tokens 1..pairs of each document. Read once, in bounded chunks of the mask
        file (one byte per token), so it costs a pass over 1/2-1/4 of the corpus size."""
        if self._supervised is None:
            self._supervised = count_supervised(self.data, self.doc_ids, self.pairs)
        return self._supervised

    def prompt_lengths(self, limit: int = 2000) -> np.ndarray:
        """Tokens before the first supervised one, of (up to `limit`) documents that have one."""
        out = []
        for doc in self.doc_ids[:limit]:
            hit = np.flatnonzero(self.data.get(doc)[1])
            if hit.size:
                out.append(int(hit[0]))
        return np.asarray(out, dtype=np.int64)

    # -- epoch layout -------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, bin boundaries) of an epoch; a pure function of (seed, epoch)."""
        if epoch not in self._epochs:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, self._salt])
                order = rng.permutation(len(self.doc_ids))
            else:
                order = np.arange(len(self.doc_ids))
            if self.pack:
                spans = padded_length(self.pairs[order], self.pad_multiple)
                bounds = _greedy_pack(spans, self.seq_length)
            else:
                bounds = np.arange(len(order) + 1, dtype=np.int64)
            if len(self._epochs) >= 2:  # bounded memory: keep the two latest epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, bounds)
        return self._epochs[epoch]

    def samples_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1]) - 1

    def _locate(self, idx: int) -> tuple[int, int]:
        while self._epoch_starts[-1] <= idx:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self.samples_in_epoch(e))
        epoch = int(np.searchsorted(self._epoch_starts, idx, side="right")) - 1
        return epoch, idx - self._epoch_starts[epoch]

    def documents_of(self, idx: int) -> np.ndarray:
        """Corpus document ids packed into sample ``idx``."""
        epoch, k = self._locate(idx)
        order, bounds = self._epoch(epoch)
        return self.doc_ids[order[bounds[k] : bounds[k + 1]]]

    # -- Dataset ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if idx < 0:
            raise IndexError(f"sample index must be >= 0, got {idx}")
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        segment_ids = np.full(s, END_PADDING, dtype=np.int64)
        off = 0
        for seg, doc in enumerate(self.documents_of(idx)):
            ids, mask = self.data.get(doc)
            ids = ids.astype(np.int64)  # stored unsigned: -100 must not wrap around
            n = min(len(ids) - (0 if self.final_position else 1), s - off)
            m = min(n, len(ids) - 1)  # positions with a next token (all of them, unless final_position)
            sup = mask[1 : m + 1].astype(bool)
            tokens[off : off + n] = ids[:n]
            labels[off : off + m] = np.where(sup, ids[1 : m + 1], IGNORE_INDEX)
            loss_mask[off : off + m] = sup
            position_ids[off : off + n] = np.arange(n)
            segment_ids[off : off + n] = seg
            off += n
            end = min(padded_length(off, self.pad_multiple), s)  # off was a multiple
            position_ids[off:end] = np.arange(n, n + end - off)
            segment_ids[off:end] = SAMPLE_PADDING
            off = end
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
        }


_CHUNK_BYTES = 1 << 22  # mask bytes read at once when counting supervised tokens


def count_supervised(data: SFTIndexedData, doc_ids: np.ndarray, pairs: np.ndarray) -> int:
    """Sum over documents d of mask_d[1 : pairs_d + 1] (the supervised labels of d)."""
    index = data.masks.index
    order = np.argsort(doc_ids, kind="stable")
    docs, npairs = doc_ids[order], pairs[order]
    ptrs = np.asarray(index.sequence_pointers, dtype=np.int64)[docs]  # uint8: bytes = tokens
    total, i = 0, 0
    while i < len(docs):
        j = i + 1  # docs[i:j]: a run whose byte span fits one chunk (or a single document)
        while j < len(docs) and ptrs[j] + npairs[j] + 1 - ptrs[i] <= _CHUNK_BYTES:
            j += 1
        start = int(ptrs[i])
        span = int(ptrs[j - 1] + npairs[j - 1] + 1) - start
        region = data.masks.bin_reader.read(dtype=np.uint8, count=span, offset=start)
        csum = np.concatenate([[0], np.cumsum(region, dtype=np.int64)])
        lo = ptrs[i:j] - start + 1
        total += int((csum[lo + npairs[i:j]] - csum[lo]).sum())
        i = j
    return total


class BlendedSFTDataset(torch.utils.data.Dataset):
    """Weighted blend: sample ``i`` comes from the dataset whose share is most behind.

    The same deterministic greedy rule as Megatron's ``BlendedDataset``; each component is
    indexed by how many of its samples were drawn before, so epochs wrap per component.
    """

    def __init__(self, datasets: Sequence[SFTDataset], weights: Sequence[float], num_samples: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(datasets) != len(w) or (w <= 0).any():
            raise ValueError(f"blend weights must be positive, one per dataset: {list(weights)}")
        self.datasets, self.weights, self.num_samples = list(datasets), w / w.sum(), int(num_samples)
        self._which = np.zeros(0, dtype=np.int64)
        self._local = np.zeros(0, dtype=np.int64)

    def _extend(self, upto: int) -> None:
        n = max(upto + 1, 2 * len(self._which), 1024)
        which = np.empty(n, dtype=np.int64)
        local = np.empty(n, dtype=np.int64)
        which[: len(self._which)], local[: len(self._local)] = self._which, self._local
        counts = np.bincount(self._which, minlength=len(self.weights)).astype(np.int64)
        for i in range(len(self._which), n):
            d = int(np.argmax(self.weights * (i + 1) - counts))
            which[i], local[i] = d, counts[d]
            counts[d] += 1
        self._which, self._local = which, local

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if idx >= len(self._which):
            self._extend(idx)
        return self.datasets[self._which[idx]][int(self._local[idx])]


# -- attention helpers -------------------------------------------------------------------
def build_block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[b, 1, s, s]`` (True = do NOT attend, Megatron's convention).

    Query ``q`` may attend key ``k`` iff ``k <= q`` and both lie in the same packed sample.
    Padding (segment -1, or -2: samples' own padding) attends causally to padding of its
    kind only, so no softmax row is empty; no real token ever sees padding.
    """
    if segment_ids.dim() == 1:
        segment_ids = segment_ids.unsqueeze(0)
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return ~(same & causal).unsqueeze(1)


def packed_lengths(segment_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """(real, padded) lengths of the THD sequences of a ``[b, s]`` batch flattened to
    ``b*s`` tokens, row after row: each packed sample (its own padding, segment -2, counts
    in its padded length only) and each row's end padding (one more sequence, all real:
    its outputs are unsupervised)."""
    real: list[int] = []
    padded: list[int] = []
    flat = segment_ids.reshape(segment_ids.shape[0] if segment_ids.dim() > 1 else 1, -1)
    for row in flat.tolist():
        start = 0
        for j in range(1, len(row) + 1):
            if j < len(row) and row[j] == row[start]:
                continue
            n = j - start
            if row[start] == SAMPLE_PADDING and padded:
                padded[-1] += n
            else:
                real.append(n)
                padded.append(n)
            start = j
    return real, padded


def _cumulative(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return cu.to(device)


def packed_seq_params_from_segments(segment_ids: torch.Tensor, device=None):
    """THD ``PackedSeqParams`` for a ``[b, s]`` batch flattened to ``b*s`` tokens.

    ``cu_seqlens_q/kv`` (int32) are the cumulative real lengths of the packed samples, row
    after row (`packed_lengths`); ``cu_seqlens_q/kv_padded`` (None without sample padding)
    include each sample's own padding, so a sample starts at its padded offset (what
    context parallelism partitions and Megatron's THD RoPE indexes); ``max_seqlen`` is
    the longest padded sample.
    ``pad_between_seqs`` is decided here, on the host: left unset, Transformer Engine
    decides it by comparing the device tensors (a device-to-host sync per layer).
    Pass the host (CPU) segment ids and the target ``device``: the lengths are read on the
    host, so device-resident ids would cost a device-to-host sync per micro-batch.
    """

    real, padded = packed_lengths(segment_ids)
    return packed_seq_params_from_lengths(real, padded, device if device is not None else segment_ids.device)


def packed_seq_params_from_lengths(real: list[int], padded: list[int], device) -> PackedSeqParams:
    """`packed_seq_params_from_segments` from the host lengths of `packed_lengths`.
    Without sample padding the ``*_padded`` fields stay None (they would equal
    ``cu_seqlens``), as Megatron-LM's own SFT batches have them."""
    cu = _cumulative(real, device)
    cu_padded = _cumulative(padded, device) if padded != real else None
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
        # TE's rule: padding before the last sequence's end (cu_seqlens[:-1] differ)
        pad_between_seqs=real[:-1] != padded[:-1],
    )


# -- builder -----------------------------------------------------------------------------
def parse_data_paths(paths: Optional[Sequence[str]]) -> Optional[tuple[list[str], list[float]]]:
    """``["A"]`` or Megatron-style ``["0.7", "A", "0.3", "B"]`` -> (prefixes, weights)."""
    if not paths:
        return None
    paths = list(paths)
    try:
        float(paths[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return paths, [1.0] * len(paths)
    if len(paths) % 2:
        raise ValueError(f"--data-path with weights needs 'W1 PREFIX1 W2 PREFIX2 ...', got {paths}")
    try:
        weights = [float(w) for w in paths[0::2]]
    except ValueError as e:
        raise ValueError(f"--data-path: bad weight in {paths}: {e}") from e
    return paths[1::2], weights


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r} must be like '98,2,0'") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r} needs non-negative shares with a positive sum")
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(num_docs: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges per split, like Megatron's ``get_split_indices``."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_docs)))
    diff = bounds[-1] - num_docs
    bounds = [b - diff if i else b for i, b in enumerate(bounds)]
    bounds = [min(max(b, 0), num_docs) for b in bounds]
    bounds[0] = 0
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _open(prefixes: Sequence[str]) -> list[SFTIndexedData]:
    return [SFTIndexedData(p) for p in prefixes]


def _assemble(parts, weights, seq_length, seed, pack, shuffle, num_samples, name, pad_multiple=1):
    dsets = [
        SFTDataset(c, ids, seq_length, seed, pack=pack, shuffle=shuffle, name=name, pad_multiple=pad_multiple)
        for c, ids in parts
    ]
    if not dsets:
        return None
    if len(dsets) == 1:
        if num_samples is not None:
            dsets[0].num_samples = int(num_samples)
        return dsets[0]
    if num_samples is None:
        # One pass over the blend: enough samples that each component completes ~an epoch.
        w = np.asarray(weights) / np.sum(weights)
        num_samples = int(max(d.samples_in_epoch(0) / wi for d, wi in zip(dsets, w)))
    return BlendedSFTDataset(dsets, weights, num_samples)


def build_sft_datasets(
    data_paths: Optional[Sequence[str]],
    split: str = "98,2,0",
    seq_length: int = 256,
    seed: int = 1234,
    pack: bool = True,
    valid_data_paths: Optional[Sequence[str]] = None,
    train_data_paths: Optional[Sequence[str]] = None,
    test_data_paths: Optional[Sequence[str]] = None,
    train_samples: Optional[int] = None,
    valid_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    pad_multiple: int = 1,
):
    """(train, valid, test) datasets; a split with no documents is None.

    ``data_paths`` (``--data-path``) is split by documents per ``split`` (contiguous ranges,
    as Megatron). ``train/valid/test_data_paths`` (``--train-data-path`` ...) replace the
    corresponding share entirely (that share of ``split`` is then ignored). Training
    samples are reshuffled every epoch; validation and test are read in corpus order. ``*_samples``: dataset lengths (default: one epoch / one pass of a blend).
    ``pad_multiple``: every sample padded to a multiple of it (`SFTDataset`).
    """
    fractions = parse_split(split)
    explicit = [train_data_paths, valid_data_paths, test_data_paths]
    for k, paths in enumerate(explicit):
        if paths:
            fractions[k] = 0.0
    parts: list[list] = [[], [], []]
    weights: list[list] = [[], [], []]
    parsed = parse_data_paths(data_paths)
    if parsed is not None and sum(fractions) > 0:
        prefixes, ws = parsed
        for corpus, w in zip(_open(prefixes), ws):
            for k, (a, b) in enumerate(split_ranges(len(corpus), fractions)):
                if b > a:
                    parts[k].append((corpus, np.arange(a, b)))
                    weights[k].append(w)
    for k, paths in enumerate(explicit):
        if paths:
            prefixes, ws = parse_data_paths(paths)
            for corpus, w in zip(_open(prefixes), ws):
                parts[k].append((corpus, np.arange(len(corpus))))
                weights[k].append(w)
    if not any(parts):
        raise ValueError("no SFT data: pass --data-path (or --train-data-path/--valid-data-path)")
    corpora = [c for p in parts for c, _ in p]
    for c in corpora[1:]:
        if not tokenizer_compatible(c.tokenizer_info, corpora[0].tokenizer_info):
            raise ValueError(
                f"corpora {corpora[0].prefix!r} and {c.prefix!r} were tokenized differently: "
                f"{corpora[0].tokenizer_info} vs {c.tokenizer_info}"
            )
    names = ("train", "valid", "test")
    counts = (train_samples, valid_samples, test_samples)
    out = []
    for k in range(3):
        ds = _assemble(
            parts[k], weights[k], seq_length, seed, pack, k == 0, counts[k], names[k], pad_multiple
        )
        out.append(ds)
        if ds is not None:
            logger.info(
                " > %s SFT dataset: %d samples of %d tokens (%s%s)",
                names[k],
                len(ds),
                seq_length,
                "packed" if pack else "padded",
                f", each sample padded to a multiple of {pad_multiple}" if pad_multiple > 1 else "",
            )
    return tuple(out)
