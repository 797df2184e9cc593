"""Temperature, top-k and top-p against an independent NumPy reference (float64, one row at a time)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import sampling
from mtp_jax.sampling import Sampling, probs, process_logits, sample

V = 40


def reference(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution to sample from, for one row: scale by 1/T; top-k keeps a token when fewer than k tokens
    have a larger logit; top-p keeps, among those, a token when the tokens more probable than it (renormalized
    after top-k) hold less than p of the mass: the smallest most-probable set reaching p."""
    x = logits.astype(np.float64) / s.temperature
    keep = np.ones(x.shape, bool)
    if s.top_k:
        keep &= np.array([(x > xi).sum() < s.top_k for xi in x])
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    p /= p.sum()
    if s.top_p < 1:
        keep &= np.array([p[p > pi].sum() < s.top_p for pi in p])
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def _logits(seed: int, shape=(2, 3, V)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, shape).astype(np.float32)


def _away_from_boundaries(logits: np.ndarray, s: Sampling) -> Sampling:
    """``s`` with top_p moved halfway between two consecutive cumulative masses of every row's sorted
    distribution nearest to it, so float32 and float64 cannot disagree about the cut."""
    if s.top_p == 1:
        return s
    cums = [np.cumsum(np.sort(reference(r, Sampling(s.temperature, s.top_k)))[::-1]) for r in logits.reshape(-1, V)]
    row = cums[0]
    i = int(np.searchsorted(row, s.top_p))
    p = (row[i - 1] + row[i]) / 2 if i > 0 else row[0] / 2
    for c in cums[1:]:  # other rows: the same p must not sit on one of their boundaries either
        assert np.min(np.abs(c - p)) > 1e-5, "pick another seed"
    return Sampling(s.temperature, s.top_k, float(p))


CASES = [Sampling(0.7), Sampling(1.0, top_k=5), Sampling(1.3, top_p=0.8), Sampling(0.5, top_k=10, top_p=0.6),
         Sampling(1.0, top_k=1), Sampling(2.0, top_k=7, top_p=0.95), Sampling(1.0, top_k=V + 5), Sampling(1.0, top_p=0.3)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_probs_equal_the_reference(case):
    logits = _logits(case)
    s = _away_from_boundaries(logits, CASES[case])
    ours = np.asarray(probs(jnp.asarray(logits), s))
    ref = np.stack([reference(r, s) for r in logits.reshape(-1, V)]).reshape(logits.shape)
    np.testing.assert_array_equal(ours > 0, ref > 0)  # the same tokens survive
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    removed = np.asarray(process_logits(jnp.asarray(logits), s)) == -np.inf
    np.testing.assert_array_equal(removed, ref == 0)


def test_top_k_keeps_ties_with_the_kth():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0], np.float32)
    s = Sampling(1.0, top_k=2)
    np.testing.assert_allclose(np.asarray(probs(jnp.asarray(logits), s)), reference(logits, s), atol=1e-7)
    assert (reference(logits, s) > 0).tolist() == [True, False, True, True, False]


def test_greedy_is_one_hot_argmax():
    logits = _logits(11)
    assert np.array_equal(np.asarray(process_logits(jnp.asarray(logits), Sampling())), logits)
    p = np.asarray(probs(jnp.asarray(logits), Sampling()))
    assert np.array_equal(p.argmax(-1), logits.argmax(-1)) and np.array_equal(p.sum(-1), np.ones(p.shape[:-1]))


def test_samples_follow_the_reference():
    """40000 draws of one row: frequencies within 5 standard errors of the reference, none outside its support."""
    logits = _logits(12, (V,))
    s = _away_from_boundaries(logits[None], Sampling(1.2, top_k=12, top_p=0.9))
    ref = reference(logits, s)
    n = 40000
    draws = np.asarray(jax.vmap(lambda k: sample(k, jnp.asarray(logits), s))(jax.random.split(jax.random.key(0), n)))
    freq = np.bincount(draws, minlength=V) / n
    assert np.all(freq[ref == 0] == 0)
    assert np.all(np.abs(freq - ref) <= 5 * np.sqrt(ref * (1 - ref) / n) + 1e-9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_argmax_equals_jnp_argmax(dtype):
    """sampling.argmax (max, then the least index holding it) picks what jnp.argmax picks: random rows, ties
    (the first wins), -inf rows, rows with NaN (the first NaN), in every float dtype logits come in."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 1000)).astype(np.float32)
    x[0, 0, [5, 17, 900]] = 9.0  # a three-way tie
    x[1, 1] = -np.inf
    x[2, 2, [40, 60]] = np.nan
    x[3, 0] = np.round(x[3, 0])  # many ties below the max
    x[4, 1, -1] = 50.0  # the last index
    x = jnp.asarray(x, dtype)
    got = sampling.argmax(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(got[0, 0]) == 5 and int(got[2, 2]) == 40 and int(got[4, 1]) == 999
