"""patches/megatron-lm + scripts/apply_megatron_patch.sh against a real Megatron-LM.

Set MEGATRON_LM_DIR to a Megatron-LM checkout of a supported tag (core_v0.16.1 or
core_v0.19.0, patched or not); the tests never modify it (they patch copies). Without
it the Megatron-LM tests skip; the script's own argument checks always run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compat

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "apply_megatron_patch.sh"
PATCHES = sorted((REPO / "patches" / "megatron-lm").glob("core_v*.patch"))
MLM = os.environ.get("MEGATRON_LM_DIR")
needs_mlm = pytest.mark.skipif(
    not MLM,
    reason="MEGATRON_LM_DIR is not set (point it at a Megatron-LM checkout of core_v0.16.1 or core_v0.19.0)",
)


def _apply(*argv):
    return subprocess.run(["bash", str(SCRIPT), *map(str, argv)], capture_output=True, text=True)


def _copy_tree(dst: Path) -> Path:
    """The files the patch and the script look at, in a plain (non-git) directory."""
    (dst / "megatron" / "core").mkdir(parents=True)
    shutil.copy(Path(MLM) / "pretrain_gpt.py", dst / "pretrain_gpt.py")
    shutil.copy(Path(MLM) / "megatron" / "core" / "package_info.py", dst / "megatron" / "core")
    return dst


def _fitting_patch(tree: Path) -> Path:
    for patch in PATCHES:
        for check in (["--check"], ["--reverse", "--check"]):
            if (
                subprocess.run(["git", "apply", *check, str(patch)], cwd=tree, capture_output=True).returncode
                == 0
            ):
                return patch
    pytest.fail(f"no patch in patches/megatron-lm fits {MLM}: is it a supported tag with local edits?")


def test_script_usage_and_non_megatron_dir(tmp_path):
    assert _apply().returncode == 2
    res = _apply(tmp_path)
    assert res.returncode == 1 and "not a Megatron-LM checkout" in res.stderr
    assert _apply(tmp_path / "missing").returncode == 1


@needs_mlm
def test_patch_applies_is_idempotent_and_refuses_a_mismatched_tree(tmp_path):
    tree = _copy_tree(tmp_path / "mlm")
    patch = _fitting_patch(tree)
    # A plain copy has no git tag: the script picks the patch from package_info.py.
    res = _apply(tree)
    assert res.returncode == 0, res.stderr
    assert patch.name in res.stdout
    assert "sed_args_provider" in (tree / "pretrain_gpt.py").read_text()
    again = _apply(tree)
    assert again.returncode == 0 and "already applied" in again.stdout
    # Every other release's patch is refused with a message, the tree left as it is.
    before = (tree / "pretrain_gpt.py").read_text()
    for other in PATCHES:
        if other != patch:
            res = _apply("--patch", other, tree)
            assert res.returncode == 1 and "refusing" in res.stderr, res
    # A tree with local edits where the patch goes is refused too.
    edited = _copy_tree(tmp_path / "edited")
    text = (edited / "pretrain_gpt.py").read_text()
    if "sed_args_provider" not in text:
        (edited / "pretrain_gpt.py").write_text(
            text.replace("def forward_step(", "def forward_step_(", 1).replace(
                "    timers = get_timers()\n", "    timers = None\n"
            )
        )
        res = _apply(edited)
        assert res.returncode == 1 and "does not apply" in res.stderr
    assert (tree / "pretrain_gpt.py").read_text() == before
    # On the user's checkout itself only --check runs (read-only).
    res = _apply("--check", MLM)
    assert res.returncode == 0, res.stderr


@needs_mlm
def test_patched_pretrain_gpt_parses_sed_flags_and_calls_megatron_sed(tmp_path):
    tree = _copy_tree(tmp_path / "patched")
    assert _apply(tree).returncode == 0
    flags = (
        "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2 --train-iters 2 --lr 1e-4 --mock-data "
        "--tokenizer-type NullTokenizer --vocab-size 128 --no-gradient-accumulation-fusion "
        "--no-persist-layer-norm --transformer-impl local --hidden-dropout 0 --attention-dropout 0 "
        "--loss-type sed --sed-threshold 0.2 --sed-lambda 0.5 --sed-top-k 3"
    ).split()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MLM_DRIVER_SAVE=str(tmp_path / "save"))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mlm_driver.py")), str(tree), MLM, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    assert res["pretrain_gpt"] == str(tree / "pretrain_gpt.py")
    assert res["bad_flag_exit"] == 2 and "--sed-top-k must be >= 1" in res["bad_flag_stderr"]
    assert res["fields"] == {
        "loss_type": "sed",
        "sed_coef": 0.5,
        "sed_top_k": 3,
        "sed_threshold": 0.2,
        "sed_mask": "topk_mass",
        "sed_regularizer": "quadratic",
    }
    assert "megatron-sed: --loss-type sed" in proc.stdout

    sed, ce = res["sed"], res["ce"]
    n = sed["ref"]["num_tokens"]
    assert sed["installed"] and sed["num_tokens"] == n
    assert sed["loss"] == pytest.approx(sed["ref"]["loss_sum"], rel=1e-5)
    assert sed["report"]["lm loss"] == pytest.approx([sed["ref"]["loss_sum"], n], rel=1e-5)
    assert sed["report"]["ce loss"] == pytest.approx([sed["ref"]["ce_sum"], n], rel=1e-5)
    assert sed["report"]["sed reg"] == pytest.approx([sed["ref"]["reg_sum"], n], rel=1e-5)
    assert sed["report"]["sed mask rate"] == pytest.approx([sed["ref"]["mask_sum"], n])
    assert sed["ref"]["reg_sum"] > 0
    for key in ("entropy", "target prob", "topk mass", "top1 acc"):
        assert sed["report"][key][1] == n, key
    # --loss-type ce: Megatron's own CE and report, untouched.
    assert not ce["installed"] and set(ce["report"]) == {"lm loss"}
    assert ce["loss"] == pytest.approx(ce["ref"]["ce_sum"], rel=1e-6)
    # --sed-mask-ratio through the patched forward_step: one dataset request for the
    # held-out samples (micro-batch 2, DP 1: 5 samples -> 3 steps -> 6 built), tau the
    # float64 quantile of the top-3 masses, kept in the args Megatron-LM checkpoints.
    cal = res["calibration"]
    assert cal["requests"] == [[1, 6, 1]]
    assert cal["tau"] == pytest.approx(cal["ref_tau"], abs=2e-6)
    assert cal["state"]["source"] == "calibrated" and cal["state"]["calibration"]["num_samples"] == 5
    assert cal["training_output_shape"] == [2, 16] and cal["training"]
    assert "calibrated SED threshold" in proc.stdout
