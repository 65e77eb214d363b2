"""Bad flags fail at start with messages that name the flags."""

import pytest

from megatron_sed.train.arguments import ArgumentError, parse_args


@pytest.mark.parametrize(
    "argv, world, needle",
    [
        (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--hidden-size", "96"], 2,
         "--num-attention-heads (3) must be divisible by --tensor-model-parallel-size"),
        (["--group-query-attention", "--num-query-groups", "3"], 1, "--num-query-groups"),
        (["--hidden-size", "65"], 1, "--hidden-size (65) must be divisible by --num-attention-heads"),
        (["--pipeline-model-parallel-size", "2"], 2, "--pipeline-model-parallel-size 2 needs GPUs"),
        (["--fp8-format", "hybrid"], 1, "--fp8-format needs Transformer Engine"),
        (["--transformer-impl", "transformer_engine"], 1, "--transformer-impl transformer_engine"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2, "--sequence-parallel"),
        (["--use-distributed-optimizer"], 1, "--use-distributed-optimizer"),
        (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "--global-batch-size (6)"),
        (["--fp16"], 1, "--fp16"),
        (["--bf16", "--fp16"], 1, "--bf16 and --fp16"),
        (["--sed-top-k", "0"], 1, "--sed-top-k"),
        (["--loss-type", "sed", "--sed-threshold", "1.5"], 1, "--sed-threshold"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--finetune"], 1, "--finetune needs --load"),
        (["--lr-warmup-iters", "50", "--train-iters", "10"], 1, "--lr-warmup-iters"),
        (["--seq-length", "512", "--max-position-embeddings", "256"], 1, "--max-position-embeddings"),
        (["--tokenizer-type", "hf"], 1, "--tokenizer-model"),
    ],
)
def test_bad_args_name_the_flags(argv, world, needle):
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=world, cuda=False)
    assert needle in str(e.value)


def test_derived_fields():
    a = parse_args(["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                    "--global-batch-size", "8", "--swiglu", "--hidden-size", "96",
                    "--num-attention-heads", "4"], world_size=4, cuda=False)
    assert (a.data_parallel_size, a.num_microbatches) == (2, 2)
    assert a.ffn_hidden_size == 256  # Megatron-LM's SwiGLU default: int(8/3 * 96 / 64) * 64
    assert a.transformer_impl == "local" and a.distributed_backend == "gloo"
    assert a.max_position_embeddings == a.seq_length
    assert a.num_query_groups == a.num_attention_heads  # no GQA


def test_main_exits_2_with_message(capsys):
    from megatron_sed.train.trainer import main

    assert main(["--pipeline-model-parallel-size", "4"]) == 2
    assert "--pipeline-model-parallel-size" in capsys.readouterr().err
