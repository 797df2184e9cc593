"""--num-draft auto: confidence early stop, K from measured acceptance and costs, plain fallback."""

import numpy as np
import jax.numpy as jnp
import pytest

from mtp_jax import autodraft
from mtp_jax import generate as plain
from mtp_jax import speculative as SP
from mtp_jax.sampling import Sampling
from tests.spec_fixtures import drafting_params
from tests.test_speculative import _CHI2_999, _chi2_homogeneity

CFG, PARAMS = drafting_params(0.06)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [1, 2], [3]]
CHEAP = np.ones((2, SP.AUTO_MAX_DRAFT + 2), np.float32) * np.array([[1.0], [0.05]], np.float32)  # verify 1, head 0.05


def test_choose_prefers_long_drafts_when_they_are_accepted_and_cheap():
    k, ratio = autodraft.choose(jnp.array([90, 80, 70, 60]), jnp.array([100, 90, 80, 70]), jnp.asarray(CHEAP), 4)
    assert int(k) == 4 and float(ratio) > 2
    k, ratio = autodraft.choose(jnp.array([0, 0, 0, 0]), jnp.array([100, 0, 0, 0]), jnp.asarray(CHEAP), 4)
    assert int(k) == 1 and float(ratio) < 1  # nothing accepted: drafting cannot pay


def test_expected_tokens():
    e = autodraft.expected_tokens(jnp.array([8.0, 3.0]), jnp.array([8.0, 8.0]))  # r = 0.9, 0.4
    np.testing.assert_allclose(np.asarray(e), [1.0, 1.9, 1.9 + 0.9 * 0.4], rtol=1e-6)


@pytest.mark.parametrize("p_min", [0.0, 0.3, 0.6])
def test_greedy_auto_equals_plain_greedy(p_min):
    """Rows stop drafting at different points (confidence), the verify length follows the longest draft."""
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=24, eos_ids=[]).tokens
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft="auto", p_min=p_min, costs=CHEAP, max_new_tokens=24,
                      eos_ids=[], trace=True)
    assert res.tokens == ref
    assert res.stats["plain_steps"] == 0
    drafted = [len(line["drafted"]) for line in res.stats["trace"]]
    if p_min > 0:  # some rows stopped early while others went on
        assert min(drafted) < max(drafted)
    assert max(drafted) >= 2


def test_auto_decodes_plain_from_the_start_when_no_acceptance_could_pay():
    costly = np.ones((2, SP.AUTO_MAX_DRAFT + 2), np.float32) * 5.0  # a verify or head step costs 5 decodes
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=30, eos_ids=[]).tokens
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft="auto", costs=costly, max_new_tokens=30, eos_ids=[])
    assert res.tokens == ref  # the plain loop itself runs (autodraft.can_pay is False)
    assert res.stats["row_steps"] == 0 and res.stats["plain_steps"] == 29 and res.stats["trunk_forwards"] == 30
    assert res.stats["plain_loop"]


def test_auto_tries_drafting_only_where_a_good_head_would_pay():
    """K=1 costing 2 decodes (the embedded model's steps cost about 3 on a 2-core CPU): even a head accepted 0.8 of
    the time (1.8 tokens a step) would not pay, so auto does not warm up at all; at 1.5 decodes it would, a head
    accepted half of the time would not."""
    costs = np.full((2, SP.AUTO_MAX_DRAFT + 2), 1e9, np.float32)
    costs[:, :3] = [[1.0, 1.0, 1.5], [0.0, 0.0, 0.5]]
    assert not bool(autodraft.can_pay(jnp.asarray(costs), SP.AUTO_MAX_DRAFT))
    costs[1, 2] = 0.0
    assert bool(autodraft.can_pay(jnp.asarray(costs), SP.AUTO_MAX_DRAFT))
    assert not bool(autodraft.can_pay(jnp.asarray(costs), SP.AUTO_MAX_DRAFT, acceptance=0.5))


def test_auto_stops_drafting_when_the_measured_acceptance_cannot_pay():
    """A step drafting k costs 1 + 0.75 k decodes here: it pays only if more than 3 drafts in 4 are accepted, as a
    good head's would be (can_pay), not this random head's. After the warm-up, plain stretches of 8 then 16
    steps, each followed by a probe that drafts for WARMUP_STEPS steps."""
    costs = np.ones((2, SP.AUTO_MAX_DRAFT + 2), np.float32) * np.array([[1.0], [0.75]], np.float32)
    costs[1, 0] = 0.0
    assert bool(autodraft.can_pay(jnp.asarray(costs), SP.AUTO_MAX_DRAFT))
    assert not bool(autodraft.can_pay(jnp.asarray(costs), SP.AUTO_MAX_DRAFT, acceptance=0.7))
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=30, eos_ids=[]).tokens
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft="auto", costs=costs, max_new_tokens=30, eos_ids=[])
    assert res.tokens == ref
    steps = res.stats["trunk_forwards"] - 1
    assert res.stats["plain_steps"] >= autodraft.PROBE_FIRST * 3 // 2  # most steps are plain ones
    probes = (steps - res.stats["plain_steps"]) // autodraft.WARMUP_STEPS - 1  # each drafts WARMUP_STEPS steps
    assert probes in (1, 2) and steps - res.stats["plain_steps"] == (probes + 1) * autodraft.WARMUP_STEPS


def test_auto_drafts_again_after_an_unlucky_warm_up():
    """A head whose first drafts are accepted 3 times in 4, costs under which drafting one token pays when more
    than 0.6 of them are, and a prior of 4 rejections at the first position: after the warm-up the estimate is
    below 0.6, so the loop stops drafting; the probe after 8 plain steps (3 steps drafting one token) lifts it
    above, and the loop drafts from then on."""
    costs = np.ones((2, SP.AUTO_MAX_DRAFT + 2), np.float32) * np.array([[1.0], [0.6]], np.float32)
    costs[1, 0] = 0.0
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=60, eos_ids=[]).tokens
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft="auto", costs=costs, max_new_tokens=60, eos_ids=[],
                      acceptance_prior=([0], [4]))
    assert res.tokens == ref
    assert res.stats["plain_steps"] == autodraft.PROBE_FIRST
    assert res.stats["trunk_forwards"] - 1 - res.stats["plain_steps"] > 2 * autodraft.WARMUP_STEPS + 1


def test_auto_on_a_model_without_a_head_decodes_plain():
    import dataclasses
    params = dataclasses.replace(PARAMS, nextn=None)
    ref = plain.generate(params, CFG, PROMPTS, max_new_tokens=8, eos_ids=[]).tokens
    assert SP.generate(params, CFG, PROMPTS, num_draft="auto", max_new_tokens=8, eos_ids=[]).tokens == ref


def test_measured_costs_are_relative_to_one_decode():
    costs = autodraft.measure_costs(PARAMS, CFG, 1, 2)
    assert costs.shape == (2, 4) and costs[0, 1] == pytest.approx(1.0, rel=0.5) and (costs[:, 1:] > 0).all()
    assert costs[1, 0] >= 0  # the step's own cost beyond its pieces


def test_best_seconds_is_the_least_of_the_repeats(monkeypatch):
    """timing.best_seconds (autodraft's piece timings, the benchmarks'): each call timed alone, the least kept."""
    import types

    from mtp_jax import timing

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # calls of 3, 1 and 2 s
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert timing.best_seconds(lambda: calls.append(1), 3) == 1.0 and len(calls) == 3


@pytest.mark.parametrize("sampling, p_min", [(Sampling(temperature=1.0), 0.9), (Sampling(temperature=1.5, top_k=5, top_p=0.9), 0.8)])
def test_sampling_with_early_stop_matches_plain_distribution(sampling, p_min):
    """Lossless with drafts that stop early (p_min) and sampled drafts: tokens 1..3 over 3000 rows."""
    cfg, params = drafting_params(0.06, vocab_size=8, eos_token_ids=())
    n = 3000
    prompts = [[1, 2, 3]] * n
    a = plain.generate(params, cfg, prompts, max_new_tokens=3, sampling=sampling, seed=1).tokens
    r = SP.generate(params, cfg, prompts, num_draft="auto", p_min=p_min, costs=CHEAP, max_new_tokens=3,
                    sampling=sampling, seed=2, draft_sampling=True, trace=True)
    drafted = np.bincount([len(line["drafted"]) for line in r.stats["trace"]])
    assert (drafted > 0.05 * n).sum() >= 2 and drafted[1:].sum() > 0.2 * n  # rows stop at different points
    a, b = np.asarray(a), np.asarray(r.tokens)
    for pos in range(3):
        stat, df = _chi2_homogeneity(np.bincount(a[:, pos], minlength=8), np.bincount(b[:, pos], minlength=8))
        assert stat < _CHI2_999[df], (pos, stat, df)
