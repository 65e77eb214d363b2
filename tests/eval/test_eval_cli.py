"""python -m megatron_sed.eval on a torch_dist checkpoint in our trainer's layout (save dir,
tracker file, common.pt with Megatron args): JSON + samples output, plot, and clear errors
for bad checkpoints and prompts files."""

import json
import os

import pytest
import torch

from megatron_sed.eval.__main__ import main
from model_args import tiny_model_args


def _ckpt_args():
    return tiny_model_args(
        num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
        group_query_attention=False, normalization="LayerNorm", swiglu=False,
        seq_length=160, max_position_embeddings=160, position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=False, tensor_model_parallel_size=2, vocab_size=262,
        padded_vocab_size=512, hidden_dropout=0.1, attention_dropout=0.1, tokenizer_type="byte",
        tokenizer_model=None, chat_template=None, system_prompt=None, data_path=None,
        train_data_path=None,
    )


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import SyncTorchDistSaveStrategy, single_process_group
    from megatron_sed.eval.loading import eval_args
    from megatron_sed.model import build_gpt_model

    root = tmp_path_factory.mktemp("ckpt")
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            torch.manual_seed(0)
            model = build_gpt_model(eval_args(_ckpt_args()))
            # megatron_sed.train's layout: args as a dict, tau under "sed"
            sd = {"model": model.sharded_state_dict(), "args": vars(_ckpt_args()), "iteration": 7,
                  "sed": {"threshold": 0.8}}
            (root / "iter_0000007").mkdir()
            dist_checkpointing.save(sd, str(root / "iter_0000007"),
                                    sharded_strategy=SyncTorchDistSaveStrategy())
            (root / "latest_checkpointed_iteration.txt").write_text("7")
            torch.save({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                       root / "reference_state.pt")
        finally:
            ps.destroy_model_parallel()
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
    common = ["--load", str(save_dir), "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "12",
              "--pass-k", "1", "3", "--top-p", "0.9"]
    main(common + ["--output", str(out), "--samples-output", str(samples)])
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["label"] == "run_a" and res["iteration"] == 7 and res["sed_threshold"] == 0.8
    assert m["num_prompts"] == 3 and m["samples_per_prompt"] == 3
    for key in ("accuracy", "pass@1", "pass@3", "self_bleu", "distinct_1", "distinct_2",
                "distinct_correct_paths", "mean_token_entropy", "truncated_fraction"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    # An untrained model over a 262-token vocabulary: near-uniform, so entropy near log(262).
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
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.eval.loading import load_model

    ref = torch.load(save_dir / "reference_state.pt")
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            torch.manual_seed(99)  # a different init: only loading can make them equal
            model, args, ckpt_dir, common = load_model(str(save_dir))
        finally:
            ps.destroy_model_parallel()
    assert ckpt_dir.name == "iter_0000007" and args.tensor_model_parallel_size == 1
    assert args.hidden_dropout == 0.0 and not model.training
    state = model.state_dict()
    assert ref.keys() <= state.keys()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k


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
        _fails(["--load", str(save_dir), "--prompts", str(f), "--output", str(tmp_path / "y.json")],
               capsys, *needles)

    _fails(["--load", str(save_dir), "--prompts", str(tmp_path / "missing.jsonl"), "--output",
            str(tmp_path / "y.json")], capsys, "missing.jsonl", "does not exist")
    run('{"question": "1+1?", "answer": "2"}\n{oops\n', "p.jsonl:2", "invalid JSON")
    run('{"question": "1+1?"}\n', "p.jsonl:1", "'answer'")
    run('{"text": "1+1?", "answer": "2"}\n', "p.jsonl:1", "no question")
    run("\n\n", "holds no prompts")
    _fails(["--load", str(save_dir), "--prompts", str(tmp_path / "p.jsonl"), "--output", "z.json",
            "--n", "2", "--pass-k", "4"], capsys, "--pass-k [4]")
