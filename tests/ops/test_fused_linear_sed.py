"""fused_linear_sed_loss (the output layer and the SED loss fused, logit-free) against the
float64 full-vocabulary reference and against the materialised path (output layer, then
vocab_parallel_sed_loss): loss, every statistic, dX and dW, at TP 1 (dtypes, regularisers,
chunk sizes, tied weights, Megatron's main_grad accumulation) and on a real gloo TP 2
world (with and without sequence parallelism, with the collectives counted)."""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import run_distributed
from tests.helpers.sed_reference import TOL, reference_sed

pytestmark = pytest.mark.compat

S, B, H, VOCAB = 8, 2, 16, 48  # S and VOCAB divisible by 2 (TP 2, SP)

# Largest error of dX / dW relative to the largest reference magnitude, per dtype: the
# gradient dz is formed in float32 and rounded once to the dtype (as autograd rounds the
# materialised one), then the two GEMMs run on those rounded values.
GRAD_REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(S, B, H, generator=g, dtype=torch.float64)).to(dtype)
    w = (torch.randn(VOCAB, H, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    # targets often the argmax (peaked, so top-k masses spread over (0, 1)), some ignored
    z = x.double() @ w.double().t()
    target = torch.randint(0, VOCAB, (S, B), generator=g)
    target = torch.where(torch.rand(S, B, generator=g) < 0.4, z.argmax(-1), target)
    target[0, 0] = target[3, 1] = -100
    grad = torch.rand(S, B, generator=g, dtype=torch.float64).float()
    return x, w, target, grad


def _cfg(regularizer="quadratic", mask="topk_mass"):
    from megatron_sed import SEDConfig

    threshold = 0.9 if mask == "topk_mass" else 1.0
    return SEDConfig(coef=0.7, top_k=3, threshold=threshold, mask=mask, regularizer=regularizer)


def _reference(x, w, target, grad, cfg):
    """Loss, stats, dX, dW in float64 from the dtype's own logits (what both paths see)."""
    logits = (x @ w.t()).double().requires_grad_()
    loss, stats = reference_sed(
        logits, target, cfg.coef, cfg.top_k, float(cfg.threshold), cfg.mask, cfg.regularizer
    )
    (loss * grad.double()).sum().backward()
    dz = logits.grad.reshape(-1, VOCAB)
    return loss, stats, dz @ w.double(), dz.t() @ x.double().reshape(-1, H)


def _assert_grad_close(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max() / expected.abs().max()
    assert err <= GRAD_REL_TOL[dtype], f"{what}: relative error {err:.3g} > {GRAD_REL_TOL[dtype]:g}"


def _assert_stats_close(stats, ref_stats, dtype):
    for name in ref_stats:
        if ref_stats[name].dtype == torch.bool:
            assert torch.equal(stats[name], ref_stats[name]), name
        else:
            torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[dtype], msg=name)


def _materialised(x, w, target, grad, cfg, tp_group=None):
    from megatron_sed import vocab_parallel_sed_loss

    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss, stats = vocab_parallel_sed_loss(torch.matmul(x, w.t()), target, cfg, tp_group=tp_group)
    (loss * grad).sum().backward()
    return loss, stats, x.grad, w.grad


def _loss_mask(seed=5):
    """A loss mask (0/1) and the upstream gradient Megatron's loss_func gives the per-token
    loss with it: one scalar (1 / tokens, the loss scale) times the mask."""
    hint = (torch.rand(S, B, generator=torch.Generator().manual_seed(seed)) < 0.7).float()
    return hint, 0.37 * hint


class _LogitGEMMs:
    """Counts the output layer's logit GEMMs (one per chunk and pass) of the fused op."""

    def __init__(self, monkeypatch):
        from megatron_sed.ops import fused_linear_sed

        self.calls = 0
        original = fused_linear_sed._ChunkBuffers.logits

        def counted(buffers, x_rows, weight):
            self.calls += 1
            return original(buffers, x_rows, weight)

        monkeypatch.setattr(fused_linear_sed._ChunkBuffers, "logits", counted)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("regularizer,mask", [("quadratic", "topk_mass"), ("entropy", "entropy")])
@pytest.mark.parametrize("upstream", ["any", "loss_mask"])
def test_fused_equals_reference_and_materialised(dtype, regularizer, mask, upstream, monkeypatch):
    """upstream "any": a general upstream gradient, no hint: the backward recomputes the
    logits. "loss_mask": the gradient is c x the hint (the trainer's case): computed in the
    forward, the backward forms no logits."""
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    x, w, target, grad = _inputs(dtype)
    hint = None
    if upstream == "loss_mask":
        hint, grad = _loss_mask()
    cfg = _cfg(regularizer, mask)
    ref_loss, ref_stats, ref_dx, ref_dw = _reference(x, w, target, grad, cfg)
    mat = _materialised(x, w, target, grad, cfg)
    gemms = _LogitGEMMs(monkeypatch)
    for chunk in (1, 5, None):  # one token per chunk, uneven chunks, the default
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = fused_linear_sed_loss(xf, wf, target, cfg, chunk_tokens=chunk, grad_hint=hint)
        chunks = -(-S * B // (chunk or S * B))
        assert gemms.calls == chunks
        (loss * grad).sum().backward()
        assert gemms.calls == chunks * (1 if hint is not None else 2), "logits formed in the backward"
        gemms.calls = 0
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[dtype])
        _assert_stats_close(stats, ref_stats, dtype)
        assert xf.grad.dtype == dtype and wf.grad.dtype == dtype
        _assert_grad_close(xf.grad, ref_dx.view(S, B, H), dtype, "dX")
        _assert_grad_close(wf.grad, ref_dw, dtype, "dW")
        # the materialised path: the same numbers up to the GEMMs' blocking (a chunk's
        # GEMM may sum in another order) and dW's rounding (here a float32 sum rounded
        # once; the materialised GEMM rounds its own sum: at most an ulp apart)
        torch.testing.assert_close(loss, mat[0], **TOL[dtype])
        _assert_stats_close(
            stats, {n: v.double() if v.is_floating_point() else v for n, v in mat[1].items()}, dtype
        )
        _assert_grad_close(xf.grad, mat[2].double(), dtype, "dX vs materialised")
        _assert_grad_close(wf.grad, mat[3].double(), dtype, "dW vs materialised")


def test_tied_weight_and_main_grad_accumulation():
    """Tied output weight (the embedding's, used twice: its two gradients add up) and
    Megatron's gradient-accumulation fusion (the float32 sum lands in main_grad, a dummy
    gradient is returned and grad_added_to_main_grad set, as in Megatron's linear layer)."""
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    _, w, target, grad = _inputs(torch.float32)
    tokens = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(3))
    cfg = _cfg()

    def run(fused, weight):
        hidden = torch.tanh(weight[tokens])  # the embedding lookup of the same weight
        if fused:
            loss, _ = fused_linear_sed_loss(hidden, weight, target, cfg, chunk_tokens=3)
        else:
            from megatron_sed import vocab_parallel_sed_loss

            loss, _ = vocab_parallel_sed_loss(hidden @ weight.t(), target, cfg)
        (loss * grad).sum().backward()
        return loss

    w_fused, w_mat = w.clone().requires_grad_(), w.clone().requires_grad_()
    torch.testing.assert_close(run(True, w_fused), run(False, w_mat), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_fused.grad, w_mat.grad, rtol=1e-6, atol=1e-6)

    # main_grad: at 16 tokens x hidden 16 the in-forward gradient's float32 buffer would
    # exceed its budget (recomputed in the backward); at 8 x 16 tokens it fits
    for repeat in (1, 8):
        weight = w.clone().requires_grad_()
        weight.main_grad = torch.full(w.shape, 0.5)  # an earlier micro-batch's gradient
        weight.grad_added_to_main_grad = False
        x = torch.randn(S * repeat, B, H).requires_grad_()
        tgt = target.repeat(repeat, 1)
        hint, upstream = (t.repeat(repeat, 1) for t in _loss_mask())
        loss, _ = fused_linear_sed_loss(
            x, weight, tgt, cfg, chunk_tokens=4, accumulate_into_main_grad=True, grad_hint=hint
        )
        (loss * upstream).sum().backward()
        mat = _materialised(x, w, tgt, upstream, cfg)
        assert weight.grad_added_to_main_grad is True
        torch.testing.assert_close(weight.main_grad, mat[3] + 0.5, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, mat[2], rtol=1e-6, atol=1e-6)


def test_gradient_not_proportional_to_the_hint_is_recomputed(monkeypatch):
    """A hint that does not match the upstream gradient (a caller weighting tokens some
    other way) must not give a wrong gradient: the backward notices and recomputes."""
    from megatron_sed.ops import fused_linear_sed

    x, w, target, grad = _inputs(torch.float32)
    hint, _ = _loss_mask()
    cfg = _cfg()
    mat = _materialised(x, w, target, grad, cfg)
    gemms = _LogitGEMMs(monkeypatch)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fused_linear_sed.fused_linear_sed_loss(xf, wf, target, cfg, chunk_tokens=4, grad_hint=hint)
    with pytest.warns(UserWarning, match="not proportional to grad_hint"):
        (loss * grad).sum().backward()
    assert gemms.calls == 2 * 4
    _assert_grad_close(xf.grad, mat[2].double(), torch.float32, "dX")
    _assert_grad_close(wf.grad, mat[3].double(), torch.float32, "dW")


def test_a_second_backward_of_the_graph_is_exact(monkeypatch):
    """retain_graph: the in-forward results were scaled in place by the first backward;
    the second recomputes (and the gradients add up to twice the materialised ones)."""
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    x, w, target, _ = _inputs(torch.float32)
    hint, grad = _loss_mask()
    cfg = _cfg()
    mat = _materialised(x, w, target, grad, cfg)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fused_linear_sed_loss(xf, wf, target, cfg, chunk_tokens=4, grad_hint=hint)
    (loss * grad).sum().backward(retain_graph=True)
    (loss * grad).sum().backward()
    _assert_grad_close(xf.grad, 2 * mat[2].double(), torch.float32, "dX")
    _assert_grad_close(wf.grad, 2 * mat[3].double(), torch.float32, "dW")


def test_grad_in_forward_memory_rule():
    """With gradient-accumulation fusion the in-forward gradient's float32 [V/tp, h]
    buffer is extra memory: spent only within 1/8 of the materialised logits plus
    gradient (Llama-3 8B, bf16, TP 1: from 32,768 tokens per micro-batch on)."""
    from megatron_sed.ops.fused_linear_sed import grad_in_forward_fits

    weight = torch.empty((128256, 4096), dtype=torch.bfloat16, device="meta")
    assert grad_in_forward_fits(8192, weight, into_main_grad=False)
    assert not grad_in_forward_fits(8192, weight, into_main_grad=True)
    assert not grad_in_forward_fits(32767, weight, into_main_grad=True)
    assert grad_in_forward_fits(32768, weight, into_main_grad=True)


def test_bad_inputs_are_named():
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    x, w, target, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"target shape \(2, 8\)"):
        fused_linear_sed_loss(x, w, target.t(), _cfg())
    with pytest.raises(ValueError, match="must share a float dtype"):
        fused_linear_sed_loss(x, w.double(), target, _cfg())
    bad = target.clone()
    bad[1, 1] = VOCAB
    with pytest.raises(ValueError, match=f"target id {VOCAB}"):
        fused_linear_sed_loss(x, w, bad, _cfg())
    with pytest.raises(ValueError, match="main_grad"):
        fused_linear_sed_loss(x, w, target, _cfg(), accumulate_into_main_grad=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_sed_loss(x, w, target, _cfg(), chunk_tokens=0)


def test_default_chunk_tokens():
    from megatron_sed.ops.fused_linear_sed import default_chunk_tokens

    assert default_chunk_tokens(8192, 128256) == 512  # 1/16 of the tokens
    assert default_chunk_tokens(32768, 152064) == 441  # 256 MiB of float32 logits
    assert default_chunk_tokens(1024, 32000) == 256  # GEMMs of at least 256 rows
    assert default_chunk_tokens(20, 32000) == 20


_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast")


def _tp2_checks(rank, world):
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    group = dist.new_group(list(range(world)))
    rows = slice(rank * VOCAB // world, (rank + 1) * VOCAB // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    for dtype in (torch.float32, torch.bfloat16):
        for regularizer, mask in (("quadratic", "topk_mass"), ("entropy", "all")):
            x, w, target, grad_any = _inputs(dtype, seed=1)
            cfg = _cfg(regularizer, mask)
            ref_any = _reference(x, w, target, grad_any, cfg)
            ref_masked = _reference(x, w, target, _loss_mask()[1], cfg)
            mat_any = _materialised(x, w[rows], target, grad_any, cfg, tp_group=group)
            hint, masked_grad = _loss_mask()
            mat_masked = _materialised(x, w[rows], target, masked_grad, cfg, tp_group=group)
            for sp, in_forward in ((False, False), (True, False), (False, True), (True, True)):
                grad = masked_grad if in_forward else grad_any
                mat = mat_masked if in_forward else mat_any
                ref_loss, ref_stats, ref_dx, ref_dw = ref_masked if in_forward else ref_any
                xl = (x[seq] if sp else x).clone().requires_grad_()
                wl = w[rows].clone().requires_grad_()
                counts = {}
                originals = {n: getattr(dist, n) for n in _COLLECTIVES}
                for name, fn in originals.items():

                    def counted(*a, _fn=fn, _name=name, _counts=counts, **k):
                        _counts[_name] = _counts.get(_name, 0) + 1
                        return _fn(*a, **k)

                    setattr(dist, name, counted)
                try:
                    loss, stats = fused_linear_sed_loss(
                        xl,
                        wl,
                        target,
                        cfg,
                        tp_group=group,
                        sequence_parallel=sp,
                        chunk_tokens=3,
                        grad_hint=hint if in_forward else None,
                    )
                    forward_counts = dict(counts)
                    (loss * grad).sum().backward()
                finally:
                    for name, fn in originals.items():
                        setattr(dist, name, fn)
                backward_counts = {n: counts[n] - forward_counts.get(n, 0) for n in counts}
                backward_counts = {n: c for n, c in backward_counts.items() if c}
                # recomputed in the backward: bounded, whatever the number of chunks (here
                # 6); in the forward: one small all-gather of the partials per chunk, the
                # hidden-state gradient reduced there too, nothing left for the backward
                if in_forward:
                    gathers = 6 + (1 if sp else 0)
                    reduce = "reduce_scatter_tensor" if sp else "all_reduce"
                    assert forward_counts == {"all_gather_into_tensor": gathers, reduce: 1}, forward_counts
                    assert backward_counts == {}, backward_counts
                elif sp:
                    assert forward_counts == {"all_gather_into_tensor": 2}, forward_counts
                    assert backward_counts == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
                else:
                    assert forward_counts == {"all_gather_into_tensor": 1}, forward_counts
                    assert backward_counts == {"all_reduce": 1}, backward_counts
                what = f"{dtype} {regularizer} sp={sp} in_forward={in_forward} rank {rank}"
                torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[dtype], msg=what)
                _assert_stats_close(stats, ref_stats, dtype)
                _assert_grad_close(
                    xl.grad, ref_dx.view(S, B, H)[seq if sp else slice(None)], dtype, what + " dX"
                )
                _assert_grad_close(wl.grad, ref_dw[rows], dtype, what + " dW")
                torch.testing.assert_close(loss, mat[0], **TOL[dtype], msg=what)
                # materialised dX: the local part of the full-sequence gradient, without
                # Megatron's TP all-reduce (the raw matmul here): sum it over ranks
                mat_dx = mat[2].clone()
                dist.all_reduce(mat_dx, group=group)
                _assert_grad_close(
                    xl.grad, (mat_dx[seq] if sp else mat_dx).double(), dtype, what + " dX vs mat."
                )


@pytest.mark.parametrize("world", [2])
def test_fused_tensor_and_sequence_parallel(world):
    run_distributed(_tp2_checks, world)
