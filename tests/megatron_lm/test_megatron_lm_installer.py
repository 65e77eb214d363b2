"""megatron_sed.megatron_lm on Megatron-Core's GPTModel alone (no Megatron-LM needed).

The patched loss path (install_sed_loss) must give the loss op's result, match an
independent float64 full-vocab reference, backpropagate the same gradients, feed
`add_sed_report` the right [sum, count] pairs, and leave Megatron's CE untouched for
--loss-type ce. Real gloo worlds of 1 and 2 tensor-parallel ranks.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from megatron_sed import megatron_lm
from megatron_sed.flags import add_sed_args
from tests.helpers.dist import run_distributed
from tests.helpers.sed_reference import reference_sed

pytestmark = pytest.mark.compat

VOCAB, SEQ, BATCH, HIDDEN = 64, 8, 3, 16


def _args(*argv):
    parser = megatron_lm.extra_args_provider()(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    return parser.parse_args(list(argv))


def _build_model(seed=1234):
    """A 1-layer GPTModel from Megatron-Core's local spec, attention left out (it
    needs CUDA and is irrelevant to the loss path), deterministic CPU init."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = IdentityOp
    spec.submodules.self_attn_bda = IdentityFuncOp
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=torch.distributed.get_world_size(),
    )
    torch.manual_seed(seed)
    return GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def _full_logits64(model, tokens, positions):
    """[b, s, V] float64 logits gathered over the TP ranks (labels=None path)."""
    local = model(tokens, positions, None).detach().to(torch.float64)  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)


def _reference(logits64, tokens, tau, coef, top_k=2):
    """The shared float64 full-vocab reference (tests.helpers.sed_reference) as [b, s]
    float64 tensors: the loss plus every statistic the report carries."""
    loss, stats = reference_sed(logits64, tokens, coef, top_k, tau, "topk_mass", "quadratic")
    return {"loss": loss, **{k: v.double() for k, v in stats.items()}}


class _Wrapper(torch.nn.Module):
    """Stands in for Megatron's Float16Module / DDP wrappers."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def _worker(rank, world_size):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) < 0.7).to(torch.float32)

    # --- reference: the untouched model, the op on its logits, float64 math.
    ref_model = _build_model()
    logits64 = _full_logits64(ref_model, tokens, positions)
    topk = torch.softmax(logits64, -1).topk(2, dim=-1).values.sum(-1)
    # About half the tokens regularised; tau halfway between two observed top-k masses
    # so float32 vs float64 rounding cannot flip a token's mask.
    srt = topk.flatten().sort().values
    mid = srt.numel() // 2
    tau = float((srt[mid - 1] + srt[mid]) / 2)
    coef = 0.7
    ref = _reference(logits64, tokens, tau, coef)
    assert 0.2 < ref["mask"].mean() < 0.8

    args = _args("--loss-type", "sed", "--sed-threshold", repr(tau), "--sed-coef", str(coef))
    from megatron_sed import vocab_parallel_sed_loss
    from megatron_sed.flags import sed_config_from_args

    local_logits = ref_model(tokens, positions, None)  # [b, s, V/tp]
    op_loss, _ = vocab_parallel_sed_loss(
        local_logits.transpose(0, 1).contiguous(), tokens.t().contiguous(), sed_config_from_args(args)
    )
    (op_loss.t() * loss_mask).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}

    # --- the patched loss path, installed through a wrapper, twice (idempotent).
    model = _build_model()
    wrapped = _Wrapper(model)
    assert megatron_lm.install_sed_loss(wrapped, args) == 1
    method = model.forward
    assert megatron_lm.install_sed_loss(wrapped, args) == 1
    assert megatron_lm.install_sed_loss([wrapped], args) == 1
    assert model.forward is method, "re-installing must not wrap twice"

    out = wrapped(tokens, positions, None, labels=tokens)  # [b, s]
    assert out.shape == (BATCH, SEQ)
    torch.testing.assert_close(out, op_loss.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    (out * loss_mask).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    # --- the report dict: [sum, count] pairs over loss-masked tokens, as loss_func gets it.
    report = {"lm loss": torch.tensor([0.0, 1.0])}
    megatron_lm.add_sed_report(report, loss_mask.view(-1), wrapped)
    count = loss_mask.sum()
    for key, stat in megatron_lm.REPORT_KEYS.items():
        pair = report[key]
        assert pair.shape == (2,) and pair.dtype == torch.float32, key
        assert pair[1] == count, key
        want = (ref[stat] * loss_mask.double()).sum()
        torch.testing.assert_close(pair[0].double(), want, rtol=1e-5, atol=1e-5, msg=key)
    # Stats are consumed: the next micro-batch's report only gets its own.
    assert megatron_lm.add_sed_report({}, loss_mask, wrapped) == {}

    # --- --loss-type ce: nothing installed, Megatron's own CE, no SED keys.
    ce_model = _build_model()
    assert megatron_lm.install_sed_loss(ce_model, _args("--loss-type", "ce")) == 0
    assert "forward" not in ce_model.__dict__ and "compute_language_model_loss" not in ce_model.__dict__
    ce_out = ce_model(tokens, positions, None, labels=tokens)
    torch.testing.assert_close(ce_out.double(), ref["ce"], rtol=1e-5, atol=1e-5)
    assert megatron_lm.add_sed_report({}, loss_mask, ce_model) == {}

    # --- SED with coef 0 through the patched path equals Megatron's CE path.
    zero = _build_model()
    megatron_lm.install_sed_loss(zero, _args("--loss-type", "sed", "--sed-coef", "0"))
    torch.testing.assert_close(zero(tokens, positions, None, labels=tokens), ce_out, rtol=0, atol=1e-6)

    # --- the route megatron-sed-train takes (attach_sed: output_processor where
    # megatron-core has it, the compute_language_model_loss override otherwise): the
    # context is per forward, so a moving threshold (the EMA tracker) takes effect at the
    # next forward, its stats come back with it, and a forward without one is Megatron's CE.
    from megatron_sed.model.sed_route import SEDLossContext, attach_sed

    over = _build_model()
    over.load_state_dict(model.state_dict())
    over_wrapped = _Wrapper(over)
    cfg = sed_config_from_args(args)
    ctx = SEDLossContext(cfg)
    got = over_wrapped(tokens, positions, None, labels=tokens, **attach_sed(over_wrapped, ctx))
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    assert ctx.stats is not None
    srt_all = srt.tolist()
    tau2 = float((srt_all[mid // 2 - 1] + srt_all[mid // 2]) / 2)  # about a quarter masked
    ctx2 = SEDLossContext(dataclasses.replace(cfg, threshold=tau2))
    out2 = over_wrapped(tokens, positions, None, labels=tokens, **attach_sed(over_wrapped, ctx2))
    ref2 = _reference(logits64, tokens, tau2, coef)
    assert ref2["mask"].sum() < ref["mask"].sum()
    torch.testing.assert_close(out2.double(), ref2["loss"], rtol=1e-5, atol=1e-5)
    want = ref2["mask"].t() * loss_mask.t().double()
    torch.testing.assert_close((ctx2.stats["mask"].double() * loss_mask.t().double()).sum(), want.sum())
    torch.testing.assert_close(
        over_wrapped(tokens, positions, None, labels=tokens), ce_out, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("world_size", [1, 2])
def test_installed_loss_matches_op_reference_and_megatron_ce(world_size):
    run_distributed(_worker, world_size)


def test_extra_args_provider_rejects_bad_flags_like_argparse(capsys):
    for argv, culprit in [
        (["--loss-type", "sed", "--sed-top-k", "0"], "--sed-top-k"),
        (["--loss-type", "sed", "--sed-coef", "-1"], "--sed-coef"),
        (["--loss-type", "sed", "--sed-threshold", "1.5"], "--sed-threshold"),
        (["--loss-type", "sed", "--sed-mask-ratio", "0.3", "--sed-mask", "all"], "--sed-mask-ratio"),
        (["--loss-type", "focal"], "--loss-type"),
    ]:
        with pytest.raises(SystemExit) as exc:
            _args(*argv)
        assert exc.value.code == 2
        assert culprit in capsys.readouterr().err, argv
    ok = _args("--loss-type", "sed", "--sed-lambda", "0.5", "--sed-threshold", "0.9")
    assert (ok.loss_type, ok.sed_coef, ok.sed_threshold) == ("sed", 0.5, 0.9)


def test_linear_cross_entropy_fusion_is_refused_with_sed(capsys):
    """A Megatron-LM whose parser has --cross-entropy-fusion-impl linear (its dev branch)
    would fuse the output layer with its own CE, bypassing the SED override: refused with
    SED (megatron-sed-train has the fused SED path); the chunk knob is the trainer's."""

    def megatron_lm_flags(parser):
        parser.add_argument("--cross-entropy-loss-fusion", action="store_true")
        parser.add_argument(
            "--cross-entropy-fusion-impl", default="native", choices=["native", "te", "linear"]
        )
        return parser

    parser = megatron_lm.extra_args_provider(megatron_lm_flags)(
        argparse.ArgumentParser(prog="pretrain_gpt.py")
    )
    linear = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
    for argv, message in [
        (["--loss-type", "sed", *linear], "use native there, or megatron-sed-train"),
        (["--loss-type", "ce", *linear, "--sed-fused-chunk-tokens", "64"], "--sed-fused-chunk-tokens"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert parser.parse_args(["--loss-type", "ce", *linear]).cross_entropy_fusion_impl == "linear"


def test_extra_args_provider_chains_a_base_provider():
    def base(parser):
        parser.add_argument("--modelopt-thing", type=int, default=3)
        return parser

    parser = megatron_lm.extra_args_provider(base)(argparse.ArgumentParser())
    ns = parser.parse_args(["--modelopt-thing", "5", "--loss-type", "sed"])
    assert ns.modelopt_thing == 5 and ns.loss_type == "sed"


def test_install_refuses_a_model_without_gptmodel():
    args = add_sed_args(argparse.ArgumentParser()).parse_args(["--loss-type", "sed"])
    with pytest.raises(TypeError, match="GPTModel"):
        megatron_lm.install_sed_loss(torch.nn.Linear(2, 2), args)


def _mtp_worker(rank, world_size):
    """The patched path with multi-token prediction: the MTP head's loss (what Megatron
    tracks and logs as `mtp_1 loss`) is Megatron's CE whether the main head computes CE
    or SED; on megatron-core without output_processor the combination is refused."""
    from megatron_sed.backend import cpu as cpu_backend

    cpu_backend.install()  # Megatron's MTP loss tracker lives on the "GPU"
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megatron_sed.model import build_gpt_model
    from megatron_sed.model.loss_hook import supports_output_processor
    from tests.helpers.model_args import tiny_model_args

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    margs = tiny_model_args(tensor_model_parallel_size=world_size, padded_vocab_size=256, mtp_num_layers=1)
    torch.manual_seed(3)
    ce_model = build_gpt_model(margs)
    sed_model = build_gpt_model(margs)
    sed_model.load_state_dict(ce_model.state_dict())
    args = _args("--loss-type", "sed", "--sed-threshold", "0.9", "--sed-coef", "1.0")
    args.mtp_num_layers = 1
    if not supports_output_processor():
        with pytest.raises(ValueError, match="--mtp-num-layers"):
            megatron_lm.install_sed_loss(sed_model, args)
        return
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 250, (2, 32), generator=g)
    pos = torch.arange(32).repeat(2, 1)
    ones = torch.ones(2, 32)

    def mtp_loss(model):
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        out = model(tokens, pos, None, labels=tokens, loss_mask=ones)
        return out, MTPLossLoggingHelper.tracker["loss_values"].clone()

    ce_out, ce_mtp = mtp_loss(ce_model)
    assert megatron_lm.install_sed_loss(sed_model, args) == 1
    sed_out, sed_mtp = mtp_loss(sed_model)
    assert (sed_out - ce_out).mean() > 1e-2  # the main head computes SED ...
    torch.testing.assert_close(sed_mtp, ce_mtp, rtol=0, atol=1e-6)  # ... the MTP head CE


def test_mtp_heads_keep_megatron_ce_in_the_patched_path():
    run_distributed(_mtp_worker, 1)
