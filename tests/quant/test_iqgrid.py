"""IQ grid types (mtp_jax/quant/iqgrid.py) against libggml's ggml_quantize_chunk: 0 mismatching blocks.

Every (type, imatrix mode) runs one matrix whose rows are the data cases below, so that the oracle's
per-type grid initialization (several seconds for IQ1_S/IQ2_S) is paid once.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from mtp_jax.quant import iqgrid
from mtp_jax.quant.base import QK_K, REGISTRY, QuantError
from mtp_jax.quant.registry import dequantize, quantize

T = GGMLQuantizationType
REQUIRED = [T.IQ2_XXS, T.IQ2_XS, T.IQ1_S]          # ggml_quantize_requires_imatrix
OPTIONAL = [T.IQ3_XXS, T.IQ3_S, T.IQ2_S, T.IQ1_M]
COLS = 2 * QK_K
ROWS_PER_CASE = 8


def _bf16(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def data_cases(rng: np.random.Generator, rows: int = ROWS_PER_CASE, cols: int = COLS) -> dict[str, np.ndarray]:
    """Named f32[rows, cols] inputs covering ties, zero/constant (sub-)blocks, outliers and eps edges."""

    def normal() -> np.ndarray:
        return rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-6, 4, (rows, 1)))

    def chunks(size: int, p: float) -> np.ndarray:
        """bool[rows, cols]: whole chunks of `size` values chosen with probability p."""
        pick = rng.random((rows, cols // size)) < p
        return np.repeat(pick, size, axis=1)

    cases = {"normal": normal(), "fp16": normal().astype(np.float16), "bf16": _bf16(normal())}
    x = normal()
    x[0] = 0
    x[1, :QK_K] = 0
    for size in (32, 16, 8, 4):
        x[2:] = np.where(chunks(size, 0.15)[2:], 0, x[2:])
    cases["zeros"] = x
    x = normal()
    const = np.repeat(rng.choice([-1.5, -0.25, 0.5, 3.0], (rows, cols // 16)), 16, axis=1)
    cases["const"] = np.where(chunks(32, 0.5), const, x)
    cases["const"][0] = 0.75
    x = normal()
    idx = rng.integers(0, cols, (rows, cols // 64))
    np.put_along_axis(x, idx, np.take_along_axis(x, idx, 1) * rng.choice([-300.0, 80.0], idx.shape), axis=1)
    cases["outliers"] = x
    x = rng.standard_normal((rows, cols))
    eps = np.repeat(rng.choice([1e-16, 1e-15, 6e-13, 1e-12, 4e-9, 1e-8, 6e-8, 1e-7, 3e-7, 1.0], (rows, cols // 16)),
                    16, axis=1)
    cases["tiny"] = x * eps
    cases["ties"] = rng.integers(-4, 5, (rows, cols)) * 0.25
    cases["negative"] = -np.abs(normal())
    return {k: np.asarray(v, dtype=np.float32) for k, v in cases.items()}


def imatrix_case(rng: np.random.Generator, kind: str, cols: int = COLS) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "ones":
        return np.ones(cols, dtype=np.float32)
    im = rng.gamma(0.5, 1.0, cols)
    if kind == "zeros":
        im[rng.random(cols) < 0.3] = 0
        im[32:64] = 0        # a whole IQ2_XXS/IQ3/IQ1_S sub-block
        im[QK_K:QK_K + 16] = 0
    return im.astype(np.float32)


def bad_blocks(a: np.ndarray, b: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    ts = REGISTRY[qtype].type_size()
    return np.flatnonzero((a.reshape(-1, ts) != b.reshape(-1, ts)).any(axis=1))


@pytest.mark.peer
def test_imatrix_requirement(ggml):
    """"required" exactly where ggml_quantize_requires_imatrix says so (llama-quantize's stricter rule is policy)."""
    for qtype in REQUIRED + OPTIONAL:
        assert ggml.ggml_requires_imatrix(qtype) == (qtype in REQUIRED)
        assert REGISTRY[qtype].imatrix == ("required" if qtype in REQUIRED else "optional")
    with pytest.raises(QuantError):
        quantize(np.ones((1, QK_K), np.float32), T.IQ2_XXS)


MODES = [(t, m) for t in REQUIRED for m in ("gamma", "zeros", "ones")] + [
    (t, m) for t in OPTIONAL for m in ("none", "gamma", "zeros", "ones")
]


@pytest.mark.peer
@pytest.mark.parametrize(("qtype", "mode"), MODES, ids=[f"{t.name}-{m}" for t, m in MODES])
def test_matches_ggml(ggml, qtype, mode):
    rng = np.random.default_rng([int(qtype), len(mode)])
    cases = data_cases(rng)
    im = imatrix_case(rng, mode)
    x = np.concatenate(list(cases.values()))
    ours = quantize(x, qtype, im)
    ref = ggml.ggml_quantize(x, qtype, im)
    blocks_per_case = ROWS_PER_CASE * COLS // QK_K
    report = {}
    for i, name in enumerate(cases):
        sl = slice(i * ROWS_PER_CASE, (i + 1) * ROWS_PER_CASE)
        n_bad = len(bad_blocks(ours[sl], ref[sl], qtype))
        if n_bad:
            report[name] = f"{n_bad}/{blocks_per_case}"
    assert not report, f"mismatching blocks per case: {report}"


@pytest.mark.peer
@pytest.mark.parametrize("qtype", REQUIRED + OPTIONAL, ids=lambda t: t.name)
def test_expert_tensor(ggml, qtype):
    """A 3-D [n_expert, rows, cols] tensor, each expert with its own imatrix slice (as llama-quant does)."""
    rng = np.random.default_rng(int(qtype))
    n_expert, rows = 3, 2
    x = (rng.standard_normal((n_expert, rows, COLS)) * rng.uniform(0.01, 1, (n_expert, 1, 1))).astype(np.float32)
    im = rng.gamma(0.5, 1.0, (n_expert, COLS)).astype(np.float32)
    for e in range(n_expert):
        assert len(bad_blocks(quantize(x[e], qtype, im[e]), ggml.ggml_quantize(x[e], qtype, im[e]), qtype)) == 0
    if qtype in OPTIONAL:
        ours = quantize(x, qtype)
        assert ours.shape == (n_expert, rows, COLS // QK_K * REGISTRY[qtype].type_size())
        assert len(bad_blocks(ours, ggml.ggml_quantize(x.reshape(-1, COLS), qtype), qtype)) == 0


@pytest.mark.peer
@pytest.mark.parametrize("qtype", REQUIRED + OPTIONAL, ids=lambda t: t.name)
def test_single_subblock(ggml, qtype):
    """One superblock with a single non-zero sub-block: the vectorized searches see a batch of one."""
    rng = np.random.default_rng(3)
    x = np.zeros((1, QK_K), np.float32)
    x[0, 64:80] = rng.standard_normal(16)
    im = rng.gamma(0.5, 1.0, QK_K).astype(np.float32)
    for imatrix in [im] + ([None] if qtype in OPTIONAL else []):
        assert len(bad_blocks(quantize(x, qtype, imatrix), ggml.ggml_quantize(x, qtype, imatrix), qtype)) == 0


@pytest.mark.peer
@pytest.mark.parametrize("qtype", REQUIRED + OPTIONAL, ids=lambda t: t.name)
def test_chunk_boundaries(ggml, qtype, monkeypatch):
    """Superblock chunks that end mid-row must still pair each superblock with its imatrix columns."""
    monkeypatch.setattr(iqgrid, "_CHUNK", 5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3 * QK_K)).astype(np.float32)
    im = rng.gamma(0.5, 1.0, 3 * QK_K).astype(np.float32)
    assert len(bad_blocks(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype)) == 0


# rough relative RMS error bound of dequantize(quantize(x)) for Gaussian data with a flat imatrix
RT_TOL = {T.IQ1_S: 0.6, T.IQ1_M: 0.55, T.IQ2_XXS: 0.45, T.IQ2_XS: 0.4, T.IQ2_S: 0.35, T.IQ3_XXS: 0.25, T.IQ3_S: 0.2}


@pytest.mark.parametrize("qtype", REQUIRED + OPTIONAL, ids=lambda t: t.name)
def test_roundtrip(qtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, COLS)).astype(np.float32)
    y = dequantize(quantize(x, qtype, np.ones(COLS, np.float32)), qtype)
    assert y.shape == x.shape
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < RT_TOL[qtype]
    assert not quantize(np.zeros((1, COLS), np.float32), qtype, np.ones(COLS, np.float32)).any()


def _neighbour_loop(grid, u, x, w, scale, qv):
    """iq2/iq3_find_best_neighbour, iq1_find_best_neighbour2 as the C loops, in float32 scalars."""
    out = []
    for m in range(len(u)):
        best, best_g = np.float32(np.finfo(np.float32).max), -1
        for g in grid.nb[grid.nb_start[u[m]]:grid.nb_start[u[m]] + grid.nb_count[u[m]]]:
            d2 = np.float32(0)
            for i in range(grid.n):
                diff = scale[m] * qv[grid.levels[g, i], m % qv.shape[1]] - x[i, m]
                d2 = d2 + (w[i, m] * diff) * diff
            if d2 < best:
                best, best_g = d2, g
        out.append(best_g)
    return np.array(out)


@pytest.mark.parametrize("name", ["iq2xxs", "iq2xs", "iq2s", "iq1s", "iq3xxs", "iq3s"])
def test_best_neighbours(name):
    """The table search against the C loop: rounded data (ties: the first neighbour wins), zero and (for
    IQ1's raw weights) negative weights, per-group level values."""
    grid = iqgrid._grid(name)
    rng = np.random.default_rng(len(name))
    nlev_keys = (np.arange(len(grid.kmap))[:, None] >> (grid.bits * np.arange(grid.n))) & ((1 << grid.bits) - 1)
    valid = np.flatnonzero((grid.kmap < 0) & (nlev_keys < grid.nlev).all(1))
    M = 300
    u = rng.choice(valid, M).astype(np.int32)
    x = (rng.integers(0, 2 * grid.nlev, (grid.n, M)) * 0.5).astype(np.float32)
    w = rng.choice(np.float32([0, 0.25, 1, 3]), (grid.n, M))
    w[:, :20] = 0                                                   # all distances 0: the first neighbour
    scale = rng.choice(np.float32([0.5, 1, 1.25]), M)
    qv = (2 * np.arange(grid.nlev) + 1).astype(np.float32)[:, None]
    if name == "iq1s":
        w[:, 20:60] *= -1
        qv = iqgrid._XX[rng.integers(0, 2, M)].T.copy()
    got = iqgrid._best_neighbours(grid, u, x, w, scale, qv)
    assert np.array_equal(got, _neighbour_loop(grid, u, x, w, scale, qv))
