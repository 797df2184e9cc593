"""Bit-exactness of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4 vs libggml."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from mtp_jax.quant import registry

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0, T.MXFP4]
BLOCK32 = [t for t in TYPES if GGML_QUANT_SIZES[t][0] == 32]
N = 512
F32 = np.float32


def _bf16(x: np.ndarray) -> np.ndarray:
    b = x.astype(F32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(F32)


def _cases(n: int = N) -> dict[str, np.ndarray]:
    """name -> f32[rows, n]; n % 32 == 0 (and % 256 for the 256-value types)."""
    rng = np.random.default_rng(1234)

    def normal(r, scale=1.0):
        return (rng.standard_normal((r, n)) * scale).astype(F32)

    cases = {
        "normal": normal(16, np.exp(rng.uniform(-7, 5, (16, 1)))),
        "fp16": normal(8, np.exp(rng.uniform(-4, 4, (8, 1)))).astype(np.float16).astype(F32),
        "bf16": _bf16(normal(8, np.exp(rng.uniform(-4, 4, (8, 1))))),
        "positive": np.abs(normal(2)) + F32(0.25),
        "negative": -np.abs(normal(2)) - F32(0.25),
    }
    zero = normal(4)
    zero[0] = 0
    zero[1] = -0.0
    zero[2, 32:64] = 0  # zero sub-blocks inside non-zero superblocks
    zero[2, 288:320] = -0.0
    zero[3, :256] = 0
    zero[3, :32:2] = -0.0  # mixed-sign zero blocks: C keeps the first of equal minima / maxima
    zero[3, 33:64:2] = -0.0
    cases["zero"] = zero
    const = np.empty((3, n), F32)
    const[0], const[1] = 0.75, -3.0
    const[2] = np.repeat(rng.standard_normal(n // 32), 32)  # constant per 32-block
    cases["constant"] = const
    out = normal(4)
    out[0, ::97] *= 100
    out[1, 5::32] = 1e4  # one outlier per block
    out[2, 7::32] = -1e4
    out[3, ::256] = 60000.0
    cases["outliers"] = out
    tiny = normal(8)
    for i, s in enumerate([3e-14, 1e-15, 5e-16, 1e-16, 1e-30, 1e-38, 1e-40, 1e-44]):
        tiny[i] *= F32(s)
    tiny[0, :32] = F32(1e-15)  # right at GROUP_MAX_EPS
    tiny[1, :32] = np.nextafter(F32(1e-15), F32(0))
    cases["tiny"] = tiny
    # exact rounding ties: half-integer multiples of power-of-two steps, each block's |max| = nmax * step
    ties = []
    for nmax in (127, 8, 15, 16, 31, 1, 6):
        step = F32(2.0 ** rng.integers(-8, 4))
        k = rng.integers(-2 * nmax, 2 * nmax + 1, (2, n)).astype(F32) * F32(0.5)
        k[:, ::32] = -nmax
        k[1, 16::32] = nmax
        ties.append(np.clip(k, -nmax, nmax) * step)
    iq4_mid = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
    mids = (iq4_mid[:-1] + iq4_mid[1:]) / 2
    iq = rng.choice(np.concatenate([mids, iq4_mid]), (2, n)).astype(F32) * F32(2.0**-6)
    iq[:, ::32] = F32(-127 * 2.0**-6)
    ties.append(iq)
    cases["ties"] = np.concatenate(ties)
    # block maxima just below / at powers of two (MXFP4's floorf(log2f(amax)), the fp16 scale rounding)
    pow2 = normal(4) * F32(0.01)
    nblk = n // 32
    k = rng.integers(-30, 16, (4, nblk))  # fp16 scales stay finite
    j = rng.integers(0, 20, (4, nblk))
    peak = (np.ldexp(1.0, k) * (1 - j * 2.0**-24)).astype(F32)
    pow2[:, ::32] = np.where(rng.random((4, nblk)) < 0.5, peak, -peak)
    pow2 *= np.where(np.arange(n) % 32 == 0, F32(1), np.abs(peak).repeat(32, axis=1))
    cases["pow2"] = pow2
    return cases


def _imatrices(n: int = N) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(99)
    gamma = rng.gamma(0.5, size=n).astype(F32)
    zeros = gamma.copy()
    zeros[::5] = 0
    zeros[64:96] = 0  # a whole block with zero weight
    return {"none": None, "gamma": gamma, "zeros": zeros, "ones": np.ones(n, F32)}


def _assert_exact(ours: np.ndarray, ref: np.ndarray, qtype: T, what: str, labels: np.ndarray | None = None) -> None:
    ts = GGML_QUANT_SIZES[qtype][1]
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    bad = np.any(ours.reshape(-1, ts) != ref.reshape(-1, ts), axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        where = f" (case {labels[i]})" if labels is not None else ""
        pytest.fail(
            f"{qtype.name} {what}: {int(bad.sum())}/{bad.size} blocks differ; first block {i}{where}\n"
            f" ours {ours.reshape(-1, ts)[i].tobytes().hex()}\n ggml {ref.reshape(-1, ts)[i].tobytes().hex()}"
        )


@pytest.mark.peer
@pytest.mark.parametrize("imatrix_kind", ["none", "gamma", "zeros", "ones"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bit_exact(ggml, qtype, imatrix_kind):
    cases = _cases()
    rows = np.concatenate(list(cases.values()))
    bs = GGML_QUANT_SIZES[qtype][0]
    row_label = np.repeat(list(cases), [len(v) for v in cases.values()])
    labels = np.repeat(row_label, N // bs)
    imatrix = _imatrices()[imatrix_kind]
    ours = registry.quantize(rows, qtype, imatrix)
    _assert_exact(ours, ggml.ggml_quantize(rows, qtype, imatrix), qtype, f"imatrix={imatrix_kind}", labels)


@pytest.mark.peer
@pytest.mark.parametrize("qtype", BLOCK32, ids=lambda t: t.name)
def test_short_rows(ggml, qtype):
    """n_per_row not a multiple of 256 (the legacy imatrix sigma2 is over the whole row)."""
    rows = np.concatenate(list(_cases(96).values()))
    for imatrix in _imatrices(96).values():
        ours = registry.quantize(rows, qtype, imatrix)
        _assert_exact(ours, ggml.ggml_quantize(rows, qtype, imatrix), qtype, "n_per_row=96")


@pytest.mark.peer
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_expert_tensor(ggml, qtype):
    """[n_expert, rows, cols] with one imatrix slice per expert, as llama-quant passes them."""
    rng = np.random.default_rng(7)
    n_expert, nrows = 3, 4
    data = (rng.standard_normal((n_expert, nrows, N)) * rng.uniform(0.1, 3, (n_expert, 1, 1))).astype(F32)
    imatrix = rng.gamma(0.7, size=(n_expert, N)).astype(F32)
    imatrix[1, :100] = 0
    ours = np.stack([registry.quantize(data[e], qtype, imatrix[e]) for e in range(n_expert)])
    ref = np.stack([ggml.ggml_quantize(data[e], qtype, imatrix[e]) for e in range(n_expert)])
    _assert_exact(ours, ref, qtype, "experts")
    plain = registry.quantize(data, qtype)  # rank-3 input, no imatrix
    assert plain.shape == (n_expert, nrows, N // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
    _assert_exact(plain, ggml.ggml_quantize(data.reshape(-1, N), qtype).reshape(plain.shape), qtype, "rank 3")


@pytest.mark.peer
@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_iq4_search_pieces(ggml, qtype):
    """The IQ4 scale search runs on pieces of at most 2048 blocks: a lone block, an odd split into pieces
    (2049 blocks), pieces that cut superblocks (2056 blocks) and several pieces; and the whole pipeline on
    chunks of whole rows of at most 2^18 values (iq4._CHUNK_VALUES): 33 rows of 8192 are two chunks, a row of
    over 2^18 values one chunk per row."""
    rng = np.random.default_rng(11)
    shapes = [(1, 32), (2049, 32), (5, 32768)] if qtype == T.IQ4_NL else [(1, 256), (1, 256 * 257), (20, 8192)]
    shapes += [(33, 8192), (2, 256 * 1100)]
    for rows, cols in shapes:
        x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-3, 3, (rows, 1)))).astype(F32)
        for imatrix in (None, rng.gamma(0.5, size=cols).astype(F32)):
            ours = registry.quantize(x, qtype, imatrix)
            _assert_exact(ours, ggml.ggml_quantize(x, qtype, imatrix), qtype, f"{rows}x{cols}")


# relative RMS error of quantize -> dequantize on N(0, 1) rows (ternary types: on ternary data, exact)
ROUNDTRIP_TOL = {
    T.Q8_0: 0.01, T.Q5_0: 0.05, T.Q5_1: 0.05, T.Q4_0: 0.12, T.Q4_1: 0.12,
    T.IQ4_NL: 0.12, T.IQ4_XS: 0.12, T.MXFP4: 0.2, T.TQ1_0: 0.0, T.TQ2_0: 0.0,
}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_roundtrip(qtype):
    rng = np.random.default_rng(5)
    if qtype in (T.TQ1_0, T.TQ2_0):
        x = (rng.integers(-1, 2, (4, N)) * F32(0.5)).astype(F32)
    else:
        x = rng.standard_normal((4, N)).astype(F32)
    for imatrix in (None, rng.gamma(1.0, size=N).astype(F32)):
        y = registry.dequantize(registry.quantize(x, qtype, imatrix), qtype)
        assert y.shape == x.shape
        err = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
        assert err <= ROUNDTRIP_TOL[qtype], (qtype.name, imatrix is not None, err)


SIMPLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0, T.MXFP4]


@pytest.mark.peer
@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda t: t.name)
def test_simple_pieces(ggml, qtype):
    """The reference paths run on pieces of 64K values (2048 blocks of 32, 256 of 256), the imatrix paths on
    pieces of whole rows (64K values for Q4_0/Q5_0, 192K for Q4_1/Q5_1): several pieces with a partial
    last one (101 x 2048), a lone row and a lone block (the row sums pair a lone row with itself), and rows
    longer than a piece (one row per piece, split again by the searches)."""
    rng = np.random.default_rng(21)
    bs = GGML_QUANT_SIZES[qtype][0]
    for rows, cols in [(101, 2048), (1, 512), (1, bs), (3, 98304)]:
        x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-3, 3, (rows, 1)))).astype(F32)
        for imatrix in (None, rng.gamma(0.5, size=cols).astype(F32)):
            ours = registry.quantize(x, qtype, imatrix)
            _assert_exact(ours, ggml.ggml_quantize(x, qtype, imatrix), qtype, f"{rows}x{cols}")


@pytest.mark.peer
@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda t: t.name)
def test_simple_rounding_edges(ggml, qtype):
    """Values around the roundings of the reference paths, in blocks scaled so that x*id is exact: Q8_0's
    roundf at k + 1/2 and the largest float below 1/2 (which roundf takes to 0, x + 0.5f would not), the
    ternary lroundf at +-1/2, MXFP4's midpoints; uniformly random trits (every 5-trit byte of TQ1_0);
    and finite values beyond FLT_MAX/2, whose range overflows (Q4_1/Q5_1: d = inf)."""
    rng = np.random.default_rng(3)
    n = 512
    half = np.nextafter(F32(0.5), F32(0))
    frac = np.array([0.5, half, np.nextafter(F32(0.5), F32(1)), 0.0, 0.25, 0.75], F32)
    k = rng.integers(0, 127, (4, n)).astype(F32)
    edges = (k + rng.choice(frac, (4, n))) * rng.choice(np.array([-1, 1], F32), (4, n))
    edges = np.clip(edges, -127, 127)
    edges[:, ::32] = 127  # amax 127: Q8_0's d = 1
    trits = rng.choice(np.array([-1, -half, -0.5, 0, 0.5, half, 1], F32), (4, n))
    trits[:, ::256] = 1  # amax 1: the ternary id = 1
    uniform = rng.integers(-1, 2, (8, n)).astype(F32) * F32(0.75)
    mids = rng.choice(np.array([0, 0.5, 1, 1.5, 2.5, 3, 3.5, 5, 6, 7, 10, 12], F32), (4, n))
    mids *= rng.choice(np.array([-1, 1], F32), (4, n))
    mids[:, ::32] = 15.0  # floorf(log2f(15)) = 3: MXFP4's d = 2^(3 - 3) = 1
    huge = rng.standard_normal((2, n)).astype(F32) * F32(1e38)
    huge[:, ::32] = F32(3e38)
    huge[:, 1::32] = F32(-3e38)
    rows = np.concatenate([edges, trits, uniform, mids, huge])
    ours = registry.quantize(rows, qtype)
    _assert_exact(ours, ggml.ggml_quantize(rows, qtype), qtype, "rounding edges")
