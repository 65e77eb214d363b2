"""End-to-end trainer runs on gloo: TP=2 and DP=2 reproduce TP=1 losses, kill-and-resume
reproduces the uninterrupted run, --loss-type ce equals Megatron's CE path, and the SED
loss decreases on the synthetic math set."""

import json
import os

import pytest
import torch

from dist_utils import run_distributed

# Tolerances: TP splits matmuls/softmax sums across ranks (different fp32 summation
# order; measured |diff| ~2e-8 on the loss over 5 iterations); DP at equal global batch
# sums the same micro-batch gradients (measured: bitwise equal).
TP_ATOL = 1e-5
DP_ATOL = 1e-6


def _argv(tmp, name, *extra):
    return [
        "--loss-type", "sed", "--sed-threshold", "0.9", "--train-iters", "5", "--log-interval", "1",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3", "--lr-warmup-iters", "1",
        "--make-vocab-size-divisible-by", "256",  # same padded vocab at TP 1 and 2
        "--synthetic-num-problems", "60", "--synthetic-cache-dir", os.path.join(tmp, "syn"),
        "--metrics-file", os.path.join(tmp, f"{name}.jsonl"), *extra,
    ]


def _main(rank, world, argv):
    from megatron_sed.train.trainer import main

    assert main(argv) == 0


def _records(tmp, name):
    with open(os.path.join(tmp, f"{name}.jsonl")) as f:
        return [r for r in map(json.loads, f) if "lm_loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train"))
    ck = os.path.join(tmp, "ck")
    # TP=1 baseline, saving at iteration 3 (and at the end). --load names the still empty
    # --save directory, as Megatron users launch the first job: it starts from scratch.
    run_distributed(_main, 1, _argv(tmp, "tp1", "--save", ck, "--save-interval", "3", "--load", ck))
    # "Kill" after the save at 3: the tracker is what a run killed in iterations 4-5 leaves.
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")
    run_distributed(_main, 1, _argv(tmp, "resumed", "--load", ck))
    run_distributed(_main, 2, _argv(tmp, "tp2", "--tensor-model-parallel-size", "2"))
    run_distributed(_main, 2, _argv(tmp, "dp2"))
    return tmp


def _compare(a, b, atol):
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    worst = 0.0
    for x, y in zip(a, b):
        for k in ("lm_loss", "sed_reg", "sed_mask_rate", "entropy", "target_prob", "top1_acc", "grad_norm", "lr"):
            worst = max(worst, abs(x[k] - y[k]))
            assert x[k] == pytest.approx(y[k], abs=atol, rel=atol), (x["iteration"], k, x[k], y[k])
    return worst


def test_tp2_matches_tp1(runs):
    a, b = _records(runs, "tp1"), _records(runs, "tp2")
    assert len(a) == 5
    print("TP2 vs TP1 max abs diff:", _compare(a, b, TP_ATOL))


def test_dp2_matches_dp1_at_same_global_batch(runs):
    print("DP2 vs DP1 max abs diff:", _compare(_records(runs, "tp1"), _records(runs, "dp2"), DP_ATOL))


def test_resume_reproduces_uninterrupted_run(runs):
    straight, resumed = _records(runs, "tp1"), _records(runs, "resumed")
    assert [r["iteration"] for r in resumed] == [4, 5]
    for x, y in zip(straight[3:], resumed):
        for k in ("lm_loss", "sed_reg", "grad_norm", "lr", "consumed_samples"):
            assert x[k] == y[k], (k, x[k], y[k])  # bitwise: same data, state and RNG
    meta = json.load(open(os.path.join(runs, "ck", "iter_0000005", "megatron_sed.json")))
    assert meta["sed"]["threshold"] == 0.9 and meta["iteration"] == 5


def _finetune_missing_worker(rank, world, tmp):
    from megatron_sed.train.trainer import main

    with pytest.raises(FileNotFoundError, match="--finetune --load .*no checkpoint there"):
        main(_argv(tmp, "ft", "--train-iters", "2", "--finetune", "--load", os.path.join(tmp, "none")))


def test_finetune_from_missing_checkpoint_fails_clearly(tmp_path):
    """An empty --load starts from scratch (above); with --finetune it is an error:
    fine-tuning random weights by accident is worse than failing."""
    run_distributed(_finetune_missing_worker, 1, str(tmp_path))


def _ce_and_learning_worker(rank, world, tmp):
    """--loss-type ce on the first global batch equals Megatron's own CE
    (GPTModel without the hook = vocab_parallel_cross_entropy), and SED training lowers
    the loss."""
    from megatron.core import parallel_state as ps

    from megatron_sed.train.arguments import parse_args
    from megatron_sed.train.data import to_model_inputs
    from megatron_sed.train.trainer import Trainer, init_distributed, set_seed

    args = parse_args(_argv(tmp, "ce", "--loss-type", "ce", "--train-iters", "1",
                                 "--lr-warmup-iters", "0"), world_size=1)
    init_distributed(args)
    set_seed(args)
    tr = Trainer(args)
    it = tr._data_iterator(tr.train_ds, 0)
    ref_sum, ref_n = 0.0, 0.0
    with torch.no_grad():
        tr.model.sed_config = None  # Megatron's compute_language_model_loss
        for _ in range(args.num_microbatches):
            b = to_model_inputs(next(it), "cpu", "local", True)
            per_tok = tr.model(b["tokens"], b["position_ids"], b["attention_mask"],
                               labels=b["labels"].clamp(min=0))
            ref_sum += float((per_tok * b["loss_mask"]).sum())
            ref_n += float(b["loss_mask"].sum())
        tr.model.sed_config = tr._sed_config()
    last = tr.train()
    assert last["lm_loss"] == pytest.approx(ref_sum / ref_n, rel=1e-5)
    assert last["sed_reg"] == 0.0 and last["sed_mask_rate"] == 0.0
    ps.destroy_model_parallel()

    args = parse_args(_argv(tmp, "learn", "--train-iters", "40", "--log-interval", "5",
                            "--lr", "3e-3", "--sed-threshold", "0.95"), world_size=1)
    ps.initialize_model_parallel()
    set_seed(args)
    tr = Trainer(args)
    tr.train()
    _check_atomic_save(tr, os.path.join(tmp, "atomic"))


def _check_atomic_save(tr, root):
    """A crash in the middle of a save leaves the previous checkpoint and the tracker
    untouched; the next save cleans the partial directory up."""
    from megatron_sed.train import checkpoint as ckpt

    tr.args.save = root
    tr.save()  # iteration 40
    real_save = ckpt.dist_checkpointing.save

    def crashing_save(sd, directory, **kw):
        open(os.path.join(directory, "__0_0.distcp"), "wb").write(b"partial")
        raise OSError("disk full (simulated)")

    ckpt.dist_checkpointing.save = crashing_save
    tr.iteration = 41
    try:
        with pytest.raises(OSError, match="simulated"):
            tr.save()
    finally:
        ckpt.dist_checkpointing.save = real_save
    assert ckpt.read_tracker(root) == 40
    assert not os.path.exists(ckpt.iter_dir(root, 41))
    assert os.path.exists(os.path.join(ckpt.iter_dir(root, 40), "metadata.json"))
    tr.save()
    assert ckpt.read_tracker(root) == 41
    assert sorted(os.listdir(root)) == ["iter_0000040", "iter_0000041", ckpt.TRACKER]


def test_ce_matches_megatron_and_sed_learns(tmp_path):
    run_distributed(_ce_and_learning_worker, 1, str(tmp_path))
    recs = _records(str(tmp_path), "learn")
    first, last = recs[0], recs[-1]
    assert last["lm_loss"] < first["lm_loss"] - 1.0, (first["lm_loss"], last["lm_loss"])
    assert last["top1_acc"] > first["top1_acc"]
    assert last["sed_reg"] >= 0.0 and 0.0 <= last["sed_mask_rate"] <= 1.0
