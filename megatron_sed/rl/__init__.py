"""A small GRPO research harness for the tiny Megatron-Core models of this project
(docs/rl.md): the RL stage after SFT, at toy scale on a CPU, to check the paper's claim
end to end (SFT that keeps exploration -> more reward for RL).

    config.py    GRPOConfig: the authors' verl settings as defaults, and their checks
    grpo.py      group-normalised advantages, the clipped token-mean policy loss
    reward.py    verifiable reward: exact match of the last \\boxed{} answer
    rollout.py   n samples per prompt with the KV-cache sampler -> padded token batches
    logprobs.py  per-token log-probs and entropy from a full (teacher-forced) forward
    heldout.py   held-out avg@n / pass@n during training
    checkpoint.py  RL checkpoints in the trainer's layout (eval.loading reads them)
    train.py     the loop: rollouts, old log-probs, mini-batch updates, logs, eval, saves
    cli.py       python -m megatron_sed.rl

The production RL path is not this: export with `python -m megatron_sed.convert
mcore-to-hf` and run verl / NeMo-RL.
"""

from megatron_sed.rl.config import GRPOConfig
from megatron_sed.rl.grpo import group_advantages, policy_loss

__all__ = ["GRPOConfig", "group_advantages", "policy_loss"]
