"""GRPOConfig: one place for the RL hyperparameters and their checks.

Defaults are the authors' verl settings (docs/rl.md): rollout.n=8, temperature 1,
GRPO advantages normalised by the group's unbiased std, no KL term, entropy_coeff 0,
clip_ratio_low 0.2 / clip_ratio_high 0.28 with verl's dual clip c=3, loss_agg_mode
"token-mean", train_batch_size 32 prompts split into mini-batches of 8 prompts (4
updates per rollout batch), AdamW with weight decay 0.01 and grad clip 1.0. The learning
rate is ours: the authors' 1e-6 is for 3B/7B models; a tiny toy model needs ~1e-4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class GRPOConfig:
    n: int = 8  # rollouts per prompt (verl actor_rollout_ref.rollout.n)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    prompts_per_step: int = 32  # verl data.train_batch_size
    mini_batch_prompts: int = 8  # verl ppo_mini_batch_size: 32 / 8 = 4 updates per step
    micro_batch_size: int = 16  # sequences per forward/backward (memory only, same result)
    ppo_epochs: int = 1
    clip_low: float = 0.2  # verl clip_ratio_low
    clip_high: float = 0.28  # verl clip_ratio_high
    clip_ratio_c: Optional[float] = 3.0  # verl's dual clip for A < 0; None turns it off
    entropy_coeff: float = 0.0
    adv_eps: float = 1e-6
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 turns gradient clipping off
    seed: int = 1234
    reward: str = "boxed"  # megatron_sed.rl.reward.REWARDS: boxed (the authors') or checked

    def __post_init__(self):
        checks = [
            (self.reward in ("boxed", "checked"), f"--reward must be boxed or checked, got {self.reward!r}"),
            (self.n >= 2, f"--n must be >= 2 (GRPO normalises rewards within a group), got {self.n}"),
            (self.temperature > 0, f"--temperature must be > 0 for rollouts, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must lie in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.prompts_per_step >= 1, f"--prompts-per-step must be >= 1, got {self.prompts_per_step}"),
            (
                self.mini_batch_prompts >= 1,
                f"--mini-batch-prompts must be >= 1, got {self.mini_batch_prompts}",
            ),
            (
                self.prompts_per_step % self.mini_batch_prompts == 0,
                f"--mini-batch-prompts {self.mini_batch_prompts} must divide "
                f"--prompts-per-step {self.prompts_per_step}",
            ),
            (self.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {self.micro_batch_size}"),
            (self.ppo_epochs >= 1, f"--ppo-epochs must be >= 1, got {self.ppo_epochs}"),
            (0 <= self.clip_low < 1, f"--clip-low must lie in [0, 1), got {self.clip_low}"),
            (self.clip_high >= 0, f"--clip-high must be >= 0, got {self.clip_high}"),
            (
                self.clip_ratio_c is None or self.clip_ratio_c > 1,
                f"--clip-ratio-c must be > 1 (verl's dual clip), got {self.clip_ratio_c}",
            ),
            (self.entropy_coeff >= 0, f"--entropy-coeff must be >= 0, got {self.entropy_coeff}"),
            (self.adv_eps > 0, f"the advantage epsilon must be > 0, got {self.adv_eps}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.clip_grad >= 0, f"--clip-grad must be >= 0, got {self.clip_grad}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.prompts_per_step // self.mini_batch_prompts

    def to_dict(self) -> dict:
        return asdict(self)
