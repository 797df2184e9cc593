"""The CPU attention kernel (mtp_attend, mtp_jax/kernels/cpu_linear.cc AttendImpl) against a float64 reference, its
independence of T (a verify attends as its decodes do), and where layers.attention uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import kernels, kvcache, kvquant, layers
from mtp_jax.kvcache import QuantStack

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels could not be built here")

_attend = jax.jit(layers.attend_kernel, static_argnums=(5, 6, 7))


def _reference(q, ks, vs, ci, lengths, scale, window=None):
    """float64: query t of row b attends over slots p - window < j <= p = lengths[b] + t of layer ci."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, ks[ci].astype(jnp.float32), vs[ci].astype(jnp.float32)))
    B, T, K, G, H = q.shape
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            n = min(int(lengths[b]) + t + 1, k.shape[1])
            a = 0 if window is None else max(0, int(lengths[b]) + t + 1 - window)
            s = np.einsum("kgh,skh->kgs", q[b, t], k[b, a:n]) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, t] = np.einsum("kgs,skh->kgh", p, v[b, a:n])
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("L,B,S,K,G,H,T", [(3, 1, 37, 2, 2, 64, 1), (2, 3, 130, 4, 2, 64, 4), (2, 2, 9, 1, 3, 20, 2),
                                           (1, 5, 128, 4, 2, 64, 2)])
def test_kernel_matches_float64_reference(dtype, L, B, S, K, G, H, T):
    rng = np.random.default_rng(L * 1000 + S)
    q = jnp.asarray(rng.standard_normal((B, T, K, G, H)) * 2, jnp.float32)
    ks, vs = (jnp.asarray(rng.standard_normal((L, B, S, K, H)), dtype) for _ in range(2))
    lengths = np.asarray(rng.integers(0, S - T + 1, B), np.int32)
    lengths[0] = S - T  # the last query sees every slot
    for ci, window in ((0, None), (L - 1, None), (L - 1, 5)):
        got = np.asarray(_attend(q, ks, vs, jnp.int32(ci), jnp.asarray(lengths), H**-0.5, window))
        want = _reference(q, ks, vs, ci, lengths, H**-0.5, window)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_verify_attends_as_its_decodes_bit_for_bit():
    """T queries in one call give the bits of T one-query calls (each with the lengths a decode would have), here
    with a sliding window."""
    rng = np.random.default_rng(1)
    B, S, K, G, H, T = 3, 50, 2, 4, 64, 4
    q = jnp.asarray(rng.standard_normal((B, T, K, G, H)), jnp.float32)
    ks, vs = (jnp.asarray(rng.standard_normal((2, B, S, K, H)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([0, 17, S - T], jnp.int32)
    block = np.asarray(_attend(q, ks, vs, jnp.int32(1), lengths, 0.125, 7))
    for t in range(T):
        one = np.asarray(_attend(q[:, t:t + 1], ks, vs, jnp.int32(1), lengths + t, 0.125, 7))
        assert np.array_equal(one[:, 0], block[:, t])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_attends_as_a_full_stack(dtype):
    """A sliding layer's ring (slot = position mod S, S = window + T - 1, kvcache.write_block) attends bit for bit as a
    full stack holding the same positions, through blocks of T that write drafts a later block rolls back."""
    rng = np.random.default_rng(5)
    B, K, G, H, T, window = 2, 2, 3, 64, 3, 6
    R, S = window + T - 1, 40
    ring, full = (jnp.zeros((2, B, n, K, H), dtype) for n in (R, S))
    ring_v, full_v = ring, full
    lengths = jnp.zeros((B,), jnp.int32)
    for step in range(10):
        k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
        ring, ring_v = kvcache.write_block(ring, 1, k, lengths, True), kvcache.write_block(ring_v, 1, v, lengths, True)
        full, full_v = kvcache.write_block(full, 1, k, lengths), kvcache.write_block(full_v, 1, v, lengths)
        q = jnp.asarray(rng.standard_normal((B, T, K, G, H)), jnp.float32)
        a = np.asarray(_attend(q, ring, ring_v, jnp.int32(1), lengths, 0.125, window, True))
        b = np.asarray(_attend(q, full, full_v, jnp.int32(1), lengths, 0.125, window, False))
        assert np.array_equal(a, b), step
        lengths = lengths + jnp.asarray([1 + step % T, T], jnp.int32)  # row 0 keeps 1..T of its T (a rollback)


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_gemma4_attends_in_place_and_as_before():
    """Gemma-4's full and sliding layers use the kernel on CPU; its cached forward matches the cache-free one."""
    from mtp_jax import params as P
    from mtp_jax.config import load_config
    from mtp_jax.model import forward

    cfg = load_config("gemma4-tiny")
    params = P.init(jax.random.key(0), cfg, std=0.08)
    ids = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 9)))
    fwd = jax.jit(lambda p, x, c: forward(p, x, c, cfg))
    cache = kvcache.init_trunk_cache(cfg, 2, 16)
    assert "mtp_attend" in fwd.lower(params, ids[:, :6], cache).compile().as_text()
    full = np.asarray(fwd(params, ids, None)[1])
    _, a, cache, _ = fwd(params, ids[:, :6], cache)
    _, b, _, _ = fwd(params, ids[:, 6:], cache)
    np.testing.assert_allclose(np.concatenate([np.asarray(a), np.asarray(b)], 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k_kind,v_kind", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("f32", "q4_0")])
def test_quantized_stacks_attend_as_their_dequantized_floats(k_kind, v_kind):
    """A q8_0 / q4_0 side is dequantized entry by entry as kvquant.dequantize does it: the kernel over the blocks
    gives the bits of the kernel over the f32 stack they dequantize to (and either side may be a float stack)."""
    rng = np.random.default_rng(9)
    L, B, S, K, G, H, T = 2, 2, 24, 2, 3, 64, 3

    def side(kind):
        x = jnp.asarray(rng.standard_normal((L, B, S, K, H)) * 1.5, jnp.float32)
        if kind in ("f32", "f16"):
            s = x.astype({"f32": jnp.float32, "f16": jnp.float16}[kind])
            return s, s.astype(jnp.float32)
        s = QuantStack(*kvquant.quantize(kind, x), kind=kind, dim=H)
        return s, kvquant.dequantize(kind, s.q, s.d)

    (ks, kf), (vs, vf) = side(k_kind), side(v_kind)
    q = jnp.asarray(rng.standard_normal((B, T, K, G, H)), jnp.float32)
    lengths = jnp.asarray([5, S - T], jnp.int32)
    for window in (None, 4):
        got = np.asarray(_attend(q, ks, vs, jnp.int32(1), lengths, 0.125, window, False))
        want = np.asarray(_attend(q, kf, vf, jnp.int32(1), lengths, 0.125, window, False))
        assert np.array_equal(got, want), window


def test_attention_uses_the_kernel_on_float_and_block_stacks():
    """layers.attention attends in place over float and q8_0 / q4_0 stacks (full and sliding-ring layers) and keeps
    XLA's path for TurboQuant's rotated ones."""
    from mtp_jax.families.glm4moe import Glm4MoeConfig
    from mtp_jax.params import Attention

    D, N, K, H, B, S = 32, 4, 2, 32, 2, 12
    cfg = Glm4MoeConfig(vocab_size=16, hidden_size=D, num_hidden_layers=1, num_attention_heads=N,
                        num_key_value_heads=K, head_dim=H, intermediate_size=8, partial_rotary_factor=0.5,
                        moe_intermediate_size=8, n_routed_experts=2, num_experts_per_tok=1)
    rng = np.random.default_rng(2)
    w = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32)  # noqa: E731
    p = Attention(wq=w(D, N, H), wk=w(D, K, H), wv=w(D, K, H), wo=w(N, H, D))
    x, pos = w(B, 1, D), jnp.full((B, 1), 5, jnp.int32)
    mask, lengths = jnp.ones((B, 1), bool), jnp.asarray([5, 5], jnp.int32)

    def run(ks, vs):
        return layers.attention(x, p, pos, cfg, mask, (ks, vs, 0), lengths)[0]

    stack = jnp.zeros((1, B, S, K, H), jnp.float32)
    assert "mtp_attend" in _hlo(run, stack, stack)
    assert "mtp_attend" in _hlo(lambda ks, vs: layers.attention(x, p, pos, cfg, mask, (ks, vs, 0), lengths,
                                                                 window=4)[0], stack, stack)  # a sliding ring
    q8 = QuantStack(*kvquant.quantize("q8_0", stack), kind="q8_0", dim=H)
    q4 = QuantStack(*kvquant.quantize("q4_0", stack), kind="q4_0", dim=H)
    assert "mtp_attend" in _hlo(run, q8, q4)
    turbo = QuantStack(*kvquant.quantize("turbo4", jnp.pad(stack, [(0, 0)] * 4 + [(0, 128 - H)])), kind="turbo4", dim=H)
    assert "mtp_attend" not in _hlo(run, turbo, q8)
