import collections

import numpy as np
import pytest
import torch

from megatron_sed.data.indexed import SFTIndexedWriter
from megatron_sed.data.reader import (
    IGNORE_INDEX,
    SAMPLE_PADDING,
    BlendedSFTDataset,
    build_block_causal_mask,
    build_sft_datasets,
    packed_seq_params_from_segments,
    split_ranges,
)


def make_corpus(path, n_docs, seed=0, vocab=50, pad=0, min_len=3, max_len=20, tokenizer_type="toy"):
    """Documents with unique token content so a sample's origin can be traced back."""
    rng = np.random.default_rng(seed)
    docs = []
    with SFTIndexedWriter(str(path), vocab) as w:
        for _ in range(n_docs):
            n = int(rng.integers(min_len, max_len + 1))
            ids = rng.integers(1, vocab, size=n)
            mask = (rng.random(n) < 0.6).astype(np.uint8)
            mask[0] = 0
            w.add(ids, mask)
            docs.append((ids, mask))
        w.commit({"tokenizer": {"type": tokenizer_type, "vocab_size": vocab, "eod": vocab - 1, "pad": pad}})
    return str(path), docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("c") / "toy", 60)


def segments(sample):
    seg = sample["segment_ids"]
    return [torch.nonzero(seg == k).flatten() for k in range(int(seg.max()) + 1)]


def check_sample(sample, docs, dataset, idx, seq):
    """Every packed piece is a document prefix with shifted labels and its own loss mask."""
    for k, v in sample.items():
        assert v.shape == (seq,), k
    assert sample["loss_mask"].dtype == torch.float32 and sample["tokens"].dtype == torch.int64
    doc_ids = dataset.documents_of(idx)
    pieces = segments(sample)
    assert len(pieces) == len(doc_ids) >= 1
    off = 0
    for pos, d in zip(pieces, doc_ids):
        ids, mask = docs[d]
        n = min(len(ids) - 1, seq - off)
        assert pos.tolist() == list(range(off, off + n))  # contiguous, in order
        assert sample["position_ids"][pos].tolist() == list(range(n))  # positions restart
        assert sample["tokens"][pos].tolist() == ids[:n].tolist()
        lab = np.where(mask[1 : n + 1] == 1, ids[1 : n + 1], IGNORE_INDEX)
        assert sample["labels"][pos].tolist() == lab.tolist()  # next token of the SAME document
        assert sample["loss_mask"][pos].tolist() == mask[1 : n + 1].astype(np.float32).tolist()
        off += n
    pad = sample["segment_ids"] == -1
    assert pad.sum() == seq - off and (~pad[:off]).all()
    assert (sample["tokens"][pad] == 0).all() and (sample["labels"][pad] == IGNORE_INDEX).all()
    assert (sample["loss_mask"][pad] == 0).all()
    assert torch.equal(sample["loss_mask"] == 1, sample["labels"] != IGNORE_INDEX)


@pytest.mark.parametrize("pack", [True, False])
def test_samples_are_exact_document_pieces(corpus, pack):
    prefix, docs = corpus
    train, valid, test = build_sft_datasets([prefix], "80,20,0", seq_length=32, seed=7, pack=pack)
    assert test is None
    assert set(train.doc_ids) == set(range(48)) and set(valid.doc_ids) == set(range(48, 60))
    for ds in (train, valid):
        for i in range(len(ds) + 5):  # a few beyond one epoch too
            check_sample(ds[i], docs, ds, i, 32)
            if not pack:
                assert len(ds.documents_of(i)) == 1


def test_epochs_cover_every_document_once_and_reshuffle(corpus):
    prefix, docs = corpus
    train, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=3)
    starts = [0]
    for e in range(3):
        starts.append(starts[-1] + train.samples_in_epoch(e))
        seen = collections.Counter(d for i in range(starts[e], starts[e + 1]) for d in train.documents_of(i))
        assert seen == collections.Counter(range(60))
    assert train.samples_in_epoch(0) < 60  # packing actually packs
    order = [list(train.documents_of(i)) for i in range(starts[0], starts[1])]
    order2 = [list(train.documents_of(i)) for i in range(starts[1], starts[2])]
    assert order != order2


def test_sample_is_a_function_of_seed_and_index(corpus):
    prefix, _ = corpus
    a, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=11, train_samples=500)
    b, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=11)
    c, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=12)
    assert len(a) == 500
    # Random access in any order (as after a resume) gives the same samples.
    for i in [130, 3, 77, 0, 499]:
        for k, v in a[i].items():
            assert torch.equal(v, b[i][k])
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(5))


def test_block_causal_mask_layout_with_padding():
    """Hand-written expectation: causal inside each sample; the padding tail (-1) attends
    causally to padding only, so every softmax row has at least one key."""
    m = build_block_causal_mask(torch.tensor([[0, 0, 1, 1, -1, -1]]))
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(~m[0, 0], expect)


def test_block_causal_mask_and_packed_attention_equivalence(corpus):
    """Attention over a packed row equals attention over each sample alone."""
    prefix, _ = corpus
    train, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=0)
    batch = torch.utils.data.default_collate([train[0], train[1]])
    seg = batch["segment_ids"]
    mask = build_block_causal_mask(seg)
    assert mask.shape == (2, 1, 32, 32) and mask.dtype == torch.bool
    for b in range(2):
        for q in range(32):
            for k in range(32):
                allowed = k <= q and seg[b, q] == seg[b, k]
                assert bool(mask[b, 0, q, k]) == (not allowed)
    torch.manual_seed(0)
    x = torch.randn(2, 2, 32, 8)  # [b, heads, s, d]
    packed = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=~mask)
    assert torch.isfinite(packed).all()
    for b in range(2):
        for pos in segments({"segment_ids": seg[b]}):
            alone = torch.nn.functional.scaled_dot_product_attention(
                x[b : b + 1, :, pos], x[b : b + 1, :, pos], x[b : b + 1, :, pos], is_causal=True
            )
            torch.testing.assert_close(packed[b : b + 1, :, pos], alone)

    params = packed_seq_params_from_segments(seg)
    lengths = []
    for b in range(2):
        lengths += [len(p) for p in segments({"segment_ids": seg[b]})]
        if (seg[b] == -1).any():
            lengths.append(int((seg[b] == -1).sum()))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert params.cu_seqlens_q[-1] == 64 and params.max_seqlen_q == max(lengths)


def test_long_documents_are_truncated_to_seq_length(tmp_path):
    prefix, docs = make_corpus(tmp_path / "long", 5, min_len=40, max_len=50)
    train, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=16, seed=0)
    assert train.num_truncated_docs == 5 and len(train) == 5
    for i in range(5):
        check_sample(train[i], docs, train, i, 16)


def test_splits_blends_and_separate_files(tmp_path):
    a, _ = make_corpus(tmp_path / "a", 40, seed=1)
    b, _ = make_corpus(tmp_path / "b", 40, seed=2)
    v, _ = make_corpus(tmp_path / "v", 10, seed=3)
    assert split_ranges(100, [0.98, 0.02, 0.0]) == [(0, 98), (98, 100), (100, 100)]
    # Megatron's get_split_indices rounding: the rounding deficit shifts every later boundary.
    assert split_ranges(7, [1 / 3, 1 / 3, 1 / 3]) == [(0, 3), (3, 5), (5, 7)]
    train, valid, _ = build_sft_datasets(
        ["0.75", a, "0.25", b], "100,0,0", seq_length=24, seed=0, valid_data_paths=[v], train_samples=400
    )
    assert isinstance(train, BlendedSFTDataset) and len(train) == 400
    assert valid.data.prefix == v and len(valid.doc_ids) == 10
    [train[i] for i in range(400)]
    share = np.bincount(train._which[:400], minlength=2) / 400
    assert abs(share[0] - 0.75) < 0.01
    # Components advance through their own epochs independently.
    assert train._local[:400][train._which[:400] == 1].tolist() == list(range(int(share[1] * 400)))
    c, _ = make_corpus(tmp_path / "c", 5, vocab=70, tokenizer_type="other")
    with pytest.raises(ValueError, match="tokenized differently"):
        build_sft_datasets([a, c], "100,0,0", seq_length=24, seed=0)
    with pytest.raises(ValueError, match="--split"):
        build_sft_datasets([a], "x,y", seq_length=24, seed=0)
    with pytest.raises(ValueError, match="W1 PREFIX1"):
        build_sft_datasets(["0.5", a, "0.5"], "100,0,0", seq_length=24, seed=0)
    with pytest.raises(ValueError, match="no SFT data"):
        build_sft_datasets(None, "100,0,0", seq_length=24, seed=0)
    with pytest.raises(FileNotFoundError, match="not a preprocessed SFT corpus"):
        build_sft_datasets([str(tmp_path / "nope")], "100,0,0", seq_length=24, seed=0)


def test_samples_padded_to_a_multiple_for_context_parallelism(corpus):
    """pad_multiple 4 (CP 2): every packed sample starts at a multiple of 4 and is followed
    by padding (segment -2: pad id, label -100, loss mask 0, positions continuing) up to the
    next one; the real tokens are the documents' as without padding; packing counts the
    padded lengths."""
    prefix, docs = corpus
    train, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=0, pad_multiple=4)
    plain, _, _ = build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=0)
    assert len(train) > len(plain)  # padded samples take more room
    padded_any = False
    for i in range(len(train)):
        sample = train[i]
        seg = sample["segment_ids"]
        off = 0
        for k, d in enumerate(train.documents_of(i)):
            ids, mask = docs[d]
            n = len(ids) - 1
            end = -(-(off + n) // 4) * 4
            assert seg[off : off + n].tolist() == [k] * n
            assert sample["tokens"][off : off + n].tolist() == ids[:n].tolist()
            lab = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
            assert sample["labels"][off : off + n].tolist() == lab.tolist()
            assert sample["position_ids"][off:end].tolist() == list(range(end - off))
            pad = slice(off + n, end)
            assert seg[pad].tolist() == [SAMPLE_PADDING] * (end - off - n)
            assert sample["tokens"][pad].eq(0).all() and sample["labels"][pad].eq(IGNORE_INDEX).all()
            assert sample["loss_mask"][pad].eq(0).all()
            padded_any |= end > off + n
            off = end
        assert seg[off:].eq(-1).all() and sample["loss_mask"][off:].eq(0).all()
    assert padded_any
    with pytest.raises(ValueError, match="must be a multiple of the sample padding 5"):
        build_sft_datasets([prefix], "100,0,0", seq_length=32, seed=0, pad_multiple=5)


def test_packed_seq_params_with_sample_padding():
    """cu_seqlens count each sample's real tokens, cu_seqlens_padded its padding too (row
    0: samples of 3 + 1 and 4 tokens, end padding of 4; row 1: 6 + 2, end padding 4);
    max_seqlen is the longest padded sample; pad_between_seqs as TE would infer it. Without
    sample padding the padded fields stay None, as in Megatron-LM's SFT batches."""
    seg = torch.tensor(
        [
            [0, 0, 0, -2, 1, 1, 1, 1, -1, -1, -1, -1],
            [0, 0, 0, 0, 0, 0, -2, -2, -1, -1, -1, -1],
        ]
    )
    p = packed_seq_params_from_segments(seg)
    assert p.cu_seqlens_q.tolist() == p.cu_seqlens_kv.tolist() == [0, 3, 7, 11, 17, 21]
    assert p.cu_seqlens_q_padded.tolist() == p.cu_seqlens_kv_padded.tolist() == [0, 4, 8, 12, 20, 24]
    assert p.cu_seqlens_q_padded.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv == 8 and p.pad_between_seqs is True
    unpadded = packed_seq_params_from_segments(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert unpadded.cu_seqlens_q.tolist() == [0, 2, 5, 6]
    assert unpadded.cu_seqlens_q_padded is None and unpadded.pad_between_seqs is False
