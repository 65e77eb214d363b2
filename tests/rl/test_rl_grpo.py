"""GRPO's advantages and clipped token-mean loss against numbers worked out by hand, and
the hyperparameter checks."""

import math

import pytest
import torch

from megatron_sed.rl import GRPOConfig, group_advantages, policy_loss


def test_group_advantages_use_the_unbiased_group_std_and_zero_for_equal_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0] * 4])
    adv = group_advantages(rewards, eps=1e-6)
    # [1,0,0,1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735 -> +-0.5 / 0.57735
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    # [0,0,0,1]: mean 0.25, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    b = 1 / (0.5 + 1e-6)
    expected = torch.tensor(
        [[a, -a, -a, a], [0.0] * 4, [-0.25 * b, -0.25 * b, -0.25 * b, 0.75 * b], [0.0] * 4]
    )
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    # The biased std (0.433 for group 3) would give 1.732 there, not 1.5.
    assert adv[2, 3].item() == pytest.approx(1.5, abs=1e-5)
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.ones(3, 1))


def _case():
    """Two responses: A = +1 with ratios (1, 1.5, 0.5); A = -2 with ratios (0.5, 1.5, 4)
    and one padded position (ratio 9, masked out)."""
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.0], [0.5, 1.5, 4.0, 9.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -2.5, -0.1]], dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float64)
    return logp, old, torch.tensor([1.0, -2.0], dtype=torch.float64), mask


def test_clipped_token_mean_loss_by_hand():
    logp, old, adv, mask = _case()
    loss, st = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    # Per token max(-A r, -A clamp(r, 0.8, 1.28)):
    #   A=+1: r=1 -> -1;  r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high);  r=0.5 -> max(-0.5, -0.8) = -0.5
    #   A=-2: r=0.5 -> max(1.0, 1.6) = 1.6 (clipped low);  r=1.5 -> max(3.0, 2.56) = 3.0;
    #         r=4 -> max(8, 2.56) = 8, dual clip min(8, -A * 3 = 6) = 6
    # token-mean over the 6 response tokens: (-1 - 1.28 - 0.5 + 1.6 + 3 + 6) / 6
    assert loss.item() == pytest.approx(7.82 / 6, abs=1e-12)
    assert st.clip_frac == pytest.approx(2 / 6) and st.clip_low_frac == pytest.approx(1 / 6)
    assert st.clip_high_frac == pytest.approx(1 / 6) and st.dual_clip_frac == pytest.approx(1 / 6)
    loss.backward()
    # d/dlogp of -A r = -A r; zero where the clamp or the dual clip decided, and at padding.
    expected = torch.tensor([[-1.0, 0.0, -0.5, 0.0], [0.0, 2 * 1.5, 0.0, 0.0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expected)
    # Without the dual clip the r=4 token costs 8.
    no_dual, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, None)
    assert no_dual.item() == pytest.approx(9.82 / 6, abs=1e-12)


def test_micro_batches_with_the_mini_batch_denominator_sum_to_the_token_mean():
    logp, old, adv, mask = _case()
    mask = mask.clone()
    mask[1, 1] = 0  # rows of different lengths: the mean is over tokens, not rows
    full, _ = policy_loss(logp, old, adv, mask)
    parts = [
        policy_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], num_tokens=5)[0]
        for i in (0, 1)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-12)
    assert full.item() == pytest.approx((-1 - 1.28 - 0.5 + 1.6 + 6) / 5, abs=1e-12)
    # A row-mean ("seq-mean-token-mean") would weigh the rows equally instead: a different number.
    assert full.item() != pytest.approx(((-1 - 1.28 - 0.5) / 3 + (1.6 + 6) / 2) / 2, abs=1e-3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n=1), "--n must be >= 2"),
        (dict(clip_low=-0.1), "--clip-low"),
        (dict(clip_high=-0.01), "--clip-high"),
        (dict(prompts_per_step=32, mini_batch_prompts=6), "must divide"),
        (dict(lr=0.0), "--lr"),
        (dict(clip_ratio_c=0.5), "--clip-ratio-c"),
    ],
)
def test_bad_hyperparameters_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**bad)


def test_defaults_are_the_authors_verl_settings():
    c = GRPOConfig()
    assert (c.n, c.temperature, c.clip_low, c.clip_high, c.entropy_coeff) == (8, 1.0, 0.2, 0.28, 0.0)
    assert (c.prompts_per_step, c.mini_batch_prompts, c.updates_per_step) == (32, 8, 4)


def test_checked_reward_needs_the_derivation_not_only_the_answer():
    from megatron_sed.rl.reward import boxed_match_reward, checked_derivation_reward

    right = r"7+5=12. 12-3=9. \boxed{9}"
    copied = r"\boxed{9}"  # pick3 states the target: the shortcut "boxed" rewards
    wrong_step = r"7+5=13. 13-4=9. \boxed{9}"  # an untrue equation
    box_not_result = r"7+3=10. 10-5=5. \boxed{9}"  # a wrong choice, target boxed anyway
    assert [boxed_match_reward(r, "9") for r in (right, copied, wrong_step, box_not_result)] == [1, 1, 1, 1]
    assert [checked_derivation_reward(r, "9") for r in (right, copied, wrong_step, box_not_result)] == [
        1,
        0,
        0,
        0,
    ]
    assert checked_derivation_reward(r"7+5=12. 12-3=9. \boxed{8}", "9") == 0.0
