"""synthetic.constructed_params: the trunk follows its permutation, the head agrees at the chosen rate."""

import numpy as np
import pytest

from mtp_jax import speculative
from mtp_jax.config import load_config
from mtp_jax.synthetic import constructed_params

CFG = load_config("glm4moe-tiny").replace(vocab_size=2048, hidden_size=128, head_dim=32)


@pytest.mark.parametrize("accept", [0.0, 0.5, 0.9])
def test_head_agrees_with_trunk_at_the_chosen_rate(accept):
    params, pi, pi_head = constructed_params(CFG, accept, seed=1)
    prompts = [[int(t)] for t in np.random.default_rng(0).integers(10, CFG.vocab_size, 16)]
    res = speculative.generate(params, CFG, prompts, num_draft=3, max_new_tokens=48, eos_ids=[])
    for p, row in zip(prompts, res.tokens):
        seq = [p[0], *row]
        assert seq[1:] == [int(pi[t]) for t in seq[:-1]], "the trunk's greedy output is the permutation"
    rate = np.asarray(res.stats["accept_rate_per_pos"])  # P(position i accepted) = accept^(i+1)
    want = accept ** np.arange(1, 4)
    assert np.abs(rate - want).max() < 0.1, (rate, want)
    assert abs((pi_head == pi).mean() - accept) < 0.03


def test_rejects_tied_or_headless_configs():
    with pytest.raises(ValueError, match="untied lm_head and a NextN layer"):
        constructed_params(CFG.replace(num_nextn_predict_layers=0), 0.5)
    with pytest.raises(ValueError, match="accept"):
        constructed_params(CFG, 1.5)
