import json
import os

import numpy as np
import pytest

from megatron_sed.data import indexed, preprocess
from megatron_sed.data.formats import MATH_SYSTEM_PROMPT
from megatron_sed.data.indexed import SFTIndexedData
from megatron_sed.data.tokenizer import build_tokenizer


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run(argv, capsys=None):
    code = preprocess.main(argv + ["--no-progress"])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def files_with_prefix(directory, name):
    return sorted(p for p in os.listdir(directory) if p.startswith(name))


def supervised_runs(ids, mask):
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


ROWS = {
    "messages": [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "\\boxed{2}"},
            ]
        }
    ],
    "question_response": [{"question": "What is 2+3?", "response": "2+3=5. \\boxed{5}"}],
    "question_answer": [{"question": "Capital of France?", "answer": "Paris"}],
    "prompt_completion": [{"prompt": "Say hi", "completion": "hi there"}],
    "sharegpt": [{"messages": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]}],
}
ASSISTANT = {
    "messages": ["Hello!", "\\boxed{2}"],
    "question_response": ["2+3=5. \\boxed{5}"],
    "question_answer": ["Paris"],
    "prompt_completion": ["hi there"],
    "sharegpt": ["Hey"],
}


@pytest.mark.parametrize("tokenizer_type", ["byte", "hf"])
def test_every_format_round_trips(tmp_path, tokenizer_type, hf_tokenizer_dir):
    model = hf_tokenizer_dir if tokenizer_type == "hf" else None
    tok = build_tokenizer(tokenizer_type, model)
    end = "<|end|>" if tokenizer_type == "byte" else "<|im_end|>\n"
    eod = "<|eod|>" if tokenizer_type == "byte" else "<|endoftext|>"
    for fmt, rows in ROWS.items():
        src = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
        prefix = str(tmp_path / f"out_{fmt}")
        argv = ["--input", src, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type]
        argv += ["--tokenizer-model", model] if model else []
        assert run(argv) == (0, "")
        data = SFTIndexedData(prefix)
        assert len(data) == 1
        ids, mask = data.get(0)
        text = tok.detokenize(ids.tolist(), skip_special_tokens=False)
        for turn in ASSISTANT[fmt]:
            assert turn in text
        got = [tok.detokenize(r, skip_special_tokens=False) for r in supervised_runs(ids, mask)]
        expected = [t + end for t in ASSISTANT[fmt]]
        expected[-1] += eod
        assert got == expected, fmt
        # The stored sample is exactly the tokenizer's chat rendering of the row.
        ref_ids, ref_mask = tok.apply_chat_template(
            preprocess.row_to_messages(rows[0])
            if fmt != "sharegpt"
            else [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]
        )
        assert ids.tolist() == ref_ids and mask.tolist() == ref_mask
        meta = json.loads(open(prefix + ".json").read())
        assert meta["num_samples"] == 1 and meta["num_tokens"] == len(ids)
        assert meta["num_supervised_tokens"] == int(mask.sum())
        assert meta["tokenizer"]["type"] == tokenizer_type


def test_tabular_and_saved_inputs_and_custom_fields(tmp_path):
    import datasets

    rows = [{"q": f"Question {i}?", "r": f"Answer {i}", "extra": i} for i in range(7)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "b.csv"), index=False)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    import gzip

    (tmp_path / "c.json").write_text(json.dumps(rows))  # one JSON array
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = build_tokenizer("byte")
    for name in ("a.parquet", "b.csv", "saved", "c.json", "d.jsonl.gz"):
        prefix = str(tmp_path / f"out_{name.split('.')[0]}")
        argv = [
            "--input",
            str(tmp_path / name),
            "--output-prefix",
            prefix,
            "--format",
            "question_response",
            "--question-field",
            "q",
            "--response-field",
            "r",
            "--system-prompt",
            "math",
        ]
        assert run(argv) == (0, "")
        data = SFTIndexedData(prefix)
        assert len(data) == 7
        ids, mask = data.get(3)
        text = tok.detokenize(ids.tolist(), skip_special_tokens=False)
        assert text.startswith(f"<|system|>{MATH_SYSTEM_PROMPT}<|end|><|user|>Question 3?")
        assert tok.detokenize(ids[mask.astype(bool)].tolist()) == "Answer 3"


def test_miromind_style_question_response(tmp_path):
    """MiroMind-M1-SFT rows: question + long reasoning response ending in \\boxed{}; multi-worker."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        steps = " ".join(f"Step {k}: {int(rng.integers(100))}+{k}." for k in range(int(rng.integers(5, 60))))
        rows.append(
            {
                "question": f"Problem {i}: compute the sum.",
                "response": f"<think>{steps}</think> So the answer is \\boxed{{{i}}}.",
                "source": "synthetic",
                "id": i,
            }
        )
    src = write_jsonl(tmp_path / "miro.jsonl", rows)
    out1, out2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    base = ["--input", src, "--system-prompt", "math", "--max-seq-length", "400", "--overlength", "truncate"]
    assert run(base + ["--output-prefix", out1]) == (0, "")
    assert run(base + ["--output-prefix", out2, "--workers", "2", "--batch-size", "3"]) == (0, "")
    a, b = SFTIndexedData(out1), SFTIndexedData(out2)
    meta = a.meta
    long = sum(len(r["response"]) + len(r["question"]) + len(MATH_SYSTEM_PROMPT) + 7 > 400 for r in rows)
    assert meta["num_truncated"] == long > 0 and meta["num_samples"] == 40
    assert a.lengths.max() == 400
    tok = build_tokenizer("byte")
    for i in range(40):
        (ia, ma), (ib, mb) = a.get(i), b.get(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)  # workers keep order and content
        sup = tok.detokenize(ia[ma.astype(bool)].tolist())
        assert rows[i]["response"].startswith(sup) or sup == rows[i]["response"]
        if len(ia) < 400:
            assert sup == rows[i]["response"]


BAD = [
    ('{"question": "q", "response": ', "malformed JSON", "malformed_json"),
    ({"question": "q"}, "none of the supported field sets", "unknown_format"),
    ({"question": "q", "response": 5}, "expected a string", "non_string_field"),
    ({"question": "q", "response": None}, "missing field 'response'", "missing_field"),
    ({"question": "q", "response": "   "}, "empty assistant", "empty_assistant"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},
        "unknown role",
        "unknown_role",
    ),
    ({"question": "q", "response": "x" * 500}, "--max-seq-length 64", "too_long"),
    ([1, 2], "expected a JSON object", "not_an_object"),
]


@pytest.mark.parametrize("bad, message, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_file_and_row_or_is_skipped(tmp_path, capsys, bad, message, reason):
    good = {"question": "ok?", "response": "ok."}
    src = write_jsonl(
        tmp_path / "in.jsonl", [good, good, bad if isinstance(bad, str) else json.dumps(bad), good]
    )
    prefix = str(tmp_path / "out")
    argv = ["--input", src, "--output-prefix", prefix, "--max-seq-length", "64"]
    code, err = run(argv, capsys)
    assert code == 1
    assert f"{src}: row 3: " in err and message in err and "--skip-invalid" in err
    assert files_with_prefix(tmp_path, "out") == [] and sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    code, err = run(argv + ["--skip-invalid"], capsys)
    assert code == 0
    meta = json.loads(open(prefix + ".json").read())
    assert meta["num_samples"] == 3 and meta["num_skipped"] == 1 and meta["skipped_by_reason"] == {reason: 1}


def test_overlength_truncate_and_drop_are_counted(tmp_path):
    rows = [
        {"question": "q", "response": "short"},
        {"question": "q", "response": "y" * 300},
        {"question": "z" * 300, "response": "a"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    t, d = str(tmp_path / "t"), str(tmp_path / "d")
    assert run(["--input", src, "--output-prefix", d, "--max-seq-length", "100", "--overlength", "drop"]) == (
        0,
        "",
    )
    meta = SFTIndexedData(d).meta
    assert meta["num_samples"] == 1 and meta["num_dropped_overlength"] == 2 and meta["num_skipped"] == 0
    # Truncating the third row would leave no assistant token: invalid, hence skipped and counted.
    argv = [
        "--input",
        src,
        "--output-prefix",
        t,
        "--max-seq-length",
        "100",
        "--overlength",
        "truncate",
        "--skip-invalid",
    ]
    assert run(argv) == (0, "")
    data = SFTIndexedData(t)
    assert data.meta["num_truncated"] == 1 and data.meta["skipped_by_reason"] == {"no_supervised_tokens": 1}
    assert data.lengths.tolist()[1] == 100 and data.get(1)[1][-1] == 1


def test_failures_leave_no_partial_output(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "response": f"r{i}"} for i in range(50)])
    prefix = str(tmp_path / "out")

    def interrupted(inputs, split):  # Ctrl-C / SIGTERM half-way through the stream
        for k, rec in enumerate(real(inputs, split)):
            if k == 20:
                raise KeyboardInterrupt
            yield rec

    real = preprocess.iter_records
    monkeypatch.setattr(preprocess, "iter_records", interrupted)
    assert preprocess.main(["--input", src, "--output-prefix", prefix, "--no-progress"]) == 130
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    monkeypatch.setattr(preprocess, "iter_records", real)

    # A crash between renames (e.g. disk full) removes what was already renamed.
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_replace(a, b)

    monkeypatch.setattr(indexed.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        preprocess.main(["--input", src, "--output-prefix", prefix, "--no-progress"])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    monkeypatch.setattr(indexed.os, "replace", real_replace)

    # A successful rerun over an existing corpus replaces it whole.
    assert preprocess.main(["--input", src, "--output-prefix", prefix, "--no-progress"]) == 0
    assert len(SFTIndexedData(prefix)) == 50
    assert files_with_prefix(tmp_path, "out") == [
        "out.bin",
        "out.idx",
        "out.json",
        "out_loss_mask.bin",
        "out_loss_mask.idx",
    ]


def test_reader_refuses_incomplete_corpus(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "response": "r"}])
    prefix = str(tmp_path / "out")
    assert run(["--input", src, "--output-prefix", prefix]) == (0, "")
    os.unlink(prefix + "_loss_mask.idx")
    with pytest.raises(FileNotFoundError, match="_loss_mask.idx"):
        SFTIndexedData(prefix)
    os.unlink(prefix + ".json")
    with pytest.raises(FileNotFoundError, match="not a preprocessed SFT corpus"):
        SFTIndexedData(prefix)


def test_input_errors(tmp_path, capsys, monkeypatch):
    prefix = str(tmp_path / "out")
    code, err = run(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", prefix], capsys)
    assert code == 1 and "missing.jsonl' does not exist" in err
    (tmp_path / "x.txt").write_text("hello")
    code, err = run(["--input", str(tmp_path / "x.txt"), "--output-prefix", prefix], capsys)
    assert code == 1 and "unsupported extension" in err
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = run(["--input", "some-org/some-dataset", "--output-prefix", prefix], capsys)
    assert code == 1 and "HF_DATASETS_OFFLINE" in err and "some-org/some-dataset" in err
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "response": "r"}])
    code, err = run(["--input", src, "--output-prefix", prefix, "--tokenizer-type", "hf"], capsys)
    assert code == 1 and "--tokenizer-model" in err
    code, err = run(["--input", src, "--output-prefix", prefix, "--workers", "0"], capsys)
    assert code == 1 and "--workers" in err
    assert not any(p.startswith("out") or p.startswith(".out") for p in os.listdir(tmp_path))
