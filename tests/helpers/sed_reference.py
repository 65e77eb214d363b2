"""An independent float64 full-vocabulary SED reference, written from the formula in
docs/method.md with plain autograd (no code shared with megatron_sed.ops)."""

import torch


def reference_sed(logits, target, coef, top_k, threshold, mask, regularizer, ignore_index=-100):
    """Full-vocab logits [..., V] (any dtype; computed in float64). Returns (loss, stats),
    loss differentiable w.r.t. `logits` through autograd."""
    z = logits.double()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logp_y = logp.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    p_y = logp_y.exp()
    ce = -logp_y
    entropy = -(p * logp).sum(-1)
    topk_mass = p.topk(top_k, dim=-1).values.sum(-1)
    with torch.no_grad():
        if mask == "topk_mass":
            m = topk_mass < threshold
        elif mask == "entropy":
            m = entropy > threshold
        elif mask == "all":
            m = torch.ones_like(valid)
        else:
            m = torch.zeros_like(valid)
        m = m & valid & (coef > 0)
    r = (p_y - 0.5) ** 2 if regularizer == "quadratic" else -entropy
    reg = coef * m.double() * r
    zero = torch.zeros_like(ce)
    loss = torch.where(valid, ce + reg, zero)
    correct = (z.argmax(-1) == target) & valid
    stats = {
        "ce": torch.where(valid, ce, zero).detach(),
        "reg": torch.where(valid, reg, zero).detach(),
        "mask": m,
        "target_prob": torch.where(valid, p_y, zero).detach(),
        "entropy": torch.where(valid, entropy, zero).detach(),
        "topk_mass": torch.where(valid, topk_mass, zero).detach(),
        "correct": correct,
    }
    return loss, stats


def make_inputs(s, b, vocab, seed, scale=3.0, ignore_frac=0.15, ignore_index=-100):
    """Peaked random logits (so top-k masses spread over (0, 1)) and targets that are
    often the argmax, sometimes ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, vocab, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, vocab, (s, b), generator=g)
    use_argmax = torch.rand(s, b, generator=g) < 0.4
    target = torch.where(use_argmax, logits.argmax(-1), target)
    ignored = torch.rand(s, b, generator=g) < ignore_frac
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return logits, target


# Tolerances by input dtype. The ops compute in float32 (float64 for float64 input) on the
# input's own rounded values, which the reference is fed too; the gradient is formed in
# float32 and rounded once to the input dtype by autograd.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-5, rtol=2e-5),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=1e-4),
    torch.bfloat16: dict(atol=4e-3, rtol=1e-2),
    torch.float16: dict(atol=5e-4, rtol=2e-3),
}
