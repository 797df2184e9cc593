"""Q2_K..Q6_K vs libggml's ggml_quantize_chunk: 0 mismatching blocks, with and without imatrix."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mtp_jax.quant.registry import dequantize, quantize

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
N = 1024  # 4 superblocks per row


def _normal(rng, rows, n=N):
    return (rng.standard_normal((rows, n)) * np.exp(2 * rng.standard_normal((rows, 1)))).astype(np.float32)


def _bf16(x):
    return (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # truncation is enough to create ties


def _data(case: str, seed: int) -> np.ndarray:
    """f32[R, N], a few hundred superblocks per case."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, 64)
    if case == "fp16":
        x = x.astype(np.float16).astype(np.float32)
    elif case == "bf16":
        x = _bf16(x)
    elif case == "zeros":
        x[::3, 256:512] = 0  # whole superblocks
        for r in range(x.shape[0]):  # zero 16- and 32-value sub-blocks inside normal superblocks
            j = rng.integers(0, N // 16, 3)
            x[r, 16 * j[0] : 16 * j[0] + 16] = 0
            x[r, 32 * (j[1] // 2) : 32 * (j[1] // 2) + 32] = 0
            x[r, 16 * j[2] : 16 * j[2] + 16] *= 1e-20
    elif case == "constant":
        x[0::4, :256] = 1.25
        x[1::4, :256] = -0.75
        x[2::4, 512:] = rng.choice([-3.0, 0.5, 2.0], size=(x[2::4].shape[0], 1)).astype(np.float32)
        for r in range(x.shape[0]):  # constant sub-blocks inside normal superblocks
            j = rng.integers(0, N // 16)
            x[r, 16 * j : 16 * j + 16] = x[r, 16 * j]
            x[r, 256 + 32 * (j % 8) : 256 + 32 * (j % 8) + 32] = -abs(x[r, 0])
        x[3::4, 768:] = np.abs(x[3::4, 768:]) + 1.0  # all-positive superblocks
    elif case == "outliers":
        idx = rng.integers(0, x.size, x.size // 200)
        x.flat[idx] *= rng.choice([-1e3, 1e3, 60.0], size=idx.size).astype(np.float32)
        x[::7, 256:512] = -np.abs(x[::7, 256:512])  # all-negative superblocks
    elif case == "tiny":
        # per-superblock magnitudes across the eps thresholds (GROUP_MAX_EPS = 1e-15, scales ~ amax/nmax)
        # and fp16 subnormal/underflow of d, dmin
        mags = 10.0 ** rng.uniform(-19, -3, size=(x.shape[0], N // 256, 1))
        x = (x.reshape(x.shape[0], -1, 256) / np.abs(x).max() * mags).astype(np.float32).reshape(x.shape)
        x[:8, :16] = np.float32(1e-15) * rng.choice([-1.0, 1.0], size=(8, 16)).astype(np.float32)
    elif case == "offset":
        # large offsets against small ranges, up to fp16 overflow of d/dmin (inf in the file, as in C)
        x = (x + np.float32(10.0) ** rng.integers(2, 8, size=(x.shape[0], 1)).astype(np.float32)).astype(np.float32)
        x[::2, :16] = rng.standard_normal((x.shape[0] // 2, 16))
    elif case != "normal":
        raise ValueError(case)
    return np.ascontiguousarray(x, dtype=np.float32)


def _imatrix(kind: str | None, seed: int, n: int = N) -> np.ndarray | None:
    rng = np.random.default_rng(seed + 1000)
    if kind is None:
        return None
    if kind == "ones":
        return np.ones(n, np.float32)
    im = rng.gamma(0.7, 2.0, n).astype(np.float32)
    if kind == "zeros":
        im[rng.random(n) < 0.25] = 0
        im[32:64] = 0  # a whole sub-block without weight
        im[512:768:2] = 0
    return im


def _assert_same(ours: np.ndarray, ref: np.ndarray, qtype: GGMLQuantizationType):
    ts = GGML_QUANT_SIZES[qtype][1]
    a = ours.reshape(-1, ts)
    b = ref.reshape(-1, ts)
    bad = np.any(a != b, axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        pytest.fail(
            f"{qtype.name}: {int(bad.sum())}/{bad.size} blocks differ; first block {i}, "
            f"byte offsets {np.nonzero(a[i] != b[i])[0][:16].tolist()}"
        )


@pytest.mark.peer
@pytest.mark.parametrize("imatrix", [None, "gamma", "zeros", "ones"])
@pytest.mark.parametrize("case", ["normal", "fp16", "bf16", "zeros", "constant", "outliers", "tiny", "offset"])
@pytest.mark.parametrize("tname", KTYPES)
def test_matches_ggml(ggml, tname, case, imatrix):
    qtype = GGMLQuantizationType[tname]
    seed = zlib.crc32(f"{tname}/{case}/{imatrix}".encode())
    x = _data(case, seed)
    im = _imatrix(imatrix, seed)
    _assert_same(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype)


@pytest.mark.peer
@pytest.mark.parametrize("tname", KTYPES)
def test_expert_tensor_per_expert_imatrix(ggml, tname):
    """3-D [n_expert, rows, cols]: llama-quant passes imatrix + expert*n_per_row to each expert's rows."""
    qtype = GGMLQuantizationType[tname]
    rng = np.random.default_rng(7)
    n_expert, rows, cols = 4, 8, 512
    x = _normal(rng, n_expert * rows, cols).reshape(n_expert, rows, cols)
    im = rng.gamma(0.7, 2.0, (n_expert, cols)).astype(np.float32)
    im[1, :64] = 0
    for e in range(n_expert):
        _assert_same(quantize(x[e], qtype, im[e]), ggml.ggml_quantize(x[e], qtype, im[e]), qtype)
    whole = quantize(x, qtype)
    assert whole.shape == (n_expert, rows, cols // 256 * GGML_QUANT_SIZES[qtype][1])
    _assert_same(whole, ggml.ggml_quantize(x.reshape(-1, cols), qtype), qtype)


@pytest.mark.parametrize("tname,tol", [("Q2_K", 0.45), ("Q3_K", 0.25), ("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03)])
@pytest.mark.parametrize("imatrix", [None, "gamma"])
def test_round_trip_close(tname, tol, imatrix):
    qtype = GGMLQuantizationType[tname]
    x = np.random.default_rng(3).standard_normal((16, N)).astype(np.float32)
    y = dequantize(quantize(x, qtype, _imatrix(imatrix, 3)), qtype)
    assert y.shape == x.shape
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel < tol, rel


@pytest.mark.peer
@pytest.mark.parametrize("piece", [48, 992])  # last search piece of 1 block: n=16 resp. n=32 types
@pytest.mark.parametrize("tname", KTYPES)
def test_chunk_and_piece_boundaries(ggml, tname, piece, monkeypatch):
    """Tiny superblock chunks and search pieces must not change a byte."""
    from mtp_jax.quant import kquants, primitives

    qtype = GGMLQuantizationType[tname]
    monkeypatch.setattr(getattr(kquants, tname), "chunk", 4)
    monkeypatch.setattr(primitives, "_PIECE", piece)
    x = _data("fp16", 11)[:5, :768]
    for im in (None, _imatrix("zeros", 11, 768)):
        _assert_same(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype)


@pytest.mark.peer
@pytest.mark.parametrize("tname", KTYPES)
def test_single_superblock(ggml, tname):
    """One block per call: numpy would reduce a lone block pairwise, seqsum must not."""
    qtype = GGMLQuantizationType[tname]
    for seed in range(4):
        x = _data("normal", seed)[:1, :256]
        for im in (None, _imatrix("gamma", seed, 256)):
            _assert_same(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype)


def _q6_k_edges(seed: int, many_zeros: bool) -> np.ndarray:
    """f32[48, N] for the Q6_K search (make_qx_quants(16, 32)): zero rows / sub-blocks (with many, more than
    1/16 of the sub-blocks, make_qx_search only searches the others), negative values, and ties: sub-blocks
    with max |x| = 1 and x = (k + 1/2)/32, at rounding midpoints for C's first iscale (-32/max = -+32,
    exact), and +1/-1 pairs, which hit 31.5 (rounded to 32, clamped to 31) at is = -5 but at most 31.4
    from is = -6 down (the tries searched without a clamp)."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, 48)
    x[5::4] = -np.abs(x[5::4])  # all-negative rows
    mid = ((rng.integers(-32, 32, (48, N // 16, 16)) + 0.5) / 32).astype(np.float32)  # [row, sub-block, i]
    mid[:, :, 0] = rng.choice(np.float32([1, -1]), (48, N // 16))  # the max of each sub-block, |x| = 1
    mid[:, ::3, 1] = -mid[:, ::3, 0]  # +a and -a: the first is C's max
    tie = rng.random((48, N // 16)) < 0.3
    x.reshape(48, -1, 16)[tie] = mid[tie]
    x[1, 16:32] = 0  # one all-zero sub-block
    x[2, 64:96] *= 1e-16  # below GROUP_MAX_EPS: C's all-zero early out too
    if many_zeros:
        x[0] = 0  # an all-zero row
        x[3::3, 256:512] = 0  # whole superblocks
        x[4::2, 512:640] = 0  # runs of sub-blocks
    return x


@pytest.mark.peer
@pytest.mark.parametrize("imatrix", [None, "gamma", "zeros"])
@pytest.mark.parametrize("many_zeros", [False, True])
def test_q6_k_search_edges(ggml, many_zeros, imatrix):
    qtype = GGMLQuantizationType.Q6_K
    seed = 60 + many_zeros
    x = _q6_k_edges(seed, many_zeros)
    im = _imatrix(imatrix, seed)
    _assert_same(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype)
    if many_zeros:  # make_qx_search's compacted search: the zero blocks are more than 1/16
        zero = np.abs(x.reshape(-1, 16)).max(axis=1) < 1e-15
        assert zero.mean() > 1 / 16, zero.mean()


# ---------------------------------------------------------------------------------------- primitives (no oracle)


def test_nearest_int_matches_c_bit_trick():
    """C: (bits(f + 12582912.0f) & 0x7fffff) - 0x400000 -- ties to even, garbage (not saturation) past 2^22."""
    from mtp_jax.quant.primitives import nearest_int

    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 4194303.0, 5e6, -5e6, 1e30, np.inf, np.nan], np.float32)
    t = (v + np.float32(12582912.0)).astype(np.float32)
    expect = (t.view(np.int32) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal(nearest_int(v), expect)
    np.testing.assert_array_equal(nearest_int(v[:7]), np.rint(v[:7]).astype(np.int32))


def test_best_index_int8_matches_c_binary_search():
    from mtp_jax.quant.primitives import best_index_int8

    vals = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)

    def c_ref(x):
        if x <= vals[0]:
            return 0
        if x >= vals[-1]:
            return 15
        ml, mu = 0, 15
        while mu - ml > 1:
            mav = (ml + mu) // 2
            ml, mu = (ml, mav) if x < vals[mav] else (mav, mu)
        return mu - 1 if np.float32(x - np.float32(vals[mu - 1])) < np.float32(np.float32(vals[mu]) - x) else mu

    x = np.concatenate([np.random.default_rng(0).uniform(-140, 130, 2000), vals - 0.5, vals, vals + 0.5])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(best_index_int8(vals, x), [c_ref(v) for v in x])


@pytest.mark.parametrize("fn", ["qkx3", "qx"])
def test_search_pieces_do_not_change_results(fn, monkeypatch):
    """Cutting the batch into pieces (last piece of one block) gives the same bytes as one piece."""
    from mtp_jax.quant import primitives

    x = _normal(np.random.default_rng(5), 32, 7 * 32).reshape(32, 7, 32).transpose(2, 0, 1).reshape(32, -1)
    x = np.ascontiguousarray(x)  # [32 elements, 224 blocks]
    w = np.random.default_rng(6).gamma(0.7, 2.0, x.shape).astype(np.float32)
    run = {
        "qkx3": lambda: primitives.make_qkx2_quants(x, w, 15, -0.9, 0.05, 36, False),  # make_qkx3's weights
        "qx": lambda: primitives.make_qx_quants(x, 32, 1, w),
    }[fn]
    whole = run()
    monkeypatch.setattr(primitives, "_PIECE", 32 * 3)  # 224 blocks = 74 pieces of 3 + one of 2
    cut = run()
    monkeypatch.setattr(primitives, "_PIECE", 32 * 223)  # 223 + a lone block
    cut1 = run()
    for a, b, c in zip(whole, cut, cut1):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))


def test_qx_sums_tries_without_clamp():
    """make_qx_search's sums skip the clamp for is <= -6 (|iscale*x| <= 31.4): they must equal C's clamped
    sums for all 19 tries, with +-max pairs (31.5 exactly at is = -5 for a power-of-two max) and midpoints."""
    from mtp_jax.quant import primitives
    from mtp_jax.quant.kquants import _subblocks

    F32 = np.float32
    for many_zeros in (False, True):
        x = _subblocks(_q6_k_edges(62, many_zeros).reshape(-1, 256), 16)  # [16, B]
        mx = primitives.signed_absmax(x)[0]
        mx = np.where(np.abs(mx) < primitives.GROUP_MAX_EPS, F32(1), mx)
        iscales = np.divide(-(F32(32) + F32(0.1) * primitives._QX_TRIES)[:, None], mx)  # [19, B]
        for w in (None, np.random.default_rng(1).gamma(0.7, 2.0, x.shape).astype(F32)):
            sumlx, suml2 = primitives._qx_sums(x, w, iscales, 32, 1)
            ww = x * x if w is None else w
            r = np.rint(x[None] * iscales[:, None])  # [19, 16, B]
            assert (r[primitives._QX_TRIES == -5] == 32).any()  # the clamp at is = -5 matters
            l = np.clip(r, F32(-32), F32(31))
            lx = np.zeros_like(iscales)
            l2 = np.zeros_like(iscales)
            for i in range(16):  # C's order: s += w*x*l, s += w*l*l
                lx = lx + (ww[i] * x[i]) * l[:, i]
                l2 = l2 + (ww[i] * l[:, i]) * l[:, i]
            np.testing.assert_array_equal(sumlx, lx)
            np.testing.assert_array_equal(suml2, l2)
