"""Parse many trainer command lines in one process (megatron-sed-train's argument phase:
Megatron's parser + validation + megatron-sed's checks), printing one JSON result each.

    python parse_driver.py CASES.json   # [[name, argv], ...] -> {name: {"ok": ..., ...}}
"""

import json
import sys

from megatron_sed.backend import cpu

cpu.install()

from megatron.training.global_vars import unset_global_variables  # noqa: E402

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
)

results = {}
for name, argv in json.load(open(sys.argv[1])):
    try:
        args = parse_and_validate(argv)
        results[name] = {"ok": True, **{k: getattr(args, k, None) for k in FIELDS}}
    except SystemExit as e:  # argparse
        results[name] = {"ok": False, "error": f"SystemExit {e.code}"}
    except Exception as e:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    unset_global_variables()
print("RESULTS " + json.dumps(results))
