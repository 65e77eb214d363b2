"""SED-SFT trainer on Megatron-Core: `python -m megatron_sed.train` / `megatron-sed-train`.

Megatron's own `pretrain()` runs the loop (schedules, DDP, optimizer, checkpointing,
logging); these modules are the pieces the plugin hands it:

    entry.py            main(): the process (CPU backend if no GPU, logging), bad flags -> exit 2
    launch.py           the Megatron half: parse the flags, pretrain() with the pieces below
    arguments.py        Megatron's parser plus the SED / megatron-sed flags, and their checks
    checkpoint_args.py  the shape and tokenizer of the checkpoint a run loads
    load_check.py       what --load / --pretrained-checkpoint will read, checked up front
    model_provider.py   model_provider: the GPTModel from Megatron's args and specs
    data.py             the dataset provider (packed SFT data or the synthetic set)
    step.py             forward_step / loss_func (the run's SEDRuntime bound in)
    calibration.py      --sed-mask-ratio: the held-out samples tau is calibrated on
    metrics.py          --metrics-file: Megatron's logged values as JSON lines
    log_lines.py        two of Megatron's log lines made to fit the plugin's reports

The hooks that feed metrics.py and log_lines.py, and every other change to Megatron's
behaviour, are installed from one module: megatron_sed.megatron_patches.
"""
