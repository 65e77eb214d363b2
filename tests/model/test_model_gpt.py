"""GPTModel on CPU with the SDPA local spec: forward, TP=2 == TP=1, packed masks, and the
SED loss hook against an independent float64 reference."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_sed.data.reader import build_block_causal_mask
from tests.helpers.attention import tiny_sdpa_attention
from tests.helpers.dist import run_distributed
from tests.helpers.model_args import tiny_model_args
from tests.helpers.sed_reference import reference_sed


def tiny_args(**over):
    return tiny_model_args(**over)


def _build(tp, **over):
    from megatron.core import parallel_state as ps

    from megatron_sed.model import build_gpt_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(1234)
    # Same padded vocab at TP 1 and 2 (Megatron pads to divisible_by * tp).
    return build_gpt_model(tiny_args(tensor_model_parallel_size=tp, padded_vocab_size=256, **over))


def _inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 250, (2, 32), generator=g)
    pos = torch.arange(32).repeat(2, 1)
    return tokens, pos


def _gather_vocab(logits):
    """All-gather the vocab-parallel last dim (Megatron's gather allocates on CUDA)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


VARIANTS = {
    "rope_gqa_swiglu_rms_untied": {},
    "learned_ln_gelu_tied_bias": {
        "normalization": "LayerNorm",
        "swiglu": False,
        "position_embedding_type": "learned_absolute",
        "untie_embeddings_and_output_weights": False,
        "group_query_attention": False,
    },
}


def _tp_worker(rank, world, out_dir):
    """Everything that must agree between TP=1 and TP=2, computed in one spawn."""
    from megatron.core import parallel_state as ps

    from megatron_sed import SEDConfig
    from megatron_sed.model import SEDLossContext, attach_sed

    out = {}
    tokens, pos = _inputs()
    labels = torch.roll(tokens, -1, 1)
    labels[:, -3:] = -100
    for name, over in VARIANTS.items():
        model = _build(world, **over)
        with torch.no_grad():
            out[name] = _gather_vocab(model(tokens, pos, None))
        ps.destroy_model_parallel()
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.999, mask="topk_mass")
    model = _build(world)
    ctx = SEDLossContext(cfg)
    loss = model(tokens, pos, None, labels=labels, **attach_sed(model, ctx))
    stats = ctx.take_stats()
    assert stats is not None and ctx.take_stats() is None
    loss.sum().backward()  # the hook is differentiable end to end
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out["hook_logits"] = _gather_vocab(model(tokens, pos, None)).double()
        # no SED attached: Megatron's own CE path (vocab_parallel_cross_entropy)
        out["megatron_ce"] = model(tokens, pos, None, labels=labels.clamp(min=0))
    out.update(hook_loss=loss.detach(), labels=labels, entropy=stats["entropy"])
    if world == 1:
        ps.destroy_model_parallel()
        out["packed"] = _packed_checks()
    if rank == 0:
        torch.save(out, f"{out_dir}/tp{world}.pt")


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    run_distributed(_tp_worker, 1, str(d))
    run_distributed(_tp_worker, 2, str(d))
    return torch.load(d / "tp1.pt"), torch.load(d / "tp2.pt")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_logits_match_tp1(tp_results, variant):
    a, b = tp_results[0][variant], tp_results[1][variant]
    assert a.shape == b.shape == (2, 32, 256)
    assert a.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def _packed_checks():
    """Packed samples: outputs equal the samples run alone; changing one sample does not
    change the other (runs inside the TP=1 spawn of the fixture)."""
    model = _build(1)
    model.eval()
    tokens, _ = _inputs()
    # Row 0 packs sample A (10 tokens) then sample B (22 tokens), positions reset.
    seg = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    pos = torch.cat([torch.arange(10), torch.arange(22)]).unsqueeze(0).repeat(2, 1)
    pos[1] = torch.arange(32)
    mask = build_block_causal_mask(seg)
    with torch.no_grad():
        packed = model(tokens, pos, mask)
        alone_b = model(tokens[:1, 10:], torch.arange(22)[None], None)
        alone_a = model(tokens[:1, :10], torch.arange(10)[None], None)
        changed = tokens.clone()
        changed[0, :10] = (changed[0, :10] + 1) % 250  # perturb A: B must not notice
        packed2 = model(changed, pos, mask)
    return {
        "b_packed_vs_alone": (packed[0, 10:] - alone_b[0]).abs().max().item(),
        "a_packed_vs_alone": (packed[0, :10] - alone_a[0]).abs().max().item(),
        "b_after_changing_a": (packed2[0, 10:] - packed[0, 10:]).abs().max().item(),
        "a_after_changing_a": (packed2[0, :10] - packed[0, :10]).abs().max().item(),
    }


def test_packed_mask_blocks_cross_sample_attention(tp_results):
    d = tp_results[0]["packed"]
    assert d["b_packed_vs_alone"] < 1e-5 and d["a_packed_vs_alone"] < 1e-5, d
    assert d["b_after_changing_a"] < 1e-6, d  # B never sees A
    assert d["a_after_changing_a"] > 1e-3, d  # the perturbation is real


def test_sdpa_core_attention_matches_reference():
    """GQA, causal + extra mask, [s, b, h, d] layout, against float64 naive attention."""
    attn = tiny_sdpa_attention()
    s, b = 6, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, 4, 8, generator=g)
    k = torch.randn(s, b, 2, 8, generator=g)
    v = torch.randn(s, b, 2, 8, generator=g)
    extra = torch.zeros(b, 1, s, s, dtype=torch.bool)
    extra[1, 0, 4:, :2] = True  # batch 1: last tokens may not see the first two
    out = attn(q, k, v, extra)
    assert out.shape == (s, b, 32)
    qd, kd, vd = q.double(), k.double().repeat_interleave(2, 2), v.double().repeat_interleave(2, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", qd, kd) / math.sqrt(8)
    masked = extra | torch.ones(s, s, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(masked, float("-inf"))
    ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vd).reshape(s, b, 32)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
def test_sed_hook_matches_float64_reference(tp_results, tp):
    d = tp_results[tp - 1]
    logits, labels = d["hook_logits"], d["labels"]
    valid = labels != -100
    ref, stats = reference_sed(logits, labels, 1.0, 2, 0.999, "topk_mass", "quadratic")
    ce, ent = stats["ce"], stats["entropy"]
    assert d["hook_loss"].shape == (2, 32)
    torch.testing.assert_close(d["hook_loss"].double(), ref, atol=1e-4, rtol=1e-4)
    # Megatron's CE on the same model (no hook) equals the reference CE
    torch.testing.assert_close(d["megatron_ce"].double()[valid], ce[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d["entropy"].double().t()[valid], ent[valid], atol=1e-4, rtol=1e-4)
