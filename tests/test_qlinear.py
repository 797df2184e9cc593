"""linear() of GGUF-quantized weights (mtp_jax.qweight.QuantWeight) in the native CPU kernel: every value is
dequantized as gguf-py / qweight.dequantize give it, bit for bit, and summed exactly as the f32 kernel sums the
dequantized matrix; experts, layers, per-head weights, tables, stacks that mix types (with a float group), row
invariance (a verify block == single decodes), the XLA path, the portable scalar build, no gradients."""

from functools import cache

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import kernels, kvcache, qweight
from mtp_jax import linear as lin
from mtp_jax import model as M

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels could not be built here")

TYPES = sorted(qweight.DEQUANTIZERS)
# byte offsets of each block's f16 scales; every other byte of a test block is random
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
              "TQ2_0": [64]}


def _rows(qtype: str, lead: tuple[int, ...], k: int, seed: int) -> np.ndarray:
    """u8 [*lead, row_bytes]: blocks of random bytes (every quant bit pattern) with finite f16 scales, some of
    them zero, negative or subnormal."""
    rng = np.random.default_rng(seed)
    bs, ts = qweight.block(qtype)
    b = rng.integers(0, 256, (*lead, k // bs, ts), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        d = rng.standard_normal((*lead, k // bs)) * 0.02
        d = np.where(rng.random(d.shape) < 0.1, 0.0, d)
        d = np.where(rng.random(d.shape) < 0.1, d * 1e-4, d)  # subnormal f16
        b[..., o: o + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(*lead, -1)


def _deq(rows: np.ndarray, qtype: str) -> np.ndarray:
    """The host's dequantization (gguf-py), f32 [..., K]; and qweight's in-graph one must be the same bits."""
    want = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[qtype])
    got = np.asarray(jax.jit(qweight.dequantize, static_argnums=1)(jnp.asarray(rows), qtype))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    return want


def _bits(a) -> np.ndarray:
    return (np.asarray(a, np.float32) + np.float32(0)).view(np.uint32)  # -0 -> +0 (a one-hot sum gives +0)


def _close(y, ref):
    """Within 1e-5 of the result's scale (f32 sums over K against an f64 reference)."""
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantized_values_are_bit_exact(qtype):
    """x = one-hot rows picks single weights out of the sums: y[m, n] = W[n, k_m] exactly. One call of 512
    rows (dequantized once into the kernel's scratch rows) and 128 calls of 4 (dequantized in registers)."""
    K, N = 512, 24
    rows = _rows(qtype, (N,), K, seed=1)
    want = _deq(rows, qtype)  # [N, K]
    w = qweight.QuantWeight((jnp.asarray(rows),), (qtype,), (K, N), 0, 1)
    eye = jnp.eye(K, dtype=jnp.float32)
    whole = jax.jit(lambda x: lin.linear(x, w))(eye)
    fours = jax.jit(lambda x: jax.lax.map(lambda r: lin.linear(r, w), x))(eye.reshape(K // 4, 4, K))
    np.testing.assert_array_equal(_bits(whole), _bits(want.T))
    np.testing.assert_array_equal(_bits(fours.reshape(K, N)), _bits(want.T))


@pytest.mark.parametrize("qtype", TYPES)
def test_experts_and_layers_match_the_f32_kernel_and_reference(qtype, monkeypatch):
    """Rows of a [L, E, N, row_bytes] stack, layer 1, one expert per row: the f32 kernel's result on the
    dequantized stack bit for bit, an f64 reference within 1e-5, the same bits for a row alone or among 4 or
    9 rows (verify == single decodes), and the XLA path (MTP_JAX_KERNELS=0) within 1e-5."""
    L, E, N, K = 3, 4, 70, 512  # 70 columns: a 64-column work item, then 4 + 2 single columns
    rows = _rows(qtype, (L, E, N), K, seed=2)
    W = _deq(rows, qtype)  # [L, E, N, K]
    w = qweight.QuantWeight((jnp.asarray(rows),), (qtype,), (L, E, K, N), 2, 1)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((9, K)), jnp.float32)
    e = jnp.asarray([2, 0, 2, 3, 1, 2, 0, 3, 2], jnp.int32)
    f = jax.jit(lambda x, e: lin.linear(x, w, 1, e))
    y9 = np.asarray(f(x, e))
    f32 = lin._kernel(x, jnp.asarray(W), jnp.int32(1), e, True)
    np.testing.assert_array_equal(y9.view(np.uint32), np.asarray(f32).view(np.uint32))
    _close(y9, np.einsum("mk,mnk->mn", np.asarray(x, np.float64), W[1][np.asarray(e)].astype(np.float64)))
    y4 = np.asarray(f(x[:4], e[:4]))
    np.testing.assert_array_equal(y4, y9[:4])
    for m in (0, 3, 8):
        np.testing.assert_array_equal(np.asarray(f(x[m:m + 1], e[m:m + 1]))[0], y9[m])
    monkeypatch.setattr(kernels, "use_cpu_kernels", lambda: False)
    _close(jax.jit(lambda x, e: lin.linear(x, w, 1, e))(x, e), y9.astype(np.float64))


def test_stack_that_mixes_types_and_a_float_group():
    """Layers of one stack in Q4_K, Q6_K, F16 and Q5_0 (llama-quantize's mixtures; a float group keeps GGUF's
    [N, K] layout): each layer, picked by a traced index, equals the f32 kernel on that layer's values."""
    types = ["Q4_K", "Q6_K", "Q4_K", "F16", "Q5_0"]
    E, N, K = 3, 40, 256
    layout = qweight.HostLayout(types, (E, N, K), True, 2, 1)
    mats = []
    for i, t in enumerate(types):
        if t == "F16":
            v = (np.random.default_rng(i).standard_normal((E, N, K)) * 0.1).astype(np.float16)
            layout.slot(i)[...] = v
            mats.append(v.astype(np.float32))
        else:
            layout.slot(i)[...] = _rows(t, (E, N), K, seed=10 + i)
            mats.append(_deq(layout.slot(i), t))
    w = layout.build((len(types), E, K, N))
    assert w.layer_map is not None and w.types == ("Q4_K", "Q6_K", "F16", "Q5_0")
    W = jnp.asarray(np.stack(mats))  # [L, E, N, K]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, K)), jnp.float32)
    e = jnp.asarray([1, 0, 2, 1, 1], jnp.int32)
    f = jax.jit(lambda x, e, i: lin.linear(x, w, i, e))
    for i in range(len(types)):
        y = np.asarray(f(x, e, jnp.int32(i)))
        np.testing.assert_array_equal(y, np.asarray(lin._kernel(x, W, jnp.int32(i), e, True)))
        np.testing.assert_array_equal(np.asarray(f(x[2:3], e[2:3], jnp.int32(i)))[0], y[2])
    with kernels.disabled():  # the XLA path picks the same group
        _close(jax.jit(lambda x, e: lin.linear(x, w, 3, e))(x, e),
               np.einsum("mk,mnk->mn", np.asarray(x, np.float64), np.asarray(W[3])[np.asarray(e)]))


def test_per_head_weights_and_a_table():
    """heads=True (MLA's attn_k_b / attn_v_b: head h of x uses matrix h) and a quantized table used as the output
    head (trans=True), as the model calls them."""
    H, N, K = 4, 48, 256
    rows = _rows("Q4_K", (2, H, N), K, seed=5)
    W = _deq(rows, "Q4_K")
    w = qweight.QuantWeight((jnp.asarray(rows),), ("Q4_K",), (2, H, K, N), 2, 1)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, H, K)), jnp.float32)
    y = jax.jit(lambda x: lin.linear(x, w, 1, heads=True))(x)
    assert y.shape == (2, 3, H, N)
    _close(y, np.einsum("bthk,hnk->bthn", np.asarray(x, np.float64), W[1]))
    table_rows = _rows("Q8_0", (96,), K, seed=7)
    table = qweight.QuantWeight((jnp.asarray(table_rows),), ("Q8_0",), (96, K), 0, None)
    h = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, K)), jnp.float32)
    logits = jax.jit(lambda h: lin.linear(h, table, trans=True))(h)
    _close(logits, np.einsum("btk,vk->btv", np.asarray(h, np.float64), _deq(table_rows, "Q8_0")))


def test_gradients_through_quantized_weights_are_refused():
    w = qweight.QuantWeight((jnp.asarray(_rows("Q8_0", (8,), 64, seed=9)),), ("Q8_0",), (64, 8), 0, 1)
    x = jnp.ones((2, 64), jnp.float32)
    assert lin.linear(x, w).shape == (2, 8)
    with pytest.raises(TypeError, match="inference-only"):
        jax.grad(lambda x: lin.linear(x, w).sum())(x)


def test_kernel_refuses_inconsistent_calls():
    x, e = jnp.ones((2, 64), jnp.float32), jnp.zeros((2,), jnp.int32)
    rows = jnp.asarray(_rows("Q8_0", (1, 1, 8), 64, seed=9))
    with pytest.raises(Exception, match="trans=1"):
        lin._ffi(x, rows, jnp.int32(0), e, False, 8).block_until_ready()
    with pytest.raises(Exception, match="supported ggml type"):
        lin._ffi(x, rows, jnp.int32(0), e, True, 9).block_until_ready()  # 9 = Q8_1
    with pytest.raises(Exception, match="does not hold K"):
        lin._ffi(x, rows, jnp.int32(0), e, True, 2).block_until_ready()  # Q4_0 rows would be 36 bytes
    with pytest.raises(Exception, match="needs u8"):
        lin._ffi(x, jnp.ones((1, 1, 8, 64)), jnp.int32(0), e, True, 8).block_until_ready()


@cache
def _scalar_target() -> str:
    """The kernel built with -DMTP_JAX_SCALAR (the portable code of machines without AVX-512), registered
    beside the real one."""
    saved = kernels.FLAGS
    kernels.FLAGS = [*saved, "-DMTP_JAX_SCALAR"]
    try:
        so = kernels._build(kernels._compiler())
    finally:
        kernels.FLAGS = saved
    import ctypes  # noqa: PLC0415

    jax.ffi.register_ffi_target("mtp_linear_scalar", jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(so)).MtpLinear),
                                platform="cpu")
    return "mtp_linear_scalar"


def test_scalar_build():
    """The scalar code: the same dequantized values (one-hot rows), the scalar f32 code's sums on them, rows
    independent of each other, the AVX-512 results within 1e-5; every type."""
    target = _scalar_target()

    def call(x, w4, eids, qtype):
        out = jax.ShapeDtypeStruct((x.shape[0], w4.shape[2]), jnp.float32)
        return np.asarray(jax.ffi.ffi_call(target, out)(x, w4, jnp.int32(0), eids, trans=True,
                                                        qtype=np.int32(qtype)))

    K, N = 256, 20
    x = jnp.asarray(np.random.default_rng(11).standard_normal((5, K)), jnp.float32)
    e = jnp.zeros((5,), jnp.int32)
    for qtype in TYPES:
        rows = _rows(qtype, (1, 1, N), K, seed=12)
        W = _deq(rows, qtype)
        qid = gguf.GGMLQuantizationType[qtype].value
        eye = jnp.eye(K, dtype=jnp.float32)
        np.testing.assert_array_equal(_bits(call(eye, jnp.asarray(rows), jnp.zeros((K,), jnp.int32), qid)),
                                      _bits(W[0, 0].T), err_msg=qtype)
        y = call(x, jnp.asarray(rows), e, qid)
        np.testing.assert_array_equal(y, call(x, jnp.asarray(W), e, 0), err_msg=qtype)
        np.testing.assert_array_equal(call(x[3:4], jnp.asarray(rows), e[:1], qid)[0], y[3], err_msg=qtype)
        _close(y, np.asarray(lin._qkernel(x, jnp.asarray(rows), jnp.int32(0), e, qid), np.float64))


def test_model_verify_block_equals_single_decodes(tmp_path):
    """The embedded model quantized to Q4_K_M (stacks mixing Q5_0 and Q8_0 experts): a block of 4 tokens on top
    of a cache gives the logits of 4 one-token decodes bit for bit (what keeps greedy MTP == plain greedy)."""
    from mtp_jax.cli import default_model  # noqa: PLC0415
    from mtp_jax.io.gguf import read_gguf  # noqa: PLC0415
    from mtp_jax.quant.gguf_quantize import quantize_gguf  # noqa: PLC0415

    path = tmp_path / "q4_k_m.gguf"
    quantize_gguf(default_model(), path, "Q4_K_M", pure=False, threads=1, progress=False)
    cfg, params = read_gguf(path, dtype="float32", quantized="keep")
    leaves = [q for q in jax.tree.leaves(params, is_leaf=qweight.is_quant) if qweight.is_quant(q)]
    assert any(q.layer_map is not None for q in leaves)
    rows = np.random.default_rng(13).integers(1, cfg.vocab_size, (2, 12)).tolist()
    cache_ = kvcache.init_trunk_cache(cfg, 2, 32)
    _, _, cache_, _ = M.forward_jit(params, jnp.asarray([r[:8] for r in rows]), cache_, cfg)
    step_cache = jax.tree.map(jnp.copy, cache_)
    _, block, _, _ = M.forward_jit(params, jnp.asarray([r[8:] for r in rows]), cache_, cfg)
    singles = []
    for t in range(8, 12):
        _, lg, step_cache, _ = M.forward_jit(params, jnp.asarray([[r[t]] for r in rows]), step_cache, cfg)
        singles.append(np.asarray(lg[:, 0]))
    np.testing.assert_array_equal(np.asarray(block), np.stack(singles, 1))


def test_f16_gguf_loads_float_rows():
    """With the kernels, load_model keeps an F16 GGUF's matrices as GGUF [N, K] rows (a QuantWeight of type F16,
    the layout the kernel reads fastest) and nothing else (norms, the router, the embedding table stay arrays);
    turned back into arrays they are the dequantizing reader's arrays exactly; the logits agree with the [K, N]
    path up to f32 summation order; a verify block of 1..4 tokens on a batch of 1 or 3 rows gives the logits of
    single-token decodes bit for bit."""
    from mtp_jax.cli import default_model  # noqa: PLC0415
    from mtp_jax.io.gguf import read_gguf  # noqa: PLC0415
    from mtp_jax.io.load import load_model  # noqa: PLC0415

    cfg, params, _ = load_model(default_model())
    _, ref = read_gguf(default_model())
    wq = params.moe_layers.attn.wq
    assert qweight.is_quant(wq) and wq.types == ("F16",) and wq.groups[0].shape[-1] == wq.k
    assert qweight.is_quant(params.moe_layers.ffn.gate) and qweight.is_quant(params.lm_head)
    assert not qweight.is_quant(params.moe_layers.ffn.router) and not qweight.is_quant(params.embed)
    assert not qweight.is_quant(params.moe_layers.attn_norm)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)) and a.dtype == b.dtype, qweight.float_arrays(params),
                        ref)
    assert all(jax.tree.leaves(same))
    rows = np.random.default_rng(14).integers(1, cfg.vocab_size, (3, 12)).tolist()
    _, lg_rows, _, _ = M.forward_jit(params, jnp.asarray(rows), kvcache.init_trunk_cache(cfg, 3, 16), cfg)
    _, lg_ref, _, _ = M.forward_jit(ref, jnp.asarray(rows), kvcache.init_trunk_cache(cfg, 3, 16), cfg)
    np.testing.assert_allclose(np.asarray(lg_rows), np.asarray(lg_ref), atol=1e-4, rtol=1e-4)
    for B in (1, 3):
        for T in (1, 2, 4):
            cache_ = kvcache.init_trunk_cache(cfg, B, 32)
            _, _, cache_, _ = M.forward_jit(params, jnp.asarray([r[:8] for r in rows[:B]]), cache_, cfg)
            step_cache = jax.tree.map(jnp.copy, cache_)
            _, block, _, _ = M.forward_jit(params, jnp.asarray([r[8: 8 + T] for r in rows[:B]]), cache_, cfg)
            singles = []
            for t in range(8, 8 + T):
                _, lg, step_cache, _ = M.forward_jit(params, jnp.asarray([[r[t]] for r in rows[:B]]), step_cache, cfg)
                singles.append(np.asarray(lg[:, 0]))
            np.testing.assert_array_equal(np.asarray(block), np.stack(singles, 1), err_msg=f"B={B} T={T}")


def test_random_weights_load_as_float_rows_like_a_gguf(tmp_path):
    """load_model gives random-init, HF and orbax weights the same [N, K] rows layout as a GGUF's (float_rows):
    the same leaves become rows as for the GGUF written from them, float_arrays gives the weights back exactly,
    and the logits agree with the [K, N] path up to f32 summation order. With --dequantize (quantized=
    "dequantize") they stay arrays."""
    from mtp_jax.io.gguf import write_gguf  # noqa: PLC0415
    from mtp_jax.io.load import load_model  # noqa: PLC0415

    cfg, params, _ = load_model("glm4moe-tiny")
    _, plain, _ = load_model("glm4moe-tiny", quantized="dequantize")
    assert not any(qweight.is_quant(x) for x in jax.tree.leaves(plain, is_leaf=qweight.is_quant))
    write_gguf(tmp_path / "m.gguf", cfg, plain, outtype="f32")
    _, from_gguf, _ = load_model(tmp_path / "m.gguf")
    rows = lambda p: jax.tree.map(qweight.is_quant, p, is_leaf=qweight.is_quant)  # noqa: E731
    assert rows(params) == rows(from_gguf) and qweight.is_quant(params.moe_layers.attn.wq)
    assert params.moe_layers.attn.wq.types == ("F32",) and not qweight.is_quant(params.embed)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), qweight.float_arrays(params), plain)
    assert all(jax.tree.leaves(same))
    toks = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 9)))
    _, lg_rows, _, _ = M.forward_jit(params, toks, kvcache.init_trunk_cache(cfg, 2, 16), cfg)
    _, lg_ref, _, _ = M.forward_jit(plain, toks, kvcache.init_trunk_cache(cfg, 2, 16), cfg)
    np.testing.assert_allclose(np.asarray(lg_rows), np.asarray(lg_ref), atol=1e-4, rtol=1e-4)
