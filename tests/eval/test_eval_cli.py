"""python -m megatron_sed.eval on a checkpoint that megatron-sed-train saved (Megatron's
layout, TP 2, evaluated at TP 1): JSON + samples output, plot, report, and clear errors for
bad checkpoints and prompts files."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_sed.eval.__main__ import main
from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags, train

GBS = 8
SEQ = 192  # the prompts with the math system prompt are ~140 tokens


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    """7 iterations at TP 2 with a validation at 7 (its CE is the reference below)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    root = tmp / "save"
    run = train(
        tmp,
        "train",
        2,
        [
            *TINY_MODEL,
            *RUN,
            *synthetic_flags(tmp),
            "--split",
            "80,20,0",
            "--tensor-model-parallel-size",
            "2",
            "--train-iters",
            "7",
            "--lr",
            "1e-4",
            "--loss-type",
            "sed",
            "--sed-threshold",
            "0.8",
            "--seq-length",
            str(SEQ),
            "--max-position-embeddings",
            str(SEQ),
            "--save",
            str(root),
            "--save-interval",
            "7",
            "--eval-interval",
            "7",
            "--eval-iters",
            "1",
        ],
    )
    (root / "valid.json").write_text(json.dumps(run.valid[0]))
    (root / "synthetic").write_text(str(tmp / "synthetic"))
    return root


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from megatron_sed.data.synthetic import write_synthetic_jsonl

    path = tmp_path_factory.mktemp("prompts") / "test.jsonl"
    write_synthetic_jsonl(str(path), 3, seed=1, split="test")
    return path


def test_eval_cli_writes_metrics_samples_and_plot(save_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run_a.json"
    samples = tmp_path / "samples.jsonl"
    common = [
        "--load",
        str(save_dir),
        "--prompts",
        str(prompts),
        "--n",
        "3",
        "--max-new-tokens",
        "12",
        "--pass-k",
        "1",
        "3",
        "--top-p",
        "0.9",
    ]
    main(common + ["--output", str(out), "--samples-output", str(samples)])
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["label"] == "run_a" and res["iteration"] == 7 and res["sed_threshold"] == 0.8
    assert m["num_prompts"] == 3 and m["samples_per_prompt"] == 3
    for key in ("accuracy", "pass@1", "pass@3", "truncated_fraction"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert 0.0 <= m["self_bleu"] <= 100.0 and 0.0 < m["distinct_1"] <= 1.0 and 0.0 < m["distinct_2"] <= 1.0
    assert m["pass@1"] <= m["pass@3"] and math.isfinite(m["distinct_correct_paths"])
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    # A barely trained model over a 262-token vocabulary: near-uniform, entropy near log(262).
    assert 4.0 < m["mean_token_entropy"] <= torch.log(torch.tensor(262.0)).item() + 1e-4
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 9 and {"text", "correct", "path", "answer"} <= set(rows[0])
    # Same seed -> same samples; the KV cache and full recompute agree through the CLI too.
    out2 = tmp_path / "run_b.json"
    main(common + ["--output", str(out2), "--label", "B", "--no-kv-cache"])
    assert json.loads(out2.read_text())["metrics"]["self_bleu"] == pytest.approx(m["self_bleu"], abs=1e-6)
    png = tmp_path / "cmp.png"
    main(["plot", str(out), str(out2), "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = tmp_path / "table.md"
    main(["report", str(out), str(out2), str(out), "--output", str(table)])
    rows = table.read_text().splitlines()
    assert rows[0].startswith("| run | seeds | acc avg@n") and len(rows) == 4
    assert rows[2].startswith("| run_a | 2 | ") and " ± 0.00 " in rows[2]  # same run twice: no spread
    assert rows[3].startswith("| B | 1 | ")


def test_load_model_restores_the_saved_weights(save_dir):
    """The model eval rebuilds from the checkpoint (TP 2 -> TP 1, dropout off) has the
    trained weights: its CE on the first validation global batch equals what the trainer
    logged for that batch at iteration 7 (a different initialisation would not)."""
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.data.reader import build_block_causal_mask, build_sft_datasets
    from megatron_sed.eval.loading import load_model

    logged = json.loads((save_dir / "valid.json").read_text())
    synthetic_dir = Path((save_dir / "synthetic").read_text())
    prefix = next(p.with_suffix("") for p in synthetic_dir.glob("*.json"))
    _, valid, _ = build_sft_datasets([str(prefix)], split="80,20,0", seq_length=SEQ, seed=1234, pack=True)
    batch = {k: torch.stack([valid[i][k] for i in range(GBS)]) for k in valid[0]}
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            torch.manual_seed(99)  # a different init: only loading can make them agree
            model, args, ckpt_dir, common = load_model(str(save_dir))
            with torch.no_grad():
                logits = model(
                    batch["tokens"], batch["position_ids"], build_block_causal_mask(batch["segment_ids"])
                )
        finally:
            ps.destroy_model_parallel()
    assert ckpt_dir.name == "iter_0000007" and args.tensor_model_parallel_size == 1
    assert args.hidden_dropout == 0.0 and not model.training
    ce = torch.nn.functional.cross_entropy(
        logits.double().flatten(0, 1), batch["labels"].clamp(min=0).flatten(), reduction="none"
    )
    mask = batch["loss_mask"].flatten().double()
    assert float((ce * mask).sum() / mask.sum()) == pytest.approx(logged["valid_ce_loss"], rel=1e-5)


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_bad_checkpoints(save_dir, prompts, tmp_path, capsys):
    base = ["--prompts", str(prompts), "--output", str(tmp_path / "x.json")]
    _fails(["--load", str(tmp_path / "nope")] + base, capsys, "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["--load", str(empty)] + base, capsys, "neither a torch_dist checkpoint")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest_checkpointed_iteration.txt").write_text("12")
    _fails(["--load", str(broken)] + base, capsys, "iter_0000012", "interrupted save")
    _fails(["--load", str(save_dir), "--iteration", "3"] + base, capsys, "--iteration 3")
    bad_common = tmp_path / "bad_common"
    bad_common.mkdir()
    (bad_common / ".metadata").write_bytes(b"x")
    (bad_common / "common.pt").write_bytes(b"not a pickle")
    _fails(["--load", str(bad_common)] + base, capsys, "cannot read the common state", "bad_common")
    assert not (tmp_path / "x.json").exists()


def test_bad_prompts(save_dir, tmp_path, capsys):
    def run(text, *needles):
        f = tmp_path / "p.jsonl"
        f.write_text(text)
        _fails(
            ["--load", str(save_dir), "--prompts", str(f), "--output", str(tmp_path / "y.json")],
            capsys,
            *needles,
        )

    _fails(
        [
            "--load",
            str(save_dir),
            "--prompts",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "y.json"),
        ],
        capsys,
        "missing.jsonl",
        "does not exist",
    )
    run('{"question": "1+1?", "answer": "2"}\n{oops\n', "p.jsonl:2", "invalid JSON")
    run('{"question": "1+1?"}\n', "p.jsonl:1", "'answer'")
    run('{"text": "1+1?", "answer": "2"}\n', "p.jsonl:1", "no question")
    run("\n\n", "holds no prompts")
    _fails(
        [
            "--load",
            str(save_dir),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--output",
            "z.json",
            "--n",
            "2",
            "--pass-k",
            "4",
        ],
        capsys,
        "--pass-k [4]",
    )


def test_eval_defaults_fit_n_and_the_model(save_dir, prompts, tmp_path, capsys):
    """Without --pass-k / --max-new-tokens: pass@k for the k that fit --n (1, 2 and n=3;
    the old default [1, 2, 4, 8] was refused for n < 8), and new tokens capped by the
    room the model's 192 positions leave after the longest prompt (said once; the old 128
    overflowed it)."""
    from megatron_sed.data.formats import resolve_system_prompt
    from megatron_sed.data.tokenizer import build_tokenizer
    from megatron_sed.eval.prompts import load_prompts
    from megatron_sed.eval.run import DEFAULT_MAX_NEW_TOKENS, default_pass_k

    assert default_pass_k(1) == [1] and default_pass_k(4) == [1, 2, 4] and default_pass_k(6) == [1, 2, 4, 6]
    out = tmp_path / "defaults.json"
    main(["--load", str(save_dir), "--prompts", str(prompts), "--n", "3", "--output", str(out)])
    res = json.loads(out.read_text())
    assert {"pass@1", "pass@2", "pass@3"} <= set(res["metrics"]) and "pass@4" not in res["metrics"]
    tok = build_tokenizer("byte", None, None)  # what the checkpoint trained with
    longest = max(
        len(tok.encode_prompt(p.messages))
        for p in load_prompts(str(prompts), None, resolve_system_prompt("math"))
    )
    room = SEQ - longest
    assert 0 < room < DEFAULT_MAX_NEW_TOKENS  # the case this test is about
    assert res["sampling"]["max_new_tokens"] == room
    said = capsys.readouterr().out
    assert said.count(f"--max-new-tokens {room}: the model holds {SEQ} positions") == 1, said
