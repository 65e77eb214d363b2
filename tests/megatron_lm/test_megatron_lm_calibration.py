"""--sed-mask-ratio in Megatron-LM's pretrain_gpt.py (megatron_sed.megatron_lm.calibration),
without Megatron-LM: a stand-in `forward_step` and dataset provider with pretrain_gpt's
contracts (forward_step calls install_sed_loss first, takes the batch from TP rank 0 and
broadcasts it, returns `partial(loss_func, loss_mask, model=model)`; the provider builds
the validation set on TP rank 0 only).

tau must equal an independent float64 reference on the first N held-out samples under every
layout (DP 1/2, TP 1/2) for both recipes (supervised: the quantile of the top-2 masses of
the supervised tokens; authors: their order statistic of the top-10 masses at every
position), be saved in the checkpoint's args and reused on resume, and bad setups must
fail on every rank with a message naming the flag.
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import pytest
import torch

from megatron_sed import megatron_lm
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.compat

VOCAB, SEQ, HIDDEN, MBS = 64, 8, 16, 2
NUM_SAMPLES = 7  # not a multiple of DP x MBS: the extra rows must be dropped
RATIO = 0.3


def _args(save, *extra, load=None, iteration=0):
    parser = megatron_lm.extra_args_provider()(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    args = parser.parse_args(
        [
            "--loss-type",
            "sed",
            "--sed-mask-ratio",
            str(RATIO),
            "--sed-calibration-samples",
            str(NUM_SAMPLES),
            "--sed-calibration",
            "supervised",
            *extra,
        ]
    )
    args.micro_batch_size = MBS
    args.pipeline_model_parallel_size = 1
    args.save, args.load, args.iteration, args.finetune = save, load, iteration, False
    return args


def _build_model():
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = IdentityOp  # Megatron's attention needs CUDA
    spec.submodules.self_attn_bda = IdentityFuncOp
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
    )
    torch.manual_seed(1234)
    return GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ)


class _HeldOut(torch.utils.data.Dataset):
    """Deterministic samples in the item format of Megatron-LM's SFT dataset: prompt
    targets -100 (loss mask 0), padding targets the pad id 0 (loss mask 0) at the end of
    every third row, the rest supervised."""

    POOL = 32  # sample i is the same whatever the dataset's length

    def __init__(self, n):
        assert n <= self.POOL
        g = torch.Generator().manual_seed(11)
        self.tokens = torch.randint(1, VOCAB, (self.POOL, SEQ), generator=g)[:n]
        self.labels = torch.randint(1, VOCAB, (self.POOL, SEQ), generator=g)[:n]
        self.loss_mask = torch.ones(n, SEQ)
        self.labels[:, :2], self.loss_mask[:, :2] = -100, 0.0  # the prompt
        padded = torch.arange(n) % 3 == 0
        self.labels[padded, SEQ - 2 :], self.loss_mask[padded, SEQ - 2 :] = 0, 0.0
        self.tokens[padded, SEQ - 2 :] = 0
        self.padding = torch.zeros(n, SEQ, dtype=torch.bool)
        self.padding[padded, SEQ - 2 :] = True

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {
            "tokens": self.tokens[i],
            "labels": self.labels[i],
            "loss_mask": self.loss_mask[i],
            "position_ids": torch.arange(SEQ),
        }


class _PretrainGPT:
    """forward_step + train_valid_test_datasets_provider with pretrain_gpt's contracts."""

    def __init__(self, args, valid_size=None):
        self.args, self.valid_size, self.requests = args, valid_size, []

    def provider(self, num_samples, vp_stage=None):
        from megatron.core import parallel_state as ps

        self.requests.append(list(num_samples))
        n = self.valid_size if self.valid_size is not None else num_samples[1]
        valid = _HeldOut(n) if ps.get_tensor_model_parallel_rank() == 0 else None
        return None, valid, None

    def hooks(self):
        return self.forward_step, self.provider

    def forward_step(self, data_iterator, model):
        from megatron.core import parallel_state as ps

        megatron_lm.install_sed_loss(model, self.args, self.forward_step, self.provider)
        if ps.get_tensor_model_parallel_rank() == 0:
            batch = next(data_iterator)
        else:
            batch = {
                k: torch.zeros(MBS, SEQ, dtype=d)
                for k, d in [
                    ("tokens", torch.int64),
                    ("labels", torch.int64),
                    ("loss_mask", torch.float32),
                    ("position_ids", torch.int64),
                ]
            }
        for t in batch.values():  # Megatron's get_batch_on_this_tp_rank
            torch.distributed.broadcast(
                t, ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group()
            )
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return out, partial(lambda loss_mask, output, model=None: None, batch["loss_mask"], model=model)


def _expected_tau(recipe="supervised"):
    """float64 over the full vocabulary on the first N samples: numpy's linear quantile of
    the top-2 masses of the supervised tokens (supervised), or the authors' sorted(x)[-int(0.7
    len(x))] of the top-10 masses at every position but the padding (authors)."""
    from megatron.core import parallel_state as ps

    model = _build_model()
    data = _HeldOut(NUM_SAMPLES)
    with torch.no_grad():
        local = model(data.tokens, torch.arange(SEQ).expand(NUM_SAMPLES, SEQ), None).double()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    probs = torch.softmax(torch.cat(parts, -1), -1)
    if recipe == "authors":
        x = probs.topk(10, dim=-1).values.sum(-1)[~data.padding].tolist()
        return sorted(x)[-int(0.7 * len(x))], len(x)
    masses = probs.topk(2, dim=-1).values.sum(-1)[data.loss_mask.bool()]
    return float(np.quantile(masses.numpy(), RATIO)), int(masses.numel())


def _save_checkpoint(root, args, iteration):
    """A save dir whose common state holds `args`, as Megatron-LM saves one (all ranks call
    it): the project's one checkpoint writer, without weights."""
    from megatron_sed.checkpointing.writer import checkpoint_state, write_checkpoint

    write_checkpoint(root, iteration, checkpoint_state(None, argparse.Namespace(**vars(args)), iteration))


def _worker(rank, world_size, tp, save):
    from megatron.core import parallel_state as ps

    from megatron_sed.model.sed_route import forward_config

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    dp = world_size // tp
    want_tau, want_tokens = _expected_tau()

    # --- calibration in the first forward_step
    args = _args(save)
    mlm = _PretrainGPT(args)
    model = _build_model()
    model.train()
    steps = -(-NUM_SAMPLES // (dp * MBS))
    train_batch = torch.utils.data.default_collate([_HeldOut(MBS)[i] for i in range(MBS)])
    out, _ = mlm.forward_step(iter([train_batch]), model)  # calibrates, then the training forward
    assert out.shape == (MBS, SEQ) and out.requires_grad
    assert mlm.requests == [[1, steps * dp * MBS, 1]]
    state = args.sed_threshold_state  # what Megatron saves with the checkpoint's args
    assert state["source"] == "calibrated"
    assert state["tau"] == pytest.approx(want_tau, abs=2e-6), (state["tau"], want_tau)
    assert forward_config(model).threshold == state["tau"]
    assert model.training, "calibration must leave the model in train mode"
    record = state["calibration"]
    assert record["num_tokens"] == want_tokens and record["num_samples"] == NUM_SAMPLES
    assert record["top_k"] == 2 and 0.25 < record["fraction_below"] < 0.35

    # --- resume: the tau of the checkpoint's args is reused, nothing is calibrated on the
    # half-trained model (a checkpoint as Megatron-LM saves one: args in its common state)
    ckpt = save / "ckpt"
    _save_checkpoint(ckpt, args, iteration=10)
    resumed = _args(save, load=str(ckpt), iteration=10)
    mlm2 = _PretrainGPT(resumed)
    megatron_lm.install_sed_loss(_build_model(), resumed, mlm2.forward_step, mlm2.provider)
    assert mlm2.requests == [] and resumed.sed_threshold_state["tau"] == state["tau"]
    # ... unless the checkpoint holds none: then say which tau to pass.
    lost = _args(save, load=str(save / "elsewhere"), iteration=10)
    with pytest.raises(ValueError, match="--sed-threshold"):
        megatron_lm.install_sed_loss(_build_model(), lost, mlm2.forward_step, mlm2.provider)
    # --finetune from a checkpoint calibrates again (a new run's initial model).
    fine = _args(save / "ft", load=str(ckpt), iteration=0)
    fine.finetune = True
    mlm3 = _PretrainGPT(fine)
    megatron_lm.install_sed_loss(_build_model(), fine, mlm3.forward_step, mlm3.provider)
    assert len(mlm3.requests) == 1
    assert fine.sed_threshold_state["tau"] == pytest.approx(want_tau, abs=2e-6)

    # --- the authors' recipe (the flag's default): top-10 mass at every position but the
    # padding (prompt targets -100 count), their order statistic
    authors = _args(save / "a", "--sed-calibration", "authors")
    want_authors = _expected_tau("authors")
    megatron_lm.install_sed_loss(_build_model(), authors, *_PretrainGPT(authors).hooks())
    got = authors.sed_threshold_state
    assert got["tau"] == pytest.approx(want_authors[0], abs=2e-6), (got["tau"], want_authors)
    assert got["calibration"]["num_tokens"] == want_authors[1] and got["calibration"]["top_k"] == 10
    assert got["calibration"]["recipe"] == "authors" and got["tau"] != state["tau"]

    # --- an explicit --sed-threshold wins: no calibration
    explicit = _args(save / "x", "--sed-threshold", "0.8")
    mlm4 = _PretrainGPT(explicit)
    model4 = _build_model()
    megatron_lm.install_sed_loss(model4, explicit, mlm4.forward_step, mlm4.provider)
    assert mlm4.requests == [] and forward_config(model4).threshold == 0.8

    # --- too few held-out samples: every rank raises (no rank left in a collective)
    short = _args(save / "s")
    mlm5 = _PretrainGPT(short, valid_size=NUM_SAMPLES - 3)
    with pytest.raises(ValueError, match="--sed-calibration-samples"):
        megatron_lm.install_sed_loss(_build_model(), short, mlm5.forward_step, mlm5.provider)

    # --- an old patch (no forward_step / provider passed): a clear error
    old = _args(save / "o")
    with pytest.raises(ValueError, match="apply_megatron_patch"):
        megatron_lm.install_sed_loss(_build_model(), old)


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 1), (2, 2)])
def test_pretrain_gpt_calibration_is_exact_and_resumes(world_size, tp, tmp_path):
    run_distributed(_worker, world_size, tp, tmp_path)


def test_calibration_flags_checked_at_parse_time(capsys):
    parser = megatron_lm.extra_args_provider()(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    for argv, culprit in [
        (["--sed-mask-ratio", "0.3", "--sed-mask", "all"], "--sed-mask"),
        (["--sed-mask-ratio", "0.3", "--pipeline-model-parallel-size", "2"], "last pipeline stage"),
        (["--sed-mask-ratio", "0.3", "--sed-threshold-update", "ema"], "--sed-threshold-update"),
        (["--sed-mask-ratio", "1.5"], "--sed-mask-ratio"),
        (["--sed-mask-ratio", "0.3", "--sed-mask", "entropy"], "--sed-calibration supervised"),
        (["--sed-mask-ratio", "0.3", "--sed-calibration-top-k", "0"], "--sed-calibration-top-k"),
        (["--sed-mask-ratio", "0.3", "--sed-calibration", "paper"], "--sed-calibration"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--loss-type", "sed", *argv])
        assert exc.value.code == 2 and culprit in capsys.readouterr().err, argv
    ok = parser.parse_args(
        [
            "--loss-type",
            "sed",
            "--sed-mask-ratio",
            "0.3",
            "--pipeline-model-parallel-size",
            "2",
            "--sed-threshold",
            "0.7",
        ]
    )
    assert ok.sed_threshold == 0.7  # explicit tau: PP is fine
