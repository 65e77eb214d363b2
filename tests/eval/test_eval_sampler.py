"""The KV-cache sampler on Megatron-Core GPTModel (CPU): the cache must reproduce the
full-recompute reference; temperature / top-p / stop ids behave as documented."""

import pytest
import torch

from megatron_sed.eval.sampler import Sampler, SamplingParams, entropy_of_logits, sample_from_logits
from tests.helpers.model_args import tiny_model_args


def tiny_args(**over):
    defaults = dict(
        hidden_size=32, ffn_hidden_size=64, seq_length=48, max_position_embeddings=48, padded_vocab_size=256
    )
    return tiny_model_args(**{**defaults, **over})


@pytest.fixture(scope="module")
def models():
    from megatron.core import parallel_state as ps

    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.model import build_gpt_model

    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            out = {}
            for pe in ("rope", "learned_absolute"):
                torch.manual_seed(0)
                model = build_gpt_model(tiny_args(position_embedding_type=pe))
                with torch.no_grad():  # sharper than the init so samples differ from noise
                    model.output_layer.weight.mul_(30)
                out[pe] = model
            yield out
        finally:
            ps.destroy_model_parallel()


@pytest.mark.parametrize("pe", ["rope", "learned_absolute"])
def test_kv_cache_matches_full_recompute(models, pe):
    model = models[pe]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16)
    prompt = [5, 17, 99, 3, 42, 7]
    runs = []
    for cache in (True, False):
        runs.append(
            Sampler(model, vocab_size=250, use_kv_cache=cache).generate(
                prompt, 3, params, generator=torch.Generator().manual_seed(3), keep_token_entropies=True
            )
        )
    assert len({tuple(s.ids) for s in runs[0]}) > 1, "samples of one prompt should differ"
    for a, b in zip(*runs):
        assert a.ids == b.ids
        assert all(i < 250 for i in a.ids), "padded vocabulary rows must never be sampled"
        torch.testing.assert_close(
            torch.tensor(a.token_entropies), torch.tensor(b.token_entropies), rtol=1e-4, atol=1e-4
        )
        assert a.num_tokens == 16 and a.entropy_sum == pytest.approx(sum(a.token_entropies), rel=1e-5)
        assert a.first_entropy == pytest.approx(a.token_entropies[0], rel=1e-6)


def test_greedy_stop_and_errors(models):
    model = models["rope"]
    sampler = Sampler(model, vocab_size=250)
    prompt = [1, 2, 3, 4]
    greedy = sampler.generate(prompt, 2, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert greedy[0].ids == greedy[1].ids and len(greedy[0].ids) == 10 and not greedy[0].stopped
    # Stop at the third greedy token: it is dropped from the text but counted for entropy.
    stop = greedy[0].ids[2]
    first = greedy[0].ids.index(stop)
    s = sampler.generate(prompt, 1, SamplingParams(temperature=0.0, max_new_tokens=10), stop_ids=[stop])[0]
    assert s.stopped and s.ids == greedy[0].ids[:first] and s.num_tokens == first + 1
    with pytest.raises(ValueError, match="maximum sequence length 48"):
        sampler.generate(prompt, 1, SamplingParams(max_new_tokens=45))
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate([], 1, SamplingParams())
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sample_from_logits_top_p_and_entropy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_from_logits(logits, SamplingParams(top_p=0.7), g)) for _ in range(300)]
    assert set(draws) == {0, 1}  # nucleus {0.5, 0.3} reaches 0.7
    assert 0.5 < draws.count(0) / 300 < 0.75  # renormalised 0.5 / 0.8 = 0.625
    draws = {int(sample_from_logits(logits, SamplingParams(top_p=0.1), g)) for _ in range(50)}
    assert draws == {0}  # the most likely token is always kept
    assert int(sample_from_logits(logits, SamplingParams(temperature=0.0))) == 0
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert float(entropy_of_logits(logits)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
