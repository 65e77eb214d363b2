"""Triton SED kernels (run on CPU tensors by the Triton interpreter) against the torch
implementation and an independent float64 full-vocabulary reference written here.

The interpreter executes each program in Python, so shapes stay tiny; the block size
(KernelOptions.block_size) is set small so the online max / sum-exp / top-k updates cross
several blocks and a ragged tail.
"""

import os
import subprocess
import sys
import textwrap

import pytest

# The interpreter must be chosen before triton is first imported (triton.jit decides
# at decoration time); scripts/test.sh exports it for the whole suite.
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

triton = pytest.importorskip("triton")

from megatron_sed import KernelOptions, vocab_parallel_sed_loss  # noqa: E402
from megatron_sed import SEDConfig as _SEDConfig  # noqa: E402
from megatron_sed.ops import triton_sed  # noqa: E402
from megatron_sed.ops.triton_sed import sed_partials  # noqa: E402

if not torch.cuda.is_available() and not triton_sed.kernels_interpreted():
    pytest.skip(
        "triton was imported without TRITON_INTERPRET=1 and there is no GPU: the kernels "
        "cannot run (run the suite through scripts/test.sh)",
        allow_module_level=True,
    )

from tests.helpers.sed_reference import GRAD_TOL, TOL, reference_sed  # noqa: E402 (after the skip above)
from tests.helpers.sed_reference import make_inputs as make_sed_inputs  # noqa: E402

pytestmark = [
    pytest.mark.compat,
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]  # the interpreter's nan*0 lanes

IGNORE = -100


# float64 reference, inputs and tolerances shared with the torch path's tests
def reference(logits, target, coef, top_k, threshold, mask, regularizer):
    return reference_sed(logits, target, coef, top_k, threshold, mask, regularizer, IGNORE)


def make_inputs(s, b, vocab, seed, scale=3.0):
    return make_sed_inputs(s, b, vocab, seed, scale=scale, ignore_frac=0.2, ignore_index=IGNORE)


SMALL_BLOCKS = KernelOptions(block_size=16)


def SEDConfig(**kw):  # noqa: N802 - the tests' configs: small Triton blocks
    return _SEDConfig(kernel=kw.pop("kernel", SMALL_BLOCKS), **kw)


def run(logits, target, cfg, grad_out):
    x = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_sed_loss(x, target, cfg)
    (loss.double() * grad_out).sum().backward()
    return loss, stats, x.grad


CASES = [  # (dtype, mask, regularizer, threshold): every mask, both regularisers, every dtype
    (torch.float32, "topk_mass", "quadratic", 0.8),
    (torch.float32, "entropy", "quadratic", 1.0),
    (torch.float32, "all", "entropy", 0.5),
    (torch.float32, "none", "quadratic", 0.5),
    (torch.float32, "topk_mass", "entropy", 0.8),
    (torch.bfloat16, "topk_mass", "quadratic", 0.8),
    (torch.bfloat16, "entropy", "entropy", 1.0),
    (torch.float16, "topk_mass", "quadratic", 0.8),
    (torch.float16, "all", "entropy", 0.5),
    (torch.float64, "topk_mass", "entropy", 0.8),
]


@pytest.mark.parametrize("dtype,mask,regularizer,threshold", CASES)
def test_matches_reference_and_torch(dtype, mask, regularizer, threshold):
    logits64, target = make_inputs(5, 3, 50, seed=11)
    logits = logits64.to(dtype)
    cfg = SEDConfig(coef=0.8, top_k=3, threshold=threshold, mask=mask, regularizer=regularizer, impl="triton")
    grad_out = torch.rand(target.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    loss, stats, grad = run(logits, target, cfg, grad_out)
    t_loss, t_stats, t_grad = run(logits, target, cfg.replace(impl="torch"), grad_out)
    ref_x = logits.double().requires_grad_()
    ref_loss, ref_stats = reference(ref_x, target, 0.8, 3, threshold, mask, regularizer)
    (ref_loss * grad_out).sum().backward()

    assert loss.dtype == t_loss.dtype and loss.shape == target.shape and grad.dtype == dtype
    assert not loss.isnan().any() and not grad.isnan().any()
    assert torch.equal(stats["mask"], ref_stats["mask"]) and torch.equal(stats["mask"], t_stats["mask"])
    if mask in ("topk_mass", "entropy"):
        assert 0 < int(stats["mask"].sum()) < int((target != IGNORE).sum()), "mask should be mixed"
    assert torch.equal(stats["correct"], ref_stats["correct"])
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[dtype])
    torch.testing.assert_close(loss, t_loss, **TOL[dtype])
    for name in ("ce", "reg", "target_prob", "entropy", "topk_mass"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[dtype], msg=name)
        torch.testing.assert_close(stats[name], t_stats[name], **TOL[dtype], msg=name)
    torch.testing.assert_close(grad.double(), ref_x.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(grad, t_grad, **GRAD_TOL[dtype])
    # ignored targets: exactly zero loss and gradient
    ignored = target == IGNORE
    assert ignored.any() and (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


def test_partials_ties_padding_and_neg_inf():
    """The raw partials against float64: tied logits (top-k keeps duplicates), -inf logits
    filling the first block, a shard narrower than top_k, targets outside the shard."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (6, 37), generator=g).double()  # many ties
    x[1, :20] = float("-inf")  # first block (and part of the second) all -inf
    x[2, 5] = x[2, 30] = 9.0  # the top value twice, in different blocks
    target = torch.tensor([0, 36, 5, 100, -3, IGNORE])  # 100 and -3: other shards
    vocab_start = 0
    for dtype, tol in ((torch.float32, dict(rtol=1e-6, atol=1e-6)), (torch.float64, {})):
        p = sed_partials(x.to(dtype), target, vocab_start, 5, SMALL_BLOCKS).double()
        m = x.max(-1).values
        e = torch.exp(x - m[:, None])
        torch.testing.assert_close(p[:, 0], m, **tol)
        torch.testing.assert_close(p[:, 1], e.sum(-1), **tol)
        torch.testing.assert_close(p[:, 2], torch.where(e > 0, e * (x - m[:, None]), 0.0).sum(-1), **tol)
        in_shard = (target >= 0) & (target < 37)
        z_y = x.gather(1, target.clamp(0, 36)[:, None]).squeeze(1)
        torch.testing.assert_close(p[:, 3], torch.where(in_shard, z_y, 0.0), **tol)
        torch.testing.assert_close(p[:, 4:], x.topk(5, dim=-1).values, **tol)
    narrow = sed_partials(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([2]), 0, 5, SMALL_BLOCKS)
    assert narrow[0, 4:].tolist() == [3.0, 2.0, 1.0, float("-inf"), float("-inf")]
    assert narrow[0, 3].item() == 2.0


def test_gradcheck_float64():
    # The entropy regulariser exercises every term of the backward (alpha, beta log p, gamma).
    logits, target = make_inputs(1, 2, 6, seed=5, scale=1.5)
    cfg = SEDConfig(coef=0.9, top_k=2, threshold=0.7, mask="all", regularizer="entropy", impl="triton")
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_sed_loss(z, target, cfg)[0], (x,))


def test_grad_in_place_writes_over_the_logits():
    logits, target = make_inputs(3, 2, 20, seed=7)
    grads = {}
    for in_place in (False, True):
        cfg = SEDConfig(
            coef=1.0,
            top_k=2,
            threshold=0.9,
            impl="triton",
            kernel=KernelOptions(block_size=16, grad_in_place=in_place),
        )
        leaf = logits.to(torch.bfloat16).requires_grad_()
        y = leaf * 1  # a non-leaf, like the output layer's logits
        seen = {}
        y.register_hook(lambda grad, seen=seen: seen.update(grad=grad))
        loss, _ = vocab_parallel_sed_loss(y, target, cfg)  # the public API reaches it
        loss.sum().backward()
        assert (seen["grad"].data_ptr() == y.data_ptr()) == in_place
        grads[in_place] = leaf.grad
    assert torch.equal(grads[True], grads[False])


def test_top_k_above_kernel_limit():
    logits, target = make_inputs(2, 2, 20, seed=8)
    cfg = SEDConfig(top_k=triton_sed.MAX_TOP_K + 1, threshold=0.9, impl="triton")
    with pytest.raises(ValueError, match="top_k=9"):
        vocab_parallel_sed_loss(logits.float(), target, cfg)
    # impl="auto" (Triton on CUDA tensors) falls back to the torch implementation.
    from megatron_sed.ops.sed_loss import choose_impl

    auto = cfg.replace(impl="auto")
    cuda_like = type("CudaLogits", (), {"is_cuda": True, "dtype": torch.float32})()
    assert choose_impl(cuda_like, auto) == "torch"
    assert choose_impl(logits.float(), cfg.replace(top_k=2)) == "triton"
    assert choose_impl(logits.float(), auto.replace(top_k=2)) == "torch"  # CPU tensors


# ----------------------------------------------------------------------------- TP = 2
def _tp_worker(rank, world_size):
    import torch.distributed as dist

    logits64, target = make_inputs(4, 2, 26, seed=21)  # identical on every rank
    shard = 26 // world_size
    grad_out = torch.rand(target.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for dtype, mask, regularizer, threshold in (
        (torch.float32, "topk_mass", "quadratic", 0.8),
        (torch.bfloat16, "entropy", "entropy", 1.0),
    ):
        logits = logits64.to(dtype)
        cfg = SEDConfig(
            coef=0.7, top_k=3, threshold=threshold, mask=mask, regularizer=regularizer, impl="triton"
        )
        x = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
        loss, stats = vocab_parallel_sed_loss(x, target, cfg, tp_group=dist.group.WORLD)
        (loss.double() * grad_out).sum().backward()
        ref_x = logits.double().requires_grad_()
        ref_loss, ref_stats = reference(ref_x, target, 0.7, 3, threshold, mask, regularizer)
        (ref_loss * grad_out).sum().backward()
        assert torch.equal(stats["mask"], ref_stats["mask"]), (rank, mask)
        assert torch.equal(stats["correct"], ref_stats["correct"])
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL[dtype])
        for name in ("ce", "reg", "target_prob", "entropy", "topk_mass"):
            torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[dtype], msg=name)
        ref_grad = ref_x.grad[..., rank * shard : (rank + 1) * shard]
        torch.testing.assert_close(x.grad.double(), ref_grad, **GRAD_TOL[dtype])


def test_tensor_parallel_2():
    from tests.helpers.dist import run_distributed

    run_distributed(_tp_worker, 2)


# ----------------------------------------------------------------------------- GPU compile
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from megatron_sed.ops import triton_kernels as K
    target = GPUTarget("cuda", 90, 32)
    for ptr, acc, ACC in (("*bf16", "*fp32", tl.float32), ("*fp64", "*fp64", tl.float64)):
        fwd = dict(logits_ptr=ptr, stride_row="i64", target_ptr="*i64", partials_ptr=acc, n_cols="i32",
                   vocab_start="i32", NUM_PARTIAL_COLS="constexpr", K="constexpr", KP="constexpr",
                   BLOCK="constexpr", ACC="constexpr")
        triton.compile(ASTSource(K.sed_partials_kernel, fwd, dict(NUM_PARTIAL_COLS=12, K=8, KP=8, BLOCK=4096, ACC=ACC)),
                       target=target, options=dict(num_warps=8))
        bwd = dict(logits_ptr=ptr, stride_row="i64", grad_ptr=ptr, grad_stride_row="i64", target_ptr="*i64",
                   lse_ptr=acc, alpha_ptr=acc, beta_ptr=acc, gamma_ptr=acc, n_cols="i32", vocab_start="i32",
                   USE_LOG="constexpr", BLOCK="constexpr", ACC="constexpr")
        triton.compile(ASTSource(K.sed_grad_kernel, bwd, dict(USE_LOG=True, BLOCK=4096, ACC=ACC)),
                       target=target, options=dict(num_warps=8))
    print("compiled")
    """
)


def test_kernels_compile_for_hopper():
    """The interpreter is lenient about types; compile the real kernels for sm_90 (PTX and
    cubin with the ptxas shipped in the triton wheel). No GPU needed."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip(f"no ptxas available: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- benchmark
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_loss_bench.py")


def test_gpu_benchmark_dry_run(tmp_path):
    """The GPU benchmark end to end on CPU at a tiny size (its timings mean nothing here)."""
    out = tmp_path / "table.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    methods = ["megatron_ce_unfused", "megatron_ce_fused", "sed_torch", "sed_triton_inplace"]
    proc = subprocess.run(
        [sys.executable, BENCH, "--dry-run", "--methods", *methods, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 8 |")]
    assert [r.split("|")[2].strip() for r in rows] == methods
    triton_row = rows[-1].split("|")
    assert float(triton_row[5]) > 0  # total ms
    assert float(triton_row[11]) < 1e-5  # loss difference against the torch SED
    assert "skipped" in rows[1]


def test_gpu_benchmark_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_loss_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look the module up
    try:
        spec.loader.exec_module(bench)
        assert bench.main([]) == 1
    finally:
        sys.modules.pop(spec.name, None)
    assert "no CUDA device" in capsys.readouterr().err
