"""Parse many trainer command lines in one process (megatron-sed-train's argument phase:
Megatron's parser + validation + megatron-sed's checks), printing one JSON result each.

    python parse_driver.py CASES.json   # [[name, argv, how?], ...] -> {name: {"ok": ..., ...}}

`how` (optional): {"cli": true} runs the command line through megatron-sed-train's main()
(exit status and stderr, for lines that fail in the argument phase: a good one would train);
{"gpu_capability": [major, minor]} parses as on a GPU of that compute capability with
Transformer Engine (what the CPU cannot show: the GPU-only argument checks).
"""

import contextlib
import io
import json
import sys

from megatron_sed.backend import cpu

cpu.install()

from megatron.training.global_vars import unset_global_variables  # noqa: E402

from megatron_sed.train import arguments, entry  # noqa: E402
from megatron_sed.train.arguments import parse_and_validate  # noqa: E402

FIELDS = (
    "distributed_backend",
    "transformer_impl",
    "gradient_accumulation_fusion",
    "use_cpu_initialization",
    "tokenizer_type",
    "vocab_size",
    "padded_vocab_size",
    "sft_tokenizer_type",
    "num_layers",
    "hidden_size",
    "use_rope_scaling",
    "rope_scaling_factor",
    "position_embedding_type",
    "loss_type",
    "sed_coef",
    "cross_entropy_fusion_impl",
    "sed_fused_chunk_tokens",
    "fp8_amax_history_len",
    "fp8_amax_compute_algo",
)


@contextlib.contextmanager
def _gpu(capability):
    """The argument phase as on a GPU of `capability` with Transformer Engine importable."""
    import torch

    saved = (
        arguments.cpu_backend,
        arguments.te_available,
        torch.cuda.is_available,
        torch.cuda.get_device_capability,
    )
    arguments.cpu_backend = type("NotActive", (), {"is_active": staticmethod(lambda: False)})
    arguments.te_available = lambda: True
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *a: tuple(capability)
    try:
        yield
    finally:
        (
            arguments.cpu_backend,
            arguments.te_available,
            torch.cuda.is_available,
            torch.cuda.get_device_capability,
        ) = saved


def _cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = entry.main(argv)
    return {"ok": rc == 0, "rc": rc, "error": err.getvalue()}


results = {}
for name, argv, *how in json.load(open(sys.argv[1])):
    how = how[0] if how else {}
    if how.get("cli"):
        results[name] = _cli(argv)
        unset_global_variables()
        continue
    try:
        with _gpu(how["gpu_capability"]) if "gpu_capability" in how else contextlib.nullcontext():
            args = parse_and_validate(argv)
        results[name] = {"ok": True, **{k: getattr(args, k, None) for k in FIELDS}}
    except SystemExit as e:  # argparse
        results[name] = {"ok": False, "error": f"SystemExit {e.code}"}
    except Exception as e:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    unset_global_variables()
print("RESULTS " + json.dumps(results))
