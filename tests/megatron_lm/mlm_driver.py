"""Run inside a subprocess by test_megatron_lm_patch.py (not a test module itself).

    python mlm_driver.py PATCHED_DIR MEGATRON_LM_DIR [pretrain_gpt flags...]

PATCHED_DIR holds a patched copy of pretrain_gpt.py and comes first on sys.path, so the
user's Megatron-LM checkout is never modified. One process (Megatron-LM imports are
slow) checks:
- Megatron-LM's own parse_args + validate_args with the patch's extra_args_provider
  accept the flags, and reject a bad --sed-* value the argparse way (exit status 2);
- the patched pretrain_gpt.forward_step + loss_func on a tiny Megatron-Core GPTModel
  (CPU, gloo world of 1; the batch comes from a stand-in get_batch since Megatron's
  needs CUDA), once with the given --loss-type and once with --loss-type ce;
- --sed-mask-ratio: the patched forward_step calibrates tau on held-out samples of a
  stand-in dataset provider (kept in args.sed_threshold_state).
It prints one JSON line prefixed RESULT; the test makes the assertions.
"""

from __future__ import annotations

import json
import os
import sys
import typing

# Megatron-LM 0.19 needs Python >= 3.12 only for typing.override (a no-op decorator).
if not hasattr(typing, "override"):
    import typing_extensions

    typing.override = typing_extensions.override


patched_dir, mlm_dir = sys.argv[1:3]
sys.path[:0] = [patched_dir, mlm_dir]
flags = sys.argv[3:]
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")

import contextlib  # noqa: E402
import io  # noqa: E402

import pretrain_gpt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp  # noqa: E402
from megatron.training.arguments import parse_args, validate_args  # noqa: E402
from megatron.training.global_vars import set_global_variables  # noqa: E402

from megatron_sed import vocab_parallel_sed_loss  # noqa: E402
from megatron_sed.flags import sed_config_from_args  # noqa: E402

result = {"pretrain_gpt": os.path.abspath(pretrain_gpt.__file__)}

# 1. A bad SED value: Megatron-LM's parser exits 2 naming the flag.
sys.argv = ["pretrain_gpt.py"] + flags + ["--sed-top-k", "0"]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        parse_args(pretrain_gpt.sed_args_provider(None))
        result["bad_flag_exit"] = None
    except SystemExit as exc:
        result["bad_flag_exit"] = exc.code
result["bad_flag_stderr"] = err.getvalue()[-500:]

# 2. The real flags through parse_args + validate_args.
sys.argv = ["pretrain_gpt.py"] + flags
args = parse_args(pretrain_gpt.sed_args_provider(None))
validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
result["fields"] = {
    k: getattr(args, k)
    for k in ("loss_type", "sed_coef", "sed_top_k", "sed_threshold", "sed_mask", "sed_regularizer")
}

# 3. The patched forward_step + loss_func.
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
set_global_variables(args, build_tokenizer=False)
b, s, vocab = args.micro_batch_size, args.seq_length, args.vocab_size
g = torch.Generator().manual_seed(3)
tokens = torch.randint(0, vocab, (b, s), generator=g)
labels = torch.randint(0, vocab, (b, s), generator=g)
loss_mask = (torch.rand(b, s, generator=g) < 0.75).float()
position_ids = torch.arange(s).expand(b, s)
batch = dict(
    tokens=tokens, labels=labels, loss_mask=loss_mask, attention_mask=None, position_ids=position_ids
)


def fake_get_batch(data_iterator, vp_stage=None):
    # The training batch is fixed; --sed-mask-ratio's calibration passes an iterator of
    # collated held-out micro-batches (Megatron's real get_batch needs CUDA).
    b = batch if data_iterator is None or isinstance(data_iterator, type(iter([]))) else next(data_iterator)
    if hasattr(pretrain_gpt, "BATCH_KEYS"):  # 0.19: values in BATCH_KEYS order
        return [b.get(key) for key in pretrain_gpt.BATCH_KEYS]
    return b["tokens"], b["labels"], b["loss_mask"], None, b["position_ids"], None  # 0.16


pretrain_gpt.get_batch = fake_get_batch


def build_model():
    config = pretrain_gpt.core_transformer_config_from_args(args)
    config.use_cpu_initialization = True
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention = IdentityOp  # Megatron's attention needs CUDA
    spec.submodules.self_attn_bda = IdentityFuncOp
    torch.manual_seed(0)
    return GPTModel(config, spec, vocab_size=vocab, max_sequence_length=s)


for loss_type in dict.fromkeys([args.loss_type, "ce"]):
    args.loss_type = loss_type
    model = build_model()
    with torch.no_grad():  # references from the untouched model's logits
        logits = model(tokens, position_ids, None).float()  # [b, s, V]
        ref_ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), reduction="none"
        ).view(b, s)
        ref = {"ce_sum": float((ref_ce * loss_mask).sum()), "num_tokens": int(loss_mask.sum())}
        if loss_type == "sed":
            sed_loss, stats = vocab_parallel_sed_loss(
                logits.transpose(0, 1).contiguous(), labels.t().contiguous(), sed_config_from_args(args)
            )
            ref["loss_sum"] = float((sed_loss.t() * loss_mask).sum())
            ref["mask_sum"] = float((stats["mask"].t().float() * loss_mask).sum())
            ref["reg_sum"] = float((stats["reg"].t() * loss_mask).sum())
        else:
            ref["loss_sum"] = ref["ce_sum"]
    output_tensor, loss_fn = pretrain_gpt.forward_step(iter([]), model)
    loss, num_tokens, report = loss_fn(output_tensor)
    result[loss_type] = {
        "installed": "compute_language_model_loss" in model.__dict__,
        "report": {k: [float(x) for x in v.detach().view(-1)] for k, v in report.items()},
        "loss": float(loss.detach()),
        "num_tokens": int(num_tokens),
        "ref": ref,
    }


# 4. --sed-mask-ratio: tau calibrated in the first forward_step on held-out samples from
#    pretrain_gpt's (stand-in) dataset provider, through the patched call.
class HeldOut(torch.utils.data.Dataset):
    def __init__(self, n, pool=32):  # sample i does not depend on n
        gen = torch.Generator().manual_seed(5)
        self.t = torch.randint(0, vocab, (pool, s), generator=gen)[:n]
        self.y = torch.randint(0, vocab, (pool, s), generator=gen)[:n]
        self.m = (torch.rand(pool, s, generator=gen) < 0.6).float()[:n]

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        return {
            "tokens": self.t[i],
            "labels": self.y[i],
            "loss_mask": self.m[i],
            "position_ids": torch.arange(s),
            "attention_mask": None,
        }


requests = []


def fake_provider(num_samples, vp_stage=None):
    requests.append(list(num_samples))
    return None, HeldOut(num_samples[1]), None


if args.loss_type == "sed" or "sed" in flags:
    pretrain_gpt.train_valid_test_datasets_provider = fake_provider
    save_dir = os.environ["MLM_DRIVER_SAVE"]
    args.loss_type, args.sed_threshold, args.sed_mask_ratio = "sed", None, 0.3
    args.sed_calibration_samples, args.save, args.load, args.iteration = 2 * b + 1, save_dir, None, 0
    model = build_model()
    calib = HeldOut(2 * b + 1)
    with torch.no_grad():
        probs = torch.softmax(model(calib.t, torch.arange(s).expand(len(calib), s), None).double(), -1)
    masses = probs.topk(args.sed_top_k, dim=-1).values.sum(-1)[calib.m.bool()]
    output_tensor, loss_fn = pretrain_gpt.forward_step(iter([]), model)
    result["calibration"] = {
        "tau": args.sed_threshold_state["tau"],
        "requests": requests,
        "ref_tau": float(torch.quantile(masses, 0.3)),
        "state": args.sed_threshold_state,  # saved with every checkpoint's args
        "training_output_shape": list(output_tensor.shape),
        "training": model.training,
    }
print("RESULT " + json.dumps(result))
