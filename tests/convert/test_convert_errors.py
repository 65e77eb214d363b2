"""Bad inputs to the converter fail with a message naming the culprit and leave no
output (not even a partial folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_sed.convert.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _run(capsys, *argv):
    rc = main(list(argv) + ["--no-progress"])
    return rc, capsys.readouterr().err


def _left_over(parent: Path, name: str):
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")
    )


def test_truncated_safetensors(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rc, err = _run(capsys, "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert rc == 2 and "model.safetensors is truncated" in err
    assert _left_over(tmp_path, "out") == []


def test_config_tensor_mismatch(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(capsys, "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "missing tensor model.layers.2.input_layernorm.weight" in err
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32]" in err
    assert _left_over(tmp_path, "out") == []


def test_unsupported_config(tmp_path, hf_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(capsys, "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "out"))
    assert rc == 2 and "rope_scaling type 'yarn'" in err


def test_existing_output_and_failure_midway(tmp_path, hf_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rc, err = _run(capsys, "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out))
    assert rc == 2 and "already exists" in err

    # A crash while tensors are being written (here: reading the 5th HF tensor fails)
    # leaves the previous output untouched and no temporary folder behind, even with --force.
    from megatron_sed.convert import hf_folder

    calls = {"n": 0}
    orig = hf_folder.HFModelFolder.get

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk read error")
        return orig(self, name)

    monkeypatch.setattr(hf_folder.HFModelFolder, "get", flaky)
    rc, err = _run(capsys, "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out), "--force")
    assert rc == 2 and "OSError: disk read error" in err and "nothing was written" in err
    assert _left_over(tmp_path, "out") == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_export_checkpoint_model_mismatch(tmp_path, hf_dir, capsys):
    mc = tmp_path / "mc"
    assert _run(capsys, "hf-to-mcore", "--hf", str(hf_dir), "--out", str(mc))[0] == 0
    # A reference HF folder whose shape does not match the checkpoint.
    ref = tmp_path / "ref"
    ref.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ref / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(
        capsys, "mcore-to-hf", "--load", str(mc), "--out", str(tmp_path / "hf"), "--reference", str(ref)
    )
    assert rc == 2 and "does not match the model" in err
    assert "decoder.layers.self_attention.linear_qkv.weight has shape [2, 64, 32]" in err
    assert _left_over(tmp_path, "hf") == []
    # A truncated checkpoint data file.
    data = next((mc / "release").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    rc, err = _run(capsys, "mcore-to-hf", "--load", str(mc), "--out", str(tmp_path / "hf"))
    assert rc == 2 and "checkpoint I/O failed" in err, err
    assert _left_over(tmp_path, "hf") == []
