"""examples/sft_from_hf.sh end to end on CPU: a tiny random-initialised-then-briefly-trained
HF Llama with a locally trained BPE tokenizer and chat template (the `tiny_llama`
fixture) -> hf-to-mcore -> preprocess with its tokenizer -> SED-SFT with tau by the
authors' recipe -> eval -> mcore-to-hf, the fewest iterations that prove the path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "sft_from_hf.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the example")
def test_sft_from_hf_example(tiny_llama, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from megatron_sed.data.synthetic import write_synthetic_jsonl

    write_synthetic_jsonl(str(tmp_path / "train.jsonl"), 40, seed=3, split="train")
    write_synthetic_jsonl(str(tmp_path / "test.jsonl"), 1, seed=4, split="test")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the CLIs
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        HF=str(tiny_llama.hf_dir),
        OUT=str(out),
        INPUT=str(tmp_path / "train.jsonl"),
        PROMPTS=str(tmp_path / "test.jsonl"),
        SEQ=str(tiny_llama.seq_length),
        GBS="2",
        TRAIN_ITERS="1",
        LR="1e-3",
        CALIBRATION_SAMPLES="2",
        N="2",
        EVAL_FLAGS="--max-new-tokens 8",
    )
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    # printed where each artefact is
    for path in ("mcore", "data/sft", "checkpoints", "metrics.jsonl", "eval.json", "hf"):
        assert f"{out / path}" in res.stdout, res.stdout[-2000:]
    # 2: preprocessed with the model's own tokenizer (and its chat template)
    meta = json.loads((out / "data" / "sft.json").read_text())
    assert meta["tokenizer"]["type"] == "hf" and meta["num_supervised_tokens"] > 0
    # 3: tau calibrated by the authors' recipe (not the 0.95 default), one SED iteration
    assert "authors' recipe" in log and "--sed-mask-ratio 0.3" in log
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1]
    assert 0.0 < train[0]["sed_threshold"] < 1.0 and train[0]["sed_threshold"] != pytest.approx(0.95)
    assert 0.0 < train[0]["sed_mask_rate"] < 1.0 and train[0]["sed_reg"] > 0.0
    # 4: the evaluation of the trained checkpoint, pass@k for the k that fit --n 2
    ev = json.loads((out / "eval.json").read_text())
    assert ev["iteration"] == 1 and {"pass@1", "pass@2"} <= set(ev["metrics"])
    # 5: a plain HF folder again: loads in transformers, same shapes, trained weights
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.rope_scaling["rope_type"] == "llama3"
    before = load_file(str(Path(tiny_llama.hf_dir) / "model.safetensors"))
    after = load_file(str(out / "hf" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)  # --lr 1e-3
    assert transformers.AutoTokenizer.from_pretrained(str(out / "hf")).chat_template
