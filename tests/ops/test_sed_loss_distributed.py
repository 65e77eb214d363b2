"""vocab_parallel_sed_loss across real gloo tensor-parallel groups of 1, 2 and 4 ranks:
against the float64 full-vocab reference, against Megatron's own vocab-parallel CE, and
with a count of the collectives it issues."""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import run_distributed
from tests.helpers.sed_reference import make_inputs, reference_sed

pytestmark = pytest.mark.compat

VOCAB = 48  # divisible by 1, 2, 4


def _shard(full, rank, world):
    per = full.shape[-1] // world
    # clone: float32 shards are overwritten in place by the op (like Megatron's CE)
    return full[..., rank * per : (rank + 1) * per].clone()


def _count_collectives(monkeypatch_targets):
    """Wrap torch.distributed collectives with counters; returns (counts, restore)."""
    counts = {}
    originals = {}
    for name in monkeypatch_targets:
        fn = getattr(dist, name)
        originals[name] = fn

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)

    def restore():
        for name, fn in originals.items():
            setattr(dist, name, fn)

    return counts, restore


COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "gather",
]


def _check_against_reference(rank, world, dtype_name):
    from megatron_sed import SEDConfig, vocab_parallel_sed_loss

    dtype = getattr(torch, dtype_name)
    group = dist.new_group(list(range(world)))
    logits64, target = make_inputs(6, 2, VOCAB, seed=11)
    logits = logits64.to(dtype)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-5)
    gtol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-3, rtol=1e-2)
    if dtype == torch.float32:
        gtol = dict(atol=1e-6, rtol=1e-4)
    for mask, reg, thr in [
        ("topk_mass", "quadratic", 0.8),
        ("entropy", "entropy", 1.0),
        ("all", "quadratic", 0.5),
    ]:
        cfg = SEDConfig(coef=0.7, top_k=3, threshold=thr, mask=mask, regularizer=reg)
        x = _shard(logits, rank, world).requires_grad_()
        counts, restore = _count_collectives(COLLECTIVES)
        try:
            loss, stats = vocab_parallel_sed_loss(x, target, cfg, tp_group=group)
            grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).view_as(loss)
            (loss.double() * grad_out).sum().backward()
        finally:
            restore()
        # one collective in forward, none in backward
        if world > 1:
            assert counts == {"all_gather_into_tensor": 1}, counts
        else:
            assert counts == {}, counts

        ref_x = logits.double().clone().requires_grad_()
        ref_loss, ref_stats = reference_sed(ref_x, target, 0.7, 3, thr, mask, reg)
        (ref_loss * grad_out).sum().backward()
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **tol)
        assert torch.equal(stats["mask"], ref_stats["mask"])
        assert torch.equal(stats["correct"], ref_stats["correct"])
        for name in ("ce", "reg", "target_prob", "entropy", "topk_mass"):
            torch.testing.assert_close(stats[name].double(), ref_stats[name], **tol, msg=name)
        torch.testing.assert_close(x.grad.double(), _shard(ref_x.grad, rank, world), **gtol)

        # stats identical on every TP rank (bitwise)
        flat = torch.cat([loss.double().view(-1)] + [stats[k].double().view(-1) for k in sorted(stats)])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat, group=group)
        for other in gathered:
            assert torch.equal(other, flat)


def _check_ce_equals_megatron(rank, world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sed import SEDConfig, vocab_parallel_sed_loss

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    logits64, target = make_inputs(5, 3, VOCAB, seed=21, ignore_frac=0.0)
    grad_out = torch.rand(5, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    for cfg in (SEDConfig(coef=0.0, mask="all"), SEDConfig(coef=1.0, mask="none")):
        ours = _shard(logits64.float(), rank, world).requires_grad_()
        loss, _ = vocab_parallel_sed_loss(ours, target, cfg)  # tp_group=None -> Megatron's TP group
        (loss * grad_out).sum().backward()
        theirs = _shard(logits64.float(), rank, world).requires_grad_()
        ref = vocab_parallel_cross_entropy(theirs, target)
        (ref * grad_out).sum().backward()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)


def _check_top_k_larger_than_shard(rank, world):
    """k larger than a rank's vocab slice: the global top-k still comes out exact."""
    from megatron_sed import SEDConfig, vocab_parallel_sed_loss

    group = dist.new_group(list(range(world)))
    logits, target = make_inputs(4, 2, 8, seed=3)  # 2 columns per rank at TP=4
    cfg = SEDConfig(top_k=5, threshold=0.9, mask="topk_mass")
    _, stats = vocab_parallel_sed_loss(_shard(logits, rank, world), target, cfg, tp_group=group)
    _, ref = reference_sed(logits, target, 1.0, 5, 0.9, "topk_mass", "quadratic")
    torch.testing.assert_close(stats["topk_mass"], ref["topk_mass"])


def _all_checks(rank, world):
    # One spawned world per size runs every check: spawning ranks (importing torch and
    # megatron-core) dominates the cost of these tests.
    for dtype_name in ("float64", "float32", "bfloat16"):
        _check_against_reference(rank, world, dtype_name)
    if world == 4:
        _check_top_k_larger_than_shard(rank, world)
    _check_ce_equals_megatron(rank, world)


@pytest.mark.parametrize("world", [1, 2, pytest.param(4, marks=pytest.mark.world4)])
def test_tensor_parallel_sed_loss(world):
    """float64/float32/bf16 vs the reference, one collective, bitwise-identical stats on
    all ranks; coef=0 and mask='none' equal Megatron's vocab_parallel_cross_entropy."""
    run_distributed(_all_checks, world)
