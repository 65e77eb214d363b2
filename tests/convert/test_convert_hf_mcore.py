"""HF Llama / Qwen2 / Qwen3 / Qwen3-MoE <-> Megatron-Core checkpoint conversion, checked
against transformers.

Tiny random models are built from configs (no downloads), saved with save_pretrained,
converted with the CLI, loaded into our GPTModel (megatron_sed.model) through
dist_checkpointing at TP 1 and TP 2 (and expert-parallel 2 for the MoE) over gloo, and
their logits compared with the HF model's in fp32. Exporting back must reproduce every HF weight exactly, also from a
checkpoint re-saved by the TP=2 model in Megatron-LM's way (no converter metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_sed.convert.shape import ARCHITECTURES
from tests.helpers.dist import run_distributed
from tests.helpers.hf import randomise_norms, tiny_llama_config

transformers = pytest.importorskip("transformers")

SEQ, BATCH = 48, 2
LOGIT_TOL = 1e-5  # fp32; measured max |diff| <= ~1e-6 (printed with -s)


def _llama(tmp: Path) -> Path:
    cfg = tiny_llama_config(vocab_size=320, tie_word_embeddings=True, initializer_range=0.1)
    return _save(transformers.LlamaForCausalLM, cfg, tmp / "llama")


def _qwen2(tmp: Path) -> Path:
    cfg = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        use_sliding_window=False,
    )
    return _save(transformers.Qwen2ForCausalLM, cfg, tmp / "qwen2")


def _qwen3(tmp: Path) -> Path:
    """Dense Qwen3: QK-norm, head_dim 32 (not hidden / heads = 16), tied embeddings."""
    cfg = transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        initializer_range=0.1,
    )
    return _save(transformers.Qwen3ForCausalLM, cfg, tmp / "qwen3")


def _save(cls, cfg, path: Path) -> Path:
    torch.manual_seed(0)
    model = cls(cfg).eval()
    randomise_norms(model)
    model.save_pretrained(path)
    return path


# (tensor-parallel, expert-parallel) layouts each model is loaded at
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1)}
MOE_LAYOUTS = {**LAYOUTS, "ep2": (1, 2)}


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _load_worker(rank, world_size, cases, result_dir):
    """For each (name, converted dir) and TP in (1, 2): build our GPTModel from the
    checkpoint metadata, load it with dist_checkpointing, gather full-vocab logits; at
    TP=2 also re-save the model like Megatron-LM does (for the export test)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_sed.backend import cpu as cpu_backend
    from megatron_sed.model import build_gpt_model

    for name, ckpt_root in cases:
        meta = json.loads((Path(ckpt_root) / "megatron_sed_model.json").read_text())
        margs = meta["megatron_args"]
        if margs.get("num_experts"):  # Megatron's MoE dispatchers allocate on the "GPU"
            cpu_backend.install()
        vocab = margs["padded_vocab_size"]  # the HF embedding's rows
        tokens = _tokens(vocab)
        layouts = MOE_LAYOUTS if margs.get("num_experts") else LAYOUTS
        for label, (tp, ep) in layouts.items():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, expert_model_parallel_size=ep
            )
            args = argparse.Namespace(
                **margs,
                tensor_model_parallel_size=tp,
                expert_model_parallel_size=ep,
                pipeline_model_parallel_size=1,
                seq_length=SEQ,
                transformer_impl="local",
                use_cpu_initialization=True,
            )
            model = build_gpt_model(args).eval()
            # As Megatron-LM loads: model weights under "model", args etc. from common.pt
            state = dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, str(Path(ckpt_root) / "release")
            )
            assert state["iteration"] == 0 and state["args"].num_layers == margs["num_layers"]
            model.load_state_dict(state["model"], strict=True)
            with torch.no_grad():
                pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
                logits = model(tokens, pos, None)  # [b, s, V_padded / tp]
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(
                    parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
                )
                logits = torch.cat(parts, dim=-1)
            if rank == 0:
                torch.save(logits[..., :vocab].clone(), os.path.join(result_dir, f"{name}_{label}.pt"))
            if label == "tp2":
                # What Megatron-LM saves, by its own code: generate_state_dict's state (model
                # sharded state dict + args / checkpoint_version / iteration), fc1 in the
                # "singleton" _w/_v layout for Qwen2 to cover it, written by the project's
                # one writer at the paths Megatron's get_checkpoint_name / tracker name.
                from megatron.training import checkpointing as mlm

                from megatron_sed.checkpointing.writer import write_checkpoint

                save = os.path.join(result_dir, f"{name}_mlm")
                mlm_args = argparse.Namespace(
                    **{**vars(args), "ckpt_format": "torch_dist", "no_save_optim": True, "no_save_rng": True}
                )
                md = {"singleton_local_shards": name == "qwen2"}
                sd = mlm.generate_state_dict(
                    mlm_args, [model], None, None, None, iteration=7, model_sd_kwargs={"metadata": md}
                )
                out = write_checkpoint(save, 7, sd)
                assert str(out) == mlm.get_checkpoint_name(save, 7, return_base_dir=True)
                assert Path(mlm.get_checkpoint_tracker_filename(save)).read_text() == "7"
            parallel_state.destroy_model_parallel()
        cpu_backend.uninstall()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_qwen3_moe):
    """The tiny models saved, converted with the CLI, loaded at TP 1/2 (MoE: and EP 2) in
    one gloo world. The Qwen3-MoE is the session's (shared with the engine tests)."""
    from megatron_sed.convert.__main__ import main

    tmp = tmp_path_factory.mktemp("convert")
    shutil.copytree(tiny_qwen3_moe.hf_dir, tmp / "qwen3_moe")
    cases = []
    for name, make in (("llama", _llama), ("qwen2", _qwen2), ("qwen3", _qwen3), ("qwen3_moe", None)):
        hf_dir = make(tmp) if make else tmp / name
        (hf_dir / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
        out = tmp / f"{name}_mcore"
        assert main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
        cases.append((name, str(out)))
    results = tmp / "results"
    results.mkdir()
    run_distributed(_load_worker, 2, cases, str(results))
    return tmp, results


NAMES = ["llama", "qwen2", "qwen3", "qwen3_moe"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_at_tp1_and_tp2(converted, name):
    tmp, results = converted
    hf_dir = tmp / name
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ref = _hf_logits(hf_dir, _tokens(vocab))
    for label in MOE_LAYOUTS if name == "qwen3_moe" else LAYOUTS:
        ours = torch.load(results / f"{name}_{label}.pt")
        diff = (ours - ref).abs().max().item()
        print(
            f"{name} {label}: max |logit diff| vs HF = {diff:.2e} (logit scale {ref.abs().max().item():.2f})"
        )
        assert diff < LOGIT_TOL, f"{name} {label}: max |diff| {diff}"


def test_qwen3_features_are_exercised(converted):
    """QK-norm and the experts' routing must change the logits by far more than LOGIT_TOL,
    otherwise the comparison above could not catch them being dropped: the same weights
    without q_norm / k_norm, and with the other routing (norm_topk_prob flipped)."""
    tmp, results = converted
    for name, key, value in (("qwen3", "qk", None), ("qwen3_moe", "norm_topk_prob", False)):
        cfg = json.loads((tmp / name / "config.json").read_text())
        variant = tmp / f"{name}_variant"
        shutil.copytree(tmp / name, variant)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp / name, dtype=torch.float32)
        if key == "qk":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith(("q_norm.weight", "k_norm.weight")):
                        p.fill_(1.0)
        else:
            model.config.norm_topk_prob = value
            for layer in model.model.layers:
                layer.mlp.gate.norm_topk_prob = value
        model.save_pretrained(variant)
        ours = torch.load(results / f"{name}_tp1.pt")
        gap = (ours - _hf_logits(variant, _tokens(cfg["vocab_size"]))).abs().max().item()
        print(f"{name}: max |logit diff| vs the variant without {key} = {gap:.2e}")
        assert gap > 100 * LOGIT_TOL


def test_llama3_rope_scaling_is_exercised(converted):
    """The llama3 RoPE scaling must change these logits by far more than LOGIT_TOL,
    otherwise the comparison above could not catch it being dropped."""
    tmp, results = converted
    cfg = json.loads((tmp / "llama" / "config.json").read_text())
    plain = tmp / "llama_noscale"
    shutil.copytree(tmp / "llama", plain)
    for key in ("rope_scaling", "rope_parameters"):
        if key in cfg:
            cfg[key] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(cfg))
    ours = torch.load(results / "llama_tp1.pt")
    unscaled = _hf_logits(plain, _tokens(cfg["vocab_size"]))
    gap = (ours - unscaled).abs().max().item()
    print(f"llama: max |logit diff| vs the same model without rope scaling = {gap:.2e}")
    assert gap > 100 * LOGIT_TOL


def _hf_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_roundtrip_is_exact(converted, name):
    from megatron_sed.convert.__main__ import main

    tmp, _ = converted
    back = tmp / f"{name}_back"
    # small shards to exercise the multi-file index
    assert (
        main(
            [
                "mcore-to-hf",
                "--load",
                str(tmp / f"{name}_mcore"),
                "--out",
                str(back),
                "--max-shard-size-gb",
                "0.0001",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (back / "model.safetensors.index.json").is_file()
    orig, got = _hf_weights(tmp / name), _hf_weights(back)
    assert sorted(orig) == sorted(got)
    for k in orig:
        assert orig[k].dtype == got[k].dtype and torch.equal(orig[k], got[k]), k
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"]
    # transformers loads it back to the same model
    tokens = _tokens(json.loads((back / "config.json").read_text())["vocab_size"])
    assert torch.equal(_hf_logits(back, tokens), _hf_logits(tmp / name, tokens))


@pytest.mark.parametrize("name", NAMES)
def test_export_megatron_lm_style_checkpoint(converted, name):
    """A checkpoint saved by the TP=2 model with Megatron args in common.pt and no
    converter metadata (as Megatron-LM writes it) exports to the original weights."""
    from megatron_sed.convert.__main__ import main

    tmp, results = converted
    back = tmp / f"{name}_mlm_back"
    vocab = json.loads((tmp / name / "config.json").read_text())["vocab_size"]
    assert (
        main(
            [
                "mcore-to-hf",
                "--load",
                str(results / f"{name}_mlm"),
                "--out",
                str(back),
                "--vocab-size",
                str(vocab),
                "--tokenizer",
                str(tmp / name),
                "--no-progress",
            ]
        )
        == 0
    )
    orig, got = _hf_weights(tmp / name), _hf_weights(back)
    assert sorted(orig) == sorted(got)
    for k in orig:
        assert torch.equal(orig[k], got[k]), k
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURES[name]]
