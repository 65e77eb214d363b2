"""The verifiable reward: 1 when the response's last \\boxed{} answer equals the reference
(eval.metrics.is_correct: numbers compared canonically), else 0, as in the authors' math
RL (no format or length shaping)."""

from __future__ import annotations

from megatron_sed.eval.metrics import is_correct


def boxed_match_reward(response: str, answer: str) -> float:
    return 1.0 if is_correct(response, answer) else 0.0
