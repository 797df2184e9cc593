"""Edge cases of the grid types' vectorized search paths (mtp_jax/quant/iqgrid.py) against libggml, byte
for byte, and their building blocks against plain C-order loops.

The fast paths (neighbour search in key tiles, the pruned IQ1 split search, make_qp_quants' refinement on
the changed blocks only, all tries of a piece at once) each have exact-tie, zero, sign and batching corner
cases; every (type, imatrix mode) runs one matrix whose rows are all the data cases, so the oracle's
per-type grid initialization is paid once.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from mtp_jax.quant import iqgrid, primitives
from mtp_jax.quant.base import QK_K, REGISTRY
from mtp_jax.quant.registry import quantize

T = GGMLQuantizationType
TYPES = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S]
REQUIRED = {T.IQ1_S, T.IQ2_XXS, T.IQ2_XS}
COLS = 2 * QK_K
ROWS = 4
F = np.float32


def edge_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Named f32[ROWS, COLS] inputs: exact ties, values on the levels and on rounding boundaries, zeros at
    every granularity, one sign, tiny and denormal magnitudes."""

    def normal(rows: int = ROWS) -> np.ndarray:
        return rng.standard_normal((rows, COLS)) * np.exp(rng.uniform(-3, 3, (rows, 1)))

    def sign() -> np.ndarray:
        return rng.choice([-1.0, 1.0], (ROWS, COLS))

    cases = {
        "ties": rng.integers(-3, 4, (ROWS, COLS)) * 0.25,                       # few distinct values
        "two_values": np.where(rng.random((ROWS, COLS)) < 0.5, 0.75, -1.5),
        "const_blocks": np.repeat(rng.choice([-2.0, -0.5, 0.5, 1.0, 3.0], (ROWS, COLS // 8)), 8, axis=1),
        "odd_levels": sign() * (2 * rng.integers(0, 3, (ROWS, COLS)) + 1) * 0.5,  # the IQ2 levels
        "odd_levels8": sign() * (2 * rng.integers(0, 8, (ROWS, COLS)) + 1),      # the IQ3 levels
        "boundaries": sign() * 2 * rng.integers(0, 8, (ROWS, COLS)),             # halfway between levels
        "one_nonzero": np.zeros((ROWS, COLS)),
        "negative": -np.abs(normal()),
        "mixed": normal() * np.repeat(sign()[:, ::16], 16, axis=1),
        "tiny": normal() * np.repeat(rng.choice([1e-30, 1e-36, 1e-40, 1e-44], (ROWS, COLS // 16)), 16, axis=1),
        "near_eps": rng.standard_normal((ROWS, COLS))
        * np.repeat(rng.choice([1e-16, 1e-15, 1e-12, 1e-9, 1e-8, 1e-7, 2e-7], (ROWS, COLS // 16)), 16, axis=1),
    }
    cases["one_nonzero"][:, ::16] = rng.standard_normal((ROWS, COLS // 16))
    x = normal()
    x[0] = 0                                                                      # a zero row
    x[1, :QK_K] = 0                                                               # a zero superblock
    for size, row in ((32, 2), (16, 3), (8, 3)):                                  # zero sub-blocks, groups
        pick = np.repeat(rng.random(COLS // size) < 0.3, size)
        x[row, pick] = 0
    cases["zeros"] = x
    return {k: np.asarray(v, dtype=F) for k, v in cases.items()}


def imatrix(rng: np.random.Generator, mode: str, cols: int = COLS) -> np.ndarray | None:
    if mode == "none":
        return None
    im = rng.gamma(0.5, 1.0, cols)
    if mode == "zeros":
        im[rng.random(cols) < 0.3] = 0
        im[32:64] = 0                                                             # whole sub-blocks
        im[QK_K + 16:QK_K + 32] = 0
    if mode == "negative":                                                        # IQ1 only: C aborts for the rest
        im[rng.random(cols) < 0.3] *= -1
    return im.astype(F)


def bad_blocks(a: np.ndarray, b: np.ndarray, qtype: GGMLQuantizationType) -> int:
    ts = REGISTRY[qtype].type_size()
    return int((a.reshape(-1, ts) != b.reshape(-1, ts)).any(axis=1).sum())


MODES = [(t, m) for t in TYPES for m in ("gamma", "zeros") + (("none",) if t not in REQUIRED else ())]
MODES += [(T.IQ1_S, "negative"), (T.IQ1_M, "negative")]


@pytest.mark.peer
@pytest.mark.parametrize(("qtype", "mode"), MODES, ids=[f"{t.name}-{m}" for t, m in MODES])
def test_edges_match_ggml(ggml, qtype, mode):
    rng = np.random.default_rng([int(qtype), len(mode)])
    cases = edge_cases(rng)
    im = imatrix(rng, mode)
    x = np.concatenate(list(cases.values()))
    ours, ref = quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im)
    report = {}
    for i, name in enumerate(cases):
        sl = slice(i * ROWS, (i + 1) * ROWS)
        if n_bad := bad_blocks(ours[sl], ref[sl], qtype):
            report[name] = n_bad
    assert not report, f"mismatching blocks per case: {report}"


@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in (T.IQ1_S, T.IQ1_M)], ids=lambda t: t.name)
def test_negative_imatrix_raises(qtype):
    """Negative importances give NaN weights (sqrt) and groups without a neighbour below FLT_MAX: C aborts
    (GGML_ASSERT, checked by hand for this input), we raise."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, COLS)).astype(F)
    im = imatrix(rng, "negative")
    with pytest.raises(RuntimeError), np.errstate(invalid="ignore"):
        quantize(x, qtype, im)


@pytest.mark.peer
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_piece_boundaries(ggml, qtype, monkeypatch):
    """Row counts that no piece size divides (1, 7, 33 rows), with tiny pieces, counting-sort batches, tile
    steps and split-search steps, so that every loop of the fast paths ends mid-row and mid-key."""
    rng = np.random.default_rng(int(qtype) + 100)
    im = rng.gamma(0.5, 1.0, COLS).astype(F)
    x = (rng.standard_normal((33, COLS)) * np.exp(rng.uniform(-2, 2, (33, 1)))).astype(F)
    x[5, 40:90] = 0.5                                                             # ties inside a piece
    refs = {r: ggml.ggml_quantize(x[:r], qtype, im) for r in (1, 7, 33)}
    monkeypatch.setattr(iqgrid, "_CHUNK", 3)
    monkeypatch.setattr(iqgrid, "_SORT_BATCH", 37)
    monkeypatch.setattr(iqgrid, "_TILE_CANDS", 200)
    monkeypatch.setattr(iqgrid, "_SPLIT_COLS", 5)
    for r, ref in refs.items():
        assert bad_blocks(quantize(x[:r], qtype, im), ref, qtype) == 0, f"{r} rows"


@pytest.mark.peer
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_default_pieces(ggml, qtype):
    """33 rows of 4096: 528 superblocks, more than one default piece for most types, the last one partial."""
    rng = np.random.default_rng(int(qtype) + 200)
    cols = 16 * QK_K
    x = (rng.standard_normal((33, cols)) * np.exp(0.5 * rng.standard_normal((33, 1)))).astype(F)
    im = rng.gamma(0.7, 2.0, cols).astype(F)
    assert bad_blocks(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype) == 0


@pytest.mark.peer
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_column_steps(ggml, qtype):
    """A default piece larger than the IQ1 split search's column step (_SPLIT_COLS sub-blocks, every pass,
    retries gathered over the steps) and than a batch of the neighbour search's counting sort (_SORT_BATCH
    keys, found from the mask batch by batch), with ties and zero sub-blocks on both sides of the steps."""
    rng = np.random.default_rng(int(qtype) + 300)
    rows, cols = 48, 16 * QK_K
    cls = REGISTRY[qtype]
    values = min(rows * cols, iqgrid._CHUNK * cls.chunks * QK_K)                  # in the first piece
    if issubclass(cls, iqgrid._OneBitType):
        assert values // cls.sub > iqgrid._SPLIT_COLS * cls.split_mul
    else:  # keys of groups of at most 8 values, for every try
        assert (2 * cls.nsteps + 1) * values // 8 > iqgrid._SORT_BATCH
    x = (rng.standard_normal((rows, cols)) * np.exp(0.5 * rng.standard_normal((rows, 1)))).astype(F)
    x[7, 1000:1400] = 0.5                                                         # ties
    x[30, 2048:2304] = 0                                                          # a zero superblock
    x[31, 100:116] = 0                                                            # a zero sub-block
    im = rng.gamma(0.7, 2.0, cols).astype(F)
    assert bad_blocks(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype) == 0


# ------------------------------------------------------------------------------------- building blocks

def _c_neighbour(grid, u, x, w, scale, qv):
    """iq2/iq3_find_best_neighbour, iq1_find_best_neighbour2 for one group, in float32 scalars (C order)."""
    best, best_g = F(np.finfo(F).max), -1
    for g in grid.nb[grid.nb_start[u]:grid.nb_start[u] + grid.nb_count[u]]:
        d2 = F(0)
        for i in range(grid.n):
            diff = F(scale * qv[grid.levels[g, i]]) - x[i]
            d2 = F(d2 + F(F(w[i] * diff) * diff))
        if d2 < best:
            best, best_g = d2, g
    return best_g


def _neighbours(name, u, gid, s, xg, wg, qv, qsel=None):
    """iqgrid._neighbour_batches over M groups in batches of _SORT_BATCH -> grid index i32[M] (u: the groups'
    off-grid keys; the other arguments as _neighbour_batches takes them, for all M groups)."""
    t = iqgrid._tiles(name)
    rank = np.take(t.rank, u)
    cnt = np.bincount(rank, minlength=t.nkeys)
    B = iqgrid._SORT_BATCH
    batches = ((rank[b:b + B], gid[b:b + B], s[b:b + B], None if qsel is None else qsel[b:b + B])
               for b in range(0, len(u), B))
    res = iqgrid._neighbour_batches(name, cnt, batches, xg, wg, qv, qsel is not None)
    return np.concatenate([np.empty(0, np.int16)] + res).astype(np.int32)


@pytest.mark.parametrize("name", list(iqgrid._GRID_SPECS))
@pytest.mark.parametrize("per_key", [1, 6, 40])
def test_neighbours_match_c_loop(name, per_key, monkeypatch):
    """The tiled search against C's loop: exact ties (rounded values, zero weights: the first neighbour wins),
    negative weights (IQ1's raw weights), both IQ1 level tables; 1, 6 and 40 groups per key give tile widths
    4, 4/8 and 16; small steps make the tile loops end mid-class."""
    monkeypatch.setattr(iqgrid, "_TILE_CANDS", 300)
    grid = iqgrid._grid(name)
    rng = np.random.default_rng([len(name), per_key])
    digits = (np.arange(len(grid.kmap))[:, None] >> (grid.bits * np.arange(grid.n))) & ((1 << grid.bits) - 1)
    valid = np.flatnonzero((grid.kmap < 0) & (digits < grid.nlev).all(1))
    u = np.repeat(rng.choice(valid, 60, replace=False), per_key).astype(np.int32)
    M = len(u)
    x = (rng.integers(0, 2 * grid.nlev, (grid.n, M)) * 0.5).astype(F)
    w = rng.choice(F([0, 0.25, 1, 3]), (grid.n, M)).astype(F)
    w[:, :M // 8] = 0                                                             # every distance 0
    s = rng.choice(F([0.5, 1, 1.25]), M)
    if name == "iq1s":
        w[:, M // 8:M // 3] *= -1
        qv, qsel = iqgrid._XX, rng.integers(0, 2, M)
    else:
        qv, qsel = (2 * np.arange(grid.nlev) + 1).astype(F)[None], None
    gid = rng.permutation(M)                                                      # groups in any order
    xg, wg = np.empty_like(x), np.empty_like(w)                                   # columns: groups
    xg[:, gid], wg[:, gid] = x, w
    got = _neighbours(name, u, gid, s, xg, wg, qv, None if qsel is None else qsel)
    want = [_c_neighbour(grid, u[m], x[:, m], w[:, m], s[m], qv[0 if qsel is None else qsel[m]]) for m in range(M)]
    assert np.array_equal(got, want)


def test_neighbours_nan_weights_raise():
    """NaN weights (C: no neighbour below FLT_MAX, GGML_ASSERT) raise; others in the batch are unaffected."""
    grid = iqgrid._grid("iq3xxs")
    valid = np.flatnonzero(grid.kmap < 0)
    u = valid[:3].astype(np.int32)
    x = np.ones((4, 3), F)
    w = np.ones((4, 3), F)
    w[2, 1] = np.nan
    with pytest.raises(RuntimeError):
        _neighbours("iq3xxs", u, np.arange(3), np.ones(3, F), x, w, F([[1, 3, 5, 7, 9, 11, 13, 15]]))


def _c_scan(qx, q2, scale0):
    """C's selection loop, one sub-block at a time: (scale, index of the last candidate taken or -1)."""
    S = qx.shape[1]
    scale, arg = scale0.copy(), np.full(S, -1, np.int32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for s in range(S):
            best = -np.finfo(F).max
            for c in range(qx.shape[0]):
                a, b = qx[c, s], q2[c, s]
                if b > 0 and F(a * a) > F(best * b):
                    scale[s] = F(a / b)
                    best = F(scale[s] * a)
                    arg[s] = c
    return scale, arg


@pytest.mark.parametrize("kind", ["random", "near_ties", "gap", "exact_ties", "flat"])
def test_scan_matches_c_loop(kind):
    """The pruned split-search selection against C's loop: scores one ulp apart around the best (the gap
    and takes limits, the lower thresholds, the full replay), exact ties, non-positive sumq2, negative
    weights (the exact flag), all-equal scores."""
    rng = np.random.default_rng(len(kind))
    C, S = 120, 40
    qx = rng.standard_normal((C, S)).astype(F)
    q2 = rng.gamma(2.0, 1.0, (C, S)).astype(F)
    if kind == "near_ties":  # copies of the best candidate nudged by an ulp or two, in both directions
        best = np.argmax(qx * qx / q2, axis=0)
        for j in range(12):
            c = rng.integers(0, C, S)
            qx[c, np.arange(S)] = qx[best, np.arange(S)]
            q2[c, np.arange(S)] = q2[best, np.arange(S)]
            qx[c, np.arange(S)] = np.nextafter(qx[c, np.arange(S)], rng.choice([-np.inf, np.inf], S).astype(F))
    if kind == "gap":  # a candidate scoring just below the replay threshold: the lower thresholds' path
        score = qx.astype(np.float64) ** 2 / q2
        target = score.max(axis=0) * float(iqgrid._NEAR) * (1 - 2.0**-21)
        c = rng.integers(0, C, S)
        q2[c, np.arange(S)] = 1
        qx[c, np.arange(S)] = np.sqrt(target)
    if kind == "exact_ties":
        qx = np.round(qx * 2) / 2
        q2 = np.round(q2 * 2) / 2
    if kind == "flat":
        qx[:] = 1
        q2[:] = 2
    q2[rng.random((C, S)) < 0.05] = 0
    q2[rng.random((C, S)) < 0.05] *= -1
    qx, q2 = qx.astype(F), q2.astype(F)
    scale0 = rng.random(S).astype(F)
    exact = rng.random(S) < (0 if kind == "gap" else 0.2)

    def blocks_of(cols):
        cols = slice(None) if cols is None else cols
        for c0 in range(0, C, 17):  # uneven blocks
            yield qx[c0:c0 + 17, cols], q2[c0:c0 + 17, cols]

    scale, arg = iqgrid._scan(blocks_of, S, scale0, exact)
    want_scale, want_arg = _c_scan(qx, q2, scale0)
    assert np.array_equal(arg, want_arg)
    assert np.array_equal(scale.view(np.int32), want_scale.view(np.int32))


def _c_make_qp(x, nmax, w):
    """make_qp_quants for one block, float32 scalars in C order (uint8 L)."""
    def nearest_int(v):
        v = np.asarray(v, F) + F(12582912.0)
        return int((v.view(np.int32) & 0x7FFFFF) - 0x400000)

    n = len(x)
    mx = F(0)
    for v in x:
        mx = mx if mx > v else v
    if mx < primitives.GROUP_MAX_EPS:
        return F(0), np.zeros(n, np.uint8)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        iscale = F(F(nmax) / mx)
        L = np.array([nearest_int(iscale * v) & 0xFF for v in x])
        scale = F(F(1) / iscale)
        best = F(0)
        for i in range(n):
            diff = F(x[i] - F(scale * F(L[i])))
            best = F(best + F(F(w[i] * diff) * diff))
        for is_ in range(-4, 5):
            if is_ == 0:
                continue
            isc = F(F(F(0.1) * F(is_) + F(nmax)) / mx)
            sc = F(F(1) / isc)
            mse = F(0)
            for i in range(n):
                l = min(nmax, nearest_int(isc * x[i]))
                diff = F(x[i] - F(sc * F(l)))
                mse = F(mse + F(F(w[i] * diff) * diff))
            if mse < best:
                best, iscale = mse, isc
        sumlx = suml2 = F(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale * x[i]))
            L[i] = l & 0xFF
            sumlx = F(sumlx + F(F(w[i] * x[i]) * F(l)))
            suml2 = F(suml2 + F(F(w[i] * F(l)) * F(l)))
        for _ in range(5):
            changed = 0
            for i in range(n):
                slx = F(sumlx - F(F(w[i] * x[i]) * F(L[i])))
                sl2 = F(suml2 - F(F(w[i] * F(L[i])) * F(L[i])))
                if slx > 0 and sl2 > 0:
                    nl = min(nmax, nearest_int(F(F(x[i] * sl2) / slx)))
                    if nl != L[i]:
                        slx = F(slx + F(F(w[i] * x[i]) * F(nl)))
                        sl2 = F(sl2 + F(F(w[i] * F(nl)) * F(nl)))
                        if F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                            L[i], sumlx, suml2 = nl & 0xFF, slx, sl2
                            changed += 1
            if not changed:
                break
        return (F(sumlx / suml2) if suml2 > 0 else F(0)), L.astype(np.uint8)


def test_make_qp_quants_matches_c_loop():
    """The refinement on changed blocks only, against C's loop: negative values (the uint8 wrap), ties,
    zero and eps blocks, zero weights."""
    rng = np.random.default_rng(5)
    n, B = 32, 96
    x = np.abs(rng.standard_normal((n, B))).astype(F)
    x[:, :10] = np.round(x[:, :10] * 4) / 4                                       # ties
    x[3, 10:30] *= -1                                                             # IQ2_XXS's parity flips
    x[:, 30] = 0
    x[:, 31] = 1e-16
    x[:, 32:40] = x[:, 32:40] * 1e-30
    w = rng.gamma(0.5, 1.0, (n, B)).astype(F)
    w[:, 40:44] = 0
    w[rng.random((n, B)) < 0.1] = 0
    for nmax in (4, 15):
        scale, L = primitives.make_qp_quants(x, nmax, w)
        for b in range(B):
            sc, Lb = _c_make_qp(x[:, b], nmax, w[:, b])
            assert scale[b].view(np.int32) == sc.view(np.int32), (nmax, b)
            assert np.array_equal(L[:, b], Lb), (nmax, b)


@pytest.mark.peer
@pytest.mark.parametrize("qtype", [T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
def test_mostly_zero_matrix(ggml, qtype):
    """An identity-like matrix (a constructed head's eh_proj: one nonzero per row): its all-zero sub-blocks, which
    C skips, stay out of the split search, whose ties there would replay every candidate."""
    rng = np.random.default_rng(5)
    x = np.zeros((64, 2048), np.float32)
    x[np.arange(64), rng.choice(2048, 64, replace=False)] = rng.standard_normal(64).astype(np.float32)
    im = rng.random(2048).astype(np.float32)
    assert bad_blocks(quantize(x, qtype, im), ggml.ggml_quantize(x, qtype, im), qtype) == 0
