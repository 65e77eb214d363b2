"""GRPO on a task a tiny model learns in seconds: answer \\boxed{2} to every prompt. A short
CE warm-up teaches the format with the digits 1, 2, 3 equally likely (reward ~1/3, the
situation of the pick3 task's first choice); GRPO must find the rewarded digit. Also: RL
checkpoints read back through eval.loading equal the in-memory model, and a run resumed
from its iteration-1 checkpoint is the uninterrupted run exactly."""

import contextlib
import json

import pytest
import torch

from megatron_sed.eval.prompts import EvalPrompt
from megatron_sed.eval.sampler import SamplingParams
from tests.helpers.model_args import tiny_model_args

QUESTIONS = ("Q1", "Q2", "Q3", "Q4")
ANSWER = "2"
CHOICES = ("1", "2", "3")


@contextlib.contextmanager
def one_process():
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group

    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            yield
        finally:
            ps.destroy_model_parallel()


def ckpt_args():
    from megatron_sed.data.tokenizer import ByteTokenizer

    # Warmed up on its own prompts (below), not on the trainer's built-in synthetic set, whose
    # system prompt eval and RL would otherwise sample with.
    return tiny_model_args(
        vocab_size=ByteTokenizer().vocab_size,
        hidden_size=32,
        ffn_hidden_size=64,
        sft_tokenizer_type="byte",
        data_path=["warmup"],
    )


def prompts():
    return [EvalPrompt(messages=[{"role": "user", "content": q}], answer=ANSWER) for q in QUESTIONS]


@pytest.fixture(scope="module")
def warm():
    """The warmed-up weights (CE on every (prompt, digit) pair: format, no preference)."""
    from megatron_sed.data.tokenizer import ByteTokenizer
    from megatron_sed.model import build_gpt_model
    from megatron_sed.rl.logprobs import token_logprobs
    from megatron_sed.rl.rollout import Rollout, pack

    tok = ByteTokenizer()
    with one_process():
        torch.manual_seed(0)
        model = build_gpt_model(ckpt_args())
        resp = [tok.tokenize(f"\\boxed{{{d}}}") + [tok.end_of_turn] for d in CHOICES]
        rows = [
            Rollout(tok.encode_prompt(p.messages), r, "", 0.0, 0.0, True) for p in prompts() for r in resp
        ]
        batch = pack(rows, tok.pad)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(150):
            opt.zero_grad()
            logp, _ = token_logprobs(model, batch.tokens, tok.vocab_size)
            loss = -(logp * batch.mask).sum() / batch.mask.sum()
            loss.backward()
            opt.step()
        assert float(loss.detach()) < 0.13  # ~ ln 3 / 10 response tokens: the format is learnt
        return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def _model(state):
    from megatron_sed.model import build_gpt_model

    model = build_gpt_model(ckpt_args())
    model.load_state_dict(state)
    return model


def test_grpo_raises_the_reward_and_its_checkpoint_reads_back(warm, tmp_path):
    from megatron_sed.data.tokenizer import ByteTokenizer
    from megatron_sed.eval.loading import load_model
    from megatron_sed.rl import GRPOConfig
    from megatron_sed.rl.checkpoint import save_rl_checkpoint
    from megatron_sed.rl.heldout import evaluate_heldout
    from megatron_sed.rl.train import LoopOptions, make_optimizer, train_grpo

    tok = ByteTokenizer()
    cfg = GRPOConfig(
        n=8, prompts_per_step=4, mini_batch_prompts=2, micro_batch_size=8, max_new_tokens=12, lr=1e-3, seed=7
    )
    params = SamplingParams(1.0, 1.0, cfg.max_new_tokens)
    with one_process():
        model = _model(warm)

        def measure():
            return evaluate_heldout(model, tok, prompts(), 32, params, seed=99)["avg@32"]

        before = measure()
        opt = make_optimizer(model, cfg)
        records = train_grpo(model, tok, prompts(), cfg, LoopOptions(train_iters=20), opt)
        after = measure()
        print(f"avg@32 {before:.3f} -> {after:.3f}; rewards {[round(r['reward'], 2) for r in records]}")
        assert 0.2 < before < 0.5, before  # the format is learnt, the choice is not
        assert after > before + 0.3, (before, after)
        assert records[0]["mixed_groups"] > 0.5 and all(r["updates"] == 2 for r in records)
        # Round trip: save in the trainer's layout, read back with the eval loader.
        save_rl_checkpoint(
            tmp_path / "rl", 20, model, ckpt_args(), opt, dict(config=cfg.to_dict(), source="warm")
        )
        loaded, args, ckpt_dir, common = load_model(str(tmp_path / "rl"))
        assert (
            ckpt_dir.name == "iter_0000020"
            and common["iteration"] == 20
            and common["checkpoint_version"] == 3.0
        )
        assert args.rl_config["lr"] == 1e-3 and "exp_avg" in str(
            common["rl_state"]["optimizer"]["state"][0].keys()
        )
        tokens = torch.tensor([tok.encode_prompt(prompts()[0].messages) + tok.tokenize("\\boxed{2}")])
        pos = torch.arange(tokens.shape[1])[None]
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens, pos, None), model(tokens, pos, None), rtol=0, atol=0)
            assert not torch.equal(_model(warm).eval()(tokens, pos, None), model(tokens, pos, None))


def test_resume_from_an_rl_checkpoint_is_exact(warm, tmp_path):
    from megatron_sed.rl.checkpoint import save_rl_checkpoint
    from megatron_sed.rl.cli import main
    from megatron_sed.rl.config import GRPOConfig
    from megatron_sed.rl.train import make_optimizer

    with one_process():  # the starting point, written by the RL save path at iteration 0
        model = _model(warm)
        save_rl_checkpoint(
            tmp_path / "base", 0, model, ckpt_args(), make_optimizer(model, GRPOConfig()), dict(source="warm")
        )
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": ANSWER}) + "\n" for q in QUESTIONS))
    common = ["--prompts", str(data), "--train-iters", "2", "--n", "4", "--prompts-per-step", "4"]
    common += [
        "--mini-batch-prompts",
        "2",
        "--micro-batch-size",
        "3",
        "--max-new-tokens",
        "12",
        "--lr",
        "1e-3",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    main(
        [
            "--load",
            str(tmp_path / "base"),
            "--save",
            str(a),
            "--save-interval",
            "1",
            "--metrics-file",
            str(a / "m.jsonl"),
            *common,
        ]
    )
    (b).mkdir()
    (b / "m.jsonl").write_text(
        (a / "m.jsonl").read_text().splitlines()[0] + "\n"
    )  # the log up to iteration 1
    main(
        [
            "--load",
            str(a),
            "--ckpt-step",
            "1",
            "--save",
            str(b),
            "--metrics-file",
            str(b / "m.jsonl"),
            *common,
        ]
    )
    ra = [json.loads(line) for line in (a / "m.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rb] == [1, 2] and ra[0]["mixed_groups"] > 0  # a real update
    for key in ("reward", "entropy", "response_length", "loss", "grad_norm", "clip_frac"):
        assert rb[1][key] == ra[1][key], key
    from megatron_sed.eval.loading import load_model

    with one_process():
        ma = load_model(str(a))[0]
        mb, _, ckpt_dir, _ = load_model(str(b))
        assert ckpt_dir.name == "iter_0000002"
        for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
            if torch.is_tensor(pa):
                assert torch.equal(pa, pb), name
