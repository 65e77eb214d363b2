"""Verifiable rewards, 1 or 0, no format or length shaping (as in the authors' math RL).

boxed    the response's last \\boxed{} answer equals the reference (eval.metrics.is_correct:
         numbers compared canonically). The authors' reward.
checked  boxed, and the derivation holds: the response writes at least one equation, every
         equation is arithmetically true, and the last one's result is the boxed answer.
         For tasks whose answer can be read off the prompt (pick3 states its target),
         "boxed" rewards copying it; "checked" only rewards a correct choice carried out.
"""

from __future__ import annotations

from megatron_sed.data.synthetic import equations_valid, path_signature
from megatron_sed.eval.metrics import extract_boxed, is_correct, normalize_answer


def boxed_match_reward(response: str, answer: str) -> float:
    return 1.0 if is_correct(response, answer) else 0.0


def checked_derivation_reward(response: str, answer: str) -> float:
    if not is_correct(response, answer) or not equations_valid(response):
        return 0.0
    last_result = str(path_signature(response)[-1][-1])
    return 1.0 if normalize_answer(last_result) == normalize_answer(extract_boxed(response) or "") else 0.0


REWARDS = {"boxed": boxed_match_reward, "checked": checked_derivation_reward}
