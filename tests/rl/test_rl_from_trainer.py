"""RL from a checkpoint that megatron-sed-train saved (the real save path): the CLI loads
it, runs and saves in the trainer's layout, and eval.loading / megatron-sed-eval read the
result; bad flags and a missing checkpoint stop with exit code 2 and a message."""

import json

import pytest
import torch

from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags, train

SEQ = 192


@pytest.fixture(scope="module")
def sft_save(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    flags = [*TINY_MODEL, *RUN, *synthetic_flags(tmp, 20), "--split", "80,20,0", "--train-iters", "1"]
    flags += ["--lr-warmup-iters", "0"]
    flags += ["--loss-type", "ce", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ)]
    flags += ["--global-batch-size", "2", "--save", str(tmp / "save"), "--save-interval", "1"]
    train(tmp, "sft", 1, flags)
    return tmp / "save"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from megatron_sed.data.synthetic import write_synthetic_jsonl

    path = tmp_path_factory.mktemp("prompts") / "pick3.jsonl"
    write_synthetic_jsonl(str(path), 3, seed=1, split="test", kinds=("pick3",), max_value=9)
    return path


def _logits(load, tokens):
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.eval.loading import load_model

    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            model, args, ckpt_dir, common = load_model(str(load))
            with torch.no_grad():
                return model(tokens, torch.arange(tokens.shape[1])[None], None), args, common
        finally:
            ps.destroy_model_parallel()


def test_rl_loads_a_trainer_checkpoint_and_saves_one_eval_reads(sft_save, prompts, tmp_path, capsys):
    from megatron_sed.eval.__main__ import main as eval_main
    from megatron_sed.rl.cli import main

    rl = tmp_path / "rl"
    metrics = tmp_path / "rl.jsonl"
    main(
        ["--load", str(sft_save), "--save", str(rl), "--prompts", str(prompts), "--train-iters", "1"]
        + ["--n", "2", "--prompts-per-step", "2", "--mini-batch-prompts", "1", "--micro-batch-size", "2"]
        + ["--max-new-tokens", "8", "--weight-decay", "0", "--metrics-file", str(metrics)]
        + ["--eval-prompts", str(prompts), "--eval-interval", "1", "--eval-n", "2"]
    )
    out = capsys.readouterr().out
    assert " [rl] iteration      1/1 | reward 0.000 | mixed groups 0.00 | entropy " in out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["iteration"], "eval" in r) for r in rows] == [(0, True), (1, False), (1, True)]
    assert {"reward", "mixed_groups", "entropy", "response_length", "clip_frac"} <= set(rows[1])
    assert rows[0]["eval"]["avg@2"] == 0.0 and rows[0]["eval"]["num_prompts"] == 3
    # A 1-iteration SFT model never boxes the answer: all rewards 0, advantages 0, and with
    # no weight decay the weights must come back unchanged through RL's save and the loader.
    assert rows[1]["reward"] == 0.0 and rows[1]["grad_norm"] == 0.0
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    ref, _, _ = _logits(sft_save, tokens)
    got, args, common = _logits(rl, tokens)
    assert torch.equal(got, ref)
    assert common["iteration"] == 1 and args.rl_config["clip_high"] == 0.28 and args.num_layers == 2
    eval_main(
        ["--load", str(rl), "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "8"]
        + ["--pass-k", "1", "2", "--output", str(tmp_path / "e.json")]
    )
    assert json.loads((tmp_path / "e.json").read_text())["iteration"] == 1


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--n", "1"], "--n must be >= 2"),
        (["--clip-low", "-0.1"], "--clip-low"),
        (["--prompts-per-step", "4", "--mini-batch-prompts", "3"], "must divide"),
        (["--load", "MISSING"], "no such file or directory"),
    ],
)
def test_clear_errors(sft_save, prompts, tmp_path, capsys, flags, match):
    from megatron_sed.rl.cli import main

    base = ["--load", str(sft_save), "--prompts", str(prompts), "--train-iters", "1"]
    if flags[0] == "--load":
        base[1] = str(tmp_path / flags[1])
        flags = []
    with pytest.raises(SystemExit) as e:
        main(base + flags)
    assert e.value.code == 2 and match in capsys.readouterr().err
