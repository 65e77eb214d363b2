"""Single-process tests of vocab_parallel_sed_loss against the float64 reference."""

import math

import pytest
import torch

from megatron_sed import (
    KernelOptions,
    SEDConfig,
    SEDLoss,
    SEDStats,
    reduce_sed_stats,
    vocab_parallel_sed_loss,
)
from tests.helpers.sed_reference import GRAD_TOL, TOL, make_inputs, reference_sed

pytestmark = pytest.mark.compat

CASES = [
    ("topk_mass", "quadratic", 0.8),
    ("entropy", "quadratic", 1.0),
    ("all", "quadratic", 0.5),
    ("none", "quadratic", 0.5),
    ("topk_mass", "entropy", 0.8),
    ("all", "entropy", 0.5),
]


def run_op(logits, target, cfg):
    x = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_sed_loss(x, target, cfg)
    return x, loss, stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask,regularizer,threshold", CASES)
def test_matches_float64_reference(dtype, mask, regularizer, threshold):
    logits64, target = make_inputs(7, 3, 50, seed=1)
    logits = logits64.to(dtype)
    cfg = SEDConfig(coef=0.8, top_k=3, threshold=threshold, mask=mask, regularizer=regularizer)
    x, loss, stats = run_op(logits, target, cfg)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == target.shape

    ref_x = logits.double().clone().requires_grad_()
    ref_loss, ref_stats = reference_sed(ref_x, target, 0.8, 3, threshold, mask, regularizer)
    # the mask is a threshold test: it must agree exactly, so pick data away from ties
    assert torch.equal(stats["mask"], ref_stats["mask"])
    if mask in ("topk_mass", "entropy"):
        assert 0 < int(stats["mask"].sum()) < int((target != -100).sum()), "mask should be mixed"
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[dtype])
    for name in ("ce", "reg", "target_prob", "entropy", "topk_mass"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[dtype], msg=name)
    assert torch.equal(stats["correct"], ref_stats["correct"])

    grad_out = torch.rand(target.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (loss.double() * grad_out).sum().backward()
    (ref_loss * grad_out).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), ref_x.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("regularizer", ["quadratic", "entropy"])
@pytest.mark.parametrize("mask", ["topk_mass", "all"])
def test_gradcheck_float64(mask, regularizer):
    logits, target = make_inputs(3, 2, 9, seed=5, scale=1.5)
    cfg = SEDConfig(coef=0.9, top_k=2, threshold=0.7, mask=mask, regularizer=regularizer)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_sed_loss(z, target, cfg)[0], (x,))


def test_coef_zero_is_cross_entropy():
    logits, target = make_inputs(6, 2, 40, seed=2)
    x = logits.float().clone().requires_grad_()
    loss, _ = vocab_parallel_sed_loss(x, target, SEDConfig(coef=0.0, mask="all"))
    y = logits.float().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(y.view(-1, 40), target.view(-1), reduction="none").view(6, 2)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_gradient_factor_matches_sed_method_formula():
    """dL/dz = g_CE * (1 - coef * M * p (2p - 1)) per token (docs/method.md)."""
    logits, target = make_inputs(4, 2, 30, seed=7, ignore_frac=0.0)
    cfg = SEDConfig(coef=0.6, top_k=2, mask="all")
    x = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_sed_loss(x, target, cfg)
    loss.sum().backward()
    p = torch.softmax(logits, -1)
    g_ce = p - torch.nn.functional.one_hot(target, 30).double()
    py = stats["target_prob"].double()
    factor = 1 - 0.6 * py * (2 * py - 1)
    torch.testing.assert_close(x.grad, g_ce * factor.unsqueeze(-1), atol=1e-12, rtol=1e-10)
    assert float(factor.min()) >= 0.0 and float(factor.max()) <= 1 + 0.6 / 8 + 1e-12


def test_ignored_targets_give_zero_loss_and_gradient():
    logits, target = make_inputs(5, 2, 20, seed=3, ignore_frac=0.5)
    cfg = SEDConfig(coef=1.0, mask="all")
    x, loss, stats = run_op(logits.float(), target, cfg)
    ignored = target == -100
    assert ignored.any() and (~ignored).any()
    assert torch.all(loss[ignored] == 0)
    for name in ("ce", "reg", "target_prob", "entropy", "topk_mass"):
        assert torch.all(stats[name][ignored] == 0), name
    assert not stats["mask"][ignored].any() and not stats["correct"][ignored].any()
    loss.sum().backward()
    assert torch.all(x.grad[ignored] == 0)
    assert torch.all(x.grad[~ignored].abs().sum(-1) > 0)


def test_all_ignored_batch_gives_zeros_not_nan():
    logits = torch.randn(4, 2, 16)
    target = torch.full((4, 2), -100)
    x, loss, stats = run_op(logits, target, SEDConfig(mask="all"))
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(x.grad == 0)
    summary = reduce_sed_stats(stats, torch.zeros(4, 2))
    assert summary["num_tokens"] == 0
    assert all(math.isfinite(v) for v in summary.values())


def test_custom_ignore_index():
    logits, target = make_inputs(3, 2, 12, seed=4, ignore_frac=0.0)
    target[0, 0] = 7
    cfg = SEDConfig(mask="all", ignore_index=7)
    _, loss, _ = run_op(logits, target, cfg)
    assert loss[0, 0] == 0
    assert torch.all(loss[target != 7] > 0)


def test_float32_input_is_used_in_place_like_megatron():
    """float32 logits are the working buffer (no second [tokens, V] buffer)."""
    logits = torch.randn(4, 2, 16)
    x = logits.clone()
    vocab_parallel_sed_loss(x, torch.randint(0, 16, (4, 2)), SEDConfig())
    assert not torch.equal(x, logits)
    y = logits.double()
    vocab_parallel_sed_loss(y, torch.randint(0, 16, (4, 2)), SEDConfig())
    assert torch.equal(y, logits.double()), "float64 input must not be modified"


def test_nonfinite_logits_are_flagged_not_hidden():
    """Decision: NaN/inf logits are not an error (no host sync in the hot path); the
    affected token's loss is NaN, other tokens are exact, and the stats summary counts it
    under nonfinite_tokens so the trainer can stop with a message naming the iteration."""
    logits, target = make_inputs(3, 2, 10, seed=6, ignore_frac=0.0)
    bad = logits.clone()
    bad[1, 0, 4] = float("nan")
    bad[2, 1, 3] = float("inf")
    cfg = SEDConfig(mask="all")
    _, loss, stats = run_op(bad.float(), target, cfg)
    _, good_loss, _ = run_op(logits.float(), target, cfg)
    assert torch.isnan(loss[1, 0]) and not torch.isfinite(loss[2, 1])
    keep = torch.ones_like(loss, dtype=torch.bool)
    keep[1, 0] = keep[2, 1] = False
    torch.testing.assert_close(loss[keep], good_loss[keep])
    summary = reduce_sed_stats(stats)
    assert summary["nonfinite_tokens"] == 2
    assert summary["num_tokens"] == 4 and math.isfinite(summary["ce_loss"])


def test_typed_stats_and_the_one_reduction_match_masked_means():
    """SEDStats is typed (attributes) and a mapping; sed_report's [sum, count] pairs (what
    Megatron logs) and reduce_sed_stats give the loss-masked means; loss_mask is in
    Megatron's [b, s] layout while the stats are [s, b]."""
    from megatron_sed import STAT_FIELDS, sed_report

    logits, target = make_inputs(6, 3, 25, seed=8)
    _, loss, stats = run_op(logits.float(), target, SEDConfig(mask="topk_mass", threshold=0.8))
    assert isinstance(stats, SEDStats) and stats.ce is stats["ce"]
    assert set(stats) == {f.name for f in STAT_FIELDS} and len(stats) == 7
    loss_mask = (target != -100).float()  # [s, b]
    loss_mask[0] = 0
    w = loss_mask.bool()
    summary = reduce_sed_stats(stats, loss_mask.t().contiguous())
    pairs = sed_report(stats, loss_mask.t().contiguous())
    assert summary["num_tokens"] == int(w.sum()) == float(pairs["ce loss"][1])
    for f in STAT_FIELDS:
        want = float(stats[f.name][w].double().mean())
        assert summary[f.metric_key] == pytest.approx(want, rel=1e-6), f.name
        assert float(pairs[f.report_key][0] / pairs[f.report_key][1]) == pytest.approx(want, rel=1e-5)
    with pytest.raises(KeyError, match="not an SED statistic"):
        stats["loss"]


def test_module_wrapper_and_chunking():
    """Results do not depend on the chunk size (one row per chunk vs all rows)."""
    logits, target = make_inputs(5, 3, 33, seed=9)
    outs = []
    for chunk_bytes in (1, 1 << 30):
        cfg = SEDConfig(
            mask="entropy",
            threshold=1.0,
            regularizer="entropy",
            top_k=4,
            kernel=KernelOptions(chunk_bytes=chunk_bytes),
        )
        module = SEDLoss(cfg)
        assert "entropy" in repr(module)
        x = logits.float().clone().requires_grad_()
        loss, stats = module(x, target)
        loss.sum().backward()
        outs.append((loss, stats["entropy"], x.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(coef=-0.1), "coef"),
        (dict(coef=float("nan")), "coef"),
        (dict(top_k=0), "top_k"),
        (dict(mask="bogus"), "bogus"),
        (dict(regularizer="l2"), "l2"),
        (dict(threshold=1.5), "threshold"),
        (dict(mask="entropy", threshold=-1.0), "threshold"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_config_raises(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SEDConfig(**kwargs)


def test_bad_inputs_raise_value_error_naming_the_value():
    logits = torch.randn(3, 2, 10)
    good = torch.randint(0, 10, (3, 2))
    with pytest.raises(ValueError, match="target id 10 .*\\[0, 10\\)"):
        bad = good.clone()
        bad[1, 1] = 10
        vocab_parallel_sed_loss(logits.clone(), bad)
    with pytest.raises(ValueError, match="target id -5"):
        bad = good.clone()
        bad[0, 0] = -5
        vocab_parallel_sed_loss(logits.clone(), bad)
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_sed_loss(logits.clone(), good[:2])
    with pytest.raises(ValueError, match="floating-point.*int64"):
        vocab_parallel_sed_loss(torch.ones(3, 2, 10, dtype=torch.int64), good)
    with pytest.raises(ValueError, match="integer tensor"):
        vocab_parallel_sed_loss(logits.clone(), good.float())
    with pytest.raises(ValueError, match="top_k=11 exceeds the vocabulary size 10"):
        vocab_parallel_sed_loss(logits.clone(), good, SEDConfig(top_k=11))


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_block_topk_equals_torch_topk(k):
    """The block-max top-k shortcut (taken when the shard is a multiple of 64 wide) gives
    torch.topk's values, ties across and within blocks included."""
    from megatron_sed.ops.torch_sed import VocabParallelSED

    g = torch.Generator().manual_seed(k)
    w = torch.randn(64, 1024, generator=g)
    w[:8] = torch.randint(-3, 3, (8, 1024), generator=g).float()  # many ties
    w[8, 5] = w[8, 700] = w[8, 701] = 50.0  # tied maxima in two blocks
    torch.testing.assert_close(
        VocabParallelSED.row_topk(w, k), torch.topk(w, k, dim=-1).values, rtol=0, atol=0
    )


def test_wide_vocab_matches_reference():
    """A 64-multiple vocabulary takes the block top-k path inside the op."""
    logits64, target = make_inputs(4, 2, 1024, seed=12, scale=6.0)
    cfg = SEDConfig(coef=0.8, top_k=2, threshold=0.6, mask="topk_mass")
    x, loss, stats = run_op(logits64.float(), target, cfg)
    ref_x = logits64.float().double().requires_grad_()
    ref_loss, ref_stats = reference_sed(ref_x, target, 0.8, 2, 0.6, "topk_mass", "quadratic")
    assert torch.equal(stats["mask"], ref_stats["mask"])
    torch.testing.assert_close(stats["topk_mass"].double(), ref_stats["topk_mass"], **TOL[torch.float32])
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[torch.float32])
    loss.sum().backward()
    ref_loss.sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, **GRAD_TOL[torch.float32])


def test_chunks_are_sized_for_the_device():
    """CPU: cache-sized chunks (one thread); GPU: a few large ones. At 8192 x 131072 fp32
    on a GPU that is 8 chunks (~80 kernel launches per forward) instead of 2,000."""
    from megatron_sed.ops.torch_sed import rows_per_chunk

    n, row = 8192, 131072 * 4
    opts = KernelOptions()
    gpu_rows = rows_per_chunk(n, row, torch.device("cuda"), opts)
    assert -(-n // gpu_rows) == 8
    torch.set_num_threads(1)
    cpu_rows = rows_per_chunk(n, row, torch.device("cpu"), opts)
    assert cpu_rows * row <= 2 << 20 and -(-n // cpu_rows) >= 1000
    assert rows_per_chunk(n, row, torch.device("cuda"), KernelOptions(chunk_bytes=row * 3)) == 3
    assert rows_per_chunk(10, 1 << 30, torch.device("cuda"), opts) == 1  # at least one row
