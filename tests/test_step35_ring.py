"""Step-3.5's sliding-window layers on ring caches (issue 15): with SWA_CHUNK 8 and window 4 a sliding layer keeps
11 slots, prompts longer than 8 tokens are prefilled in chunks, and generations wrap the rings many times; rollback
after rejected drafts must stay exact across the wrap."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import generate, kvcache, speculative
from mtp_jax import model as M
from mtp_jax.config import load_config
from mtp_jax.families import step35, step35_graph
from mtp_jax import synthetic
from tests.helpers import numpy_init

CFG = load_config("step35-tiny")
PROMPTS = [list(range(20, 39)), [7, 8, 9]]  # 19 tokens (three chunks) and 3


@pytest.fixture(autouse=True)
def small_rings(monkeypatch):
    monkeypatch.setattr(step35_graph, "SWA_CHUNK", 8)


def test_sliding_stacks_are_rings_and_full_stacks_hold_every_position():
    cache = kvcache.init_trunk_cache(CFG, 2, 64)
    sizes = {attr: (None if k is None else k.shape[2]) for (attr, _, _), k in zip(step35.stacks(CFG), cache.k)}
    assert sizes == {"dense_layers": 64, "moe_layers": 64, "dense_swa_layers": None, "moe_swa_layers": 11}
    assert cache.size == 64


def test_chunked_prefill_and_decode_past_the_wrap_equal_the_full_forward():
    """Rows at different ring offsets: a 19- and a 13-token prefill (chunks of 8, padding written past row 1's
    end), 21 more tokens each (chunked again), then single tokens; every logit as the cache-free forward's."""
    params = numpy_init(CFG, seed=0, std=0.08)
    toks = np.random.default_rng(0).integers(1, CFG.vocab_size, (2, 44))
    _, want, _, _ = M.forward(params, jnp.asarray(toks), None, CFG)
    cache = kvcache.init_trunk_cache(CFG, 2, 64)
    _, got, cache, _ = M.forward(params, jnp.asarray(toks[:, :19]), cache, CFG, n_valid=jnp.array([19, 13]))
    np.testing.assert_allclose(got[0], want[0, :19], atol=2e-5)
    np.testing.assert_allclose(got[1, :13], want[1, :13], atol=2e-5)
    start = [19, 13]
    for T in (21, 1, 1, 1):
        piece = np.stack([toks[b, s: s + T] for b, s in enumerate(start)])
        _, got, cache, _ = M.forward(params, jnp.asarray(piece), cache, CFG)
        for b, s in enumerate(start):
            np.testing.assert_allclose(got[b], want[b, s: s + T], atol=2e-5)
        start = [s + T for s in start]
    assert start == [43, 37]  # both rows far past the 11-slot rings


@pytest.fixture(scope="module")
def constructed():
    """Heads agreeing with the trunk on ~60% of tokens (synthetic.py), drawn with the numpy initializer; the plain
    greedy reference."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic.P, "init", lambda key, cfg, std=0.02: numpy_init(cfg, seed=1, std=std))
        params, _, _ = synthetic.constructed_params(CFG, accept=0.6, seed=1)
    return params, generate.generate(params, CFG, PROMPTS, max_new_tokens=40).tokens


@pytest.mark.parametrize("K", [1, 2, 3])
def test_greedy_mtp_equals_plain_across_the_wrap_with_accepted_and_rejected_drafts(K, constructed):
    params, want = constructed
    got = speculative.generate(params, CFG, PROMPTS, num_draft=K, max_new_tokens=40)
    assert got.tokens == want
    hist = got.stats["accept_hist"]
    assert hist[0] > 0 and sum(hist[1:]) > 0, hist  # drafts both rejected (rollback) and accepted
