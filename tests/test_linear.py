"""linear(): the native CPU kernel against a float64 NumPy reference, the XLA path, row invariance, gradients."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mtp_jax import kernels, linear as lin

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels could not be built here")

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


def _ref(x, w, layer, experts, trans):
    m = np.asarray(w.astype(jnp.float32), np.float64)
    m = m if layer is None else m[layer]
    x = np.asarray(x, np.float64)
    if experts is None:
        return x @ (m.T if trans else m)
    m = m[np.asarray(experts)]
    return np.einsum("mk,mnk->mn" if trans else "mk,mkn->mn", x, m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 64, 100), (4, 37, 129), (7, 256, 1030), (9, 16, 16), (3, 1000, 17)])
def test_kernel_matches_reference(dtype, trans, M, K, N):
    rng = np.random.default_rng(M * K + N)
    L, E = 3, 5
    w = jnp.asarray(rng.standard_normal((L, E, N, K) if trans else (L, E, K, N)), jnp.float32).astype(dtype)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    e = jnp.asarray(rng.integers(0, E, M), jnp.int32)
    tol = 2e-6 * np.sqrt(K) * 4
    y = jax.jit(lambda x, w, e: lin.linear(x, w, 1, e, trans))(x, w, e)
    np.testing.assert_allclose(np.asarray(y), _ref(x, w, 1, e, trans), atol=tol, rtol=0)
    y2 = jax.jit(lambda x, w: lin.linear(x, w[2, 4], trans=trans))(x, w)  # plain [K, N] matrix
    np.testing.assert_allclose(np.asarray(y2), _ref(x, w[2, 4], None, None, trans), atol=tol, rtol=0)
    y3 = jax.jit(lambda x, w: lin.linear(x, w[:, 0], layer=0, trans=trans))(x, w)  # a layer stack
    np.testing.assert_allclose(np.asarray(y3), _ref(x, w[:, 0], 0, None, trans), atol=tol, rtol=0)


@pytest.mark.parametrize("trans", [False, True])
def test_row_result_does_not_depend_on_other_rows(trans):
    """A verify of K+1 tokens must give the same bits as K+1 single-token decodes."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((2, 4, 300, 200)), jnp.float16)  # [K, N] = [300, 200] or [N, K]
    x = jnp.asarray(rng.standard_normal((8, 200 if trans else 300)), jnp.float32)
    e = jnp.asarray([3, 1, 3, 0, 2, 3, 1, 0], jnp.int32)
    f = jax.jit(lambda x, e: lin.linear(x, w, 1, e, trans))
    whole = np.asarray(f(x, e))
    for m in range(8):
        np.testing.assert_array_equal(np.asarray(f(x[m:m + 1], e[m:m + 1]))[0], whole[m])


def test_xla_path_agrees(monkeypatch):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 5, 24, 40)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((6, 24)), jnp.float32)
    e = jnp.asarray(rng.integers(0, 5, 6), jnp.int32)
    fast = np.asarray(lin.linear(x, w, 2, e))
    monkeypatch.setattr(kernels, "use_cpu_kernels", lambda: False)
    slow = np.asarray(lin.linear(x, w, 2, e))
    np.testing.assert_allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("trans", [False, True])
def test_gradient_matches_xla(trans):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((3, 4, 6, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((7, 5 if trans else 6)), jnp.float32)
    e = jnp.asarray(rng.integers(0, 4, 7), jnp.int32)

    def ref(x, w):
        return (jnp.einsum("mk,mnk->mn" if trans else "mk,mkn->mn", x, w[1][e]) ** 2).sum()

    got = jax.grad(lambda x, w: (lin.linear(x, w, 1, e, trans) ** 2).sum(), (0, 1))(x, w)
    want = jax.grad(ref, (0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        lin.linear(jnp.ones((2, 4)), jnp.ones((3, 4, 5)))
