"""The SED-SFT loss on vocab-parallel logits (derivation: docs/method.md).

    sed_loss.py          the entry point: vocab_parallel_sed_loss / SEDLoss, input checks,
                         the one dispatcher between the implementations
    config.py            SEDConfig: the loss's hyperparameters, validated once
    torch_sed.py         the torch autograd Function (CPU; GPU inputs the kernels cannot run)
    triton_sed.py        the Triton autograd Function (GPU), on triton_kernels.py
    partials.py          per-rank partial statistics and their exact combination
    comm.py              the tensor-parallel group and the one all-gather
    fused_linear_sed.py  the output layer fused with the loss: no [s, b, V/tp] logits
    stats.py             SEDStats, the registry of statistic names, their reduction

Nothing is imported here, so `import megatron_sed.ops.stats` does not load Triton.
"""
