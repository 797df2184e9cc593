"""Grid ("i-quant") types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, bit-exact with ggml.

Mirrors ``quantize_row_{iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s,iq1_s,iq1_m}_impl`` in ggml-quants.c (the
llama.cpp tree vendored in llama-cpp-python 0.3.36, whose IQ1_M search is the fast prefix-sum one).
Arrays are vectorized across sub-blocks (leading axis); Python loops run only over search steps and
the elements of a sequential float32 reduction, in C operation order (no FMA, no pairwise sums).
Level indices of the grids are derived from gguf-py's grid tables (they equal the C ``kgrid_*``).
See shared/notes/gguf-quantization-spec.md sections 3.7-3.11 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.primitives import (
    GROUP_MAX_EPS,
    GROUP_MAX_EPS_IQ1_M,
    GROUP_MAX_EPS_IQ1_S,
    GROUP_MAX_EPS_IQ2_S,
    GROUP_MAX_EPS_IQ3_XXS,
    element_major,
    fp16_bytes,
    make_qp_quants,
    nearest_int,
    seqsum,
)

F = np.float32
_CHUNK = 1024  # superblocks per vectorized pass (bounds the memory of the search temporaries)


# ---------------------------------------------------------------------------------------------- helpers

def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """f32[..., n] -> f32[...]: C's ``s = 0; for (i) s += terms[i];`` over the last axis."""
    return seqsum(element_major(terms))


def _sumqx_sumq2(w: np.ndarray, x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32[S, B] x3 -> (sum w*x*q, sum w*q*q), sequential over B as the C sub-block loops."""
    return _seq_sum(w * x * q), _seq_sum(w * q * q)


def _make_qp_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """make_qp_quants(n, nmax, x, L, w) scale: f32[S, n] x2 -> f32[S] (IQ2_XXS ignores its L)."""
    return make_qp_quants(element_major(x), nmax, element_major(w))[0]


def _superblock_weights(xs: np.ndarray, qw: np.ndarray | None, sigma_mul: int, mode: str) -> np.ndarray:
    """Per-value weights of a superblock: xs f32[T, 256], qw f32[T, 256] | None -> f32[T, 256].

    With qw: qw*sqrt(sigma2 + x^2), sigma2 = sigma_mul*sum(x^2)/256 (sequential sum). Without: x^2
    (mode "x2") or 0.25*sigma2 + x^2 (mode "iq2s").
    """
    sumx2 = _seq_sum(xs * xs)
    sigma2 = (F(sigma_mul) * sumx2 / F(QK_K))[:, None]                # 1*s is exact: same as C's sumx2/QK_K
    if qw is not None:
        return qw * np.sqrt(sigma2 + xs * xs)
    if mode == "iq2s":
        return F(0.25) * sigma2 + xs * xs
    return xs * xs


def _parity_signs(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ2_XXS/IQ2_XS/IQ3_XXS sign trick: x, w f32[S, B] -> xval f32[S, B], signs u8[S, B/8] (7 bits).

    Each group of 8 keeps an even number of negatives: on odd parity the element with the smallest
    w*x*x keeps its sign (its xval becomes negative) and its bit is toggled.
    """
    S, B = x.shape
    xg, wg = x.reshape(S, B // 8, 8), w.reshape(S, B // 8, 8)
    neg = ~(xg >= 0)
    xval = np.where(neg, -xg, xg)
    bits = (1 << np.arange(8)).astype(np.int64)
    s = (neg * bits).sum(-1)
    odd = (neg.sum(-1) % 2) == 1
    imin = np.argmin(wg * xg * xg, axis=-1)
    flip = odd[..., None] & (np.arange(8) == imin[..., None])
    xval = np.where(flip, -xval, xval)
    s = np.where(odd, s ^ (1 << imin), s)
    return xval.reshape(S, B), (s & 127).astype(np.uint8)


def _plain_signs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ2_S/IQ3_S explicit signs: x f32[S, B] -> |x| (keeping -0.0 as C does) f32[S, B], signs u8[S, B/8]."""
    S, B = x.shape
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    s = (neg.reshape(S, B // 8, 8) * (1 << np.arange(8))).sum(-1)
    return xval, s.astype(np.uint8)


def _superblock_scales(scales: np.ndarray, nlev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scales f32[T, nsub] -> (max_scale f32[T], d = max_scale/(2*nlev+1) f32[T], l i64[T, nsub]).

    l = clamp(nearest_int(0.5*(s/d - 1)), 0, nlev) as the C superblock loops (valid where max_scale > 0).
    """
    max_scale = np.maximum(np.max(scales, axis=1), F(0))
    d = max_scale / F(2 * nlev + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        idv = F(1) / d
        l = np.clip(nearest_int(F(0.5) * (idv[:, None] * scales - F(1))), 0, nlev)
    return max_scale, d, l


# ------------------------------------------------------------------------------- grids and neighbours

@dataclass(frozen=True)
class _Grid:
    """A quantizer-side grid (iq2xs_init_impl / iq3xs_init_impl).

    levels: i64[G, n] level index l per coordinate; odd: f32[G, n] = 2l+1; kmap: i64[K] grid index of
    an on-grid key u = sum l_k << bits*k, or -1; for an off-grid key, its neighbours (C order: by
    (distance, grid index), all points within the nwant smallest distinct distances) are
    nb[nb_start[u] : nb_start[u] + nb_count[u]].
    """

    n: int
    bits: int
    nlev: int
    levels: np.ndarray
    odd: np.ndarray
    levels_t: np.ndarray  # levels.T, contiguous [n, G]
    odd_t: np.ndarray     # odd.T, contiguous [n, G]
    kmap: np.ndarray
    nb_start: np.ndarray
    nb_count: np.ndarray
    nb: np.ndarray


_GRID_SPECS = {  # grid name -> (gguf-py class holding grid_hex, bits per level, nlev, kmap size, nwant)
    "iq2xxs": (gguf_quants.IQ2_XXS, 2, 3, 43692, 2),
    "iq2xs": (gguf_quants.IQ2_XS, 2, 3, 43692, 2),
    "iq2s": (gguf_quants.IQ2_S, 2, 3, 43692, 1),
    "iq1s": (gguf_quants.IQ1_S, 2, 3, 43692, 3),
    "iq3xxs": (gguf_quants.IQ3_XXS, 3, 8, 4096, 2),
    "iq3s": (gguf_quants.IQ3_S, 3, 8, 4096, 3),
}


@lru_cache(maxsize=None)
def _grid(name: str) -> _Grid:
    """Build (once) the grid, kmap and neighbour lists as iq2xs_init_impl / iq3xs_init_impl do."""
    cls, bits, nlev, kmap_size, nwant = _GRID_SPECS[name]
    cls.init_grid()
    values = cls.grid.reshape(cls.grid_shape)
    levels = np.searchsorted(np.array(cls.grid_map, dtype=F), values).astype(np.int64)   # [G, n]
    G, n = levels.shape
    shifts = bits * np.arange(n)
    keys = (levels << shifts).sum(1)
    kmap = np.full(kmap_size, -1, dtype=np.int64)
    kmap[keys] = np.arange(G)
    odd = (2 * levels + 1).astype(F)

    off = np.flatnonzero(kmap < 0)
    pos = (2 * ((off[:, None] >> shifts) & ((1 << bits) - 1)) + 1).astype(F)            # [U, n]
    g2 = (odd * odd).sum(1)
    starts, counts, nbs = np.zeros(kmap_size, np.int64), np.zeros(kmap_size, np.int64), []
    big = np.int32(1 << 30)
    total = 0
    for c0 in range(0, len(off), 4096):
        p = pos[c0:c0 + 4096]
        d2 = np.rint((p * p).sum(1)[:, None] + g2[None, :] - 2 * (p @ odd.T)).astype(np.int32)  # exact ints
        thr = d2.min(1)
        for _ in range(nwant - 1):
            nxt = np.where(d2 > thr[:, None], d2, big).min(1)
            thr = np.where(nxt == big, big, nxt)
        rows, cols = np.nonzero(d2 <= thr[:, None])
        order = np.lexsort((cols, d2[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        cnt = np.bincount(rows, minlength=len(p))
        u = off[c0:c0 + 4096]
        counts[u] = cnt
        starts[u] = total + np.cumsum(cnt) - cnt
        total += len(cols)
        nbs.append(cols)
    return _Grid(n, bits, nlev, levels, odd, np.ascontiguousarray(levels.T), np.ascontiguousarray(odd.T),
                 kmap, starts, counts, np.concatenate(nbs).astype(np.int32))


def _best_neighbour(grid: _Grid, u: np.ndarray, xv: np.ndarray, w: np.ndarray, scale: np.ndarray,
                    qval: np.ndarray | None = None) -> np.ndarray:
    """iq2/iq3_find_best_neighbour (qval None: q = 2l+1) and iq1_find_best_neighbour2 (q = qval[l]).

    u i64[M] off-grid keys, xv/w f32[M, n], scale f32[M], qval f32[M, 3] | None -> grid index i64[M]:
    the first neighbour minimizing sum w*(scale*q - x)^2 (strict <, sequential over the n elements).
    """
    M = len(u)
    cnt = grid.nb_count[u]
    first = np.cumsum(cnt) - cnt
    seg = np.repeat(np.arange(M, dtype=np.int32), cnt)                 # candidate -> group
    flat = np.arange(len(seg), dtype=np.int32)
    cand = grid.nb[grid.nb_start[u][seg] + flat - first[seg]]          # [T] candidate grid indices
    # element-major [n, T] gathers keep the per-element loop on contiguous rows
    if qval is None:
        q = grid.odd_t[:, cand]
    else:
        q = np.ascontiguousarray(qval.T).reshape(-1)[grid.levels_t[:, cand] * M + seg]   # qval[seg, level]
    sc = scale[seg]
    xs = np.ascontiguousarray(xv.T)[:, seg]
    ws = np.ascontiguousarray(w.T)[:, seg]
    d2 = np.zeros(len(seg), dtype=F)
    for i in range(grid.n):
        diff = sc * q[i] - xs[i]
        d2 = d2 + ws[i] * diff * diff
    segmin = np.minimum.reduceat(d2, first)
    best = np.minimum.reduceat(np.where(d2 == segmin[seg], flat, np.int32(len(seg))), first)
    return cand[best]


def _keys(grid: _Grid, levels: np.ndarray) -> np.ndarray:
    """levels i64[..., n] -> kmap keys i64[...]."""
    return (levels << (grid.bits * np.arange(grid.n))).sum(-1)


def _snap(grid: _Grid, xval: np.ndarray, waux: np.ndarray, idv: np.ndarray, scale: np.ndarray,
          need: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round to levels l = clamp(nearest_int(0.5*(id*x - 1)), 0, nlev-1) and move each off-grid group to
    its best neighbour at ``scale`` (the body of the IQ2/IQ3 search loops and of their re-snap).

    xval, waux f32[S, B]; idv, scale f32[S]; need bool[S, B/n] | None (groups to search) ->
    levels i64[S, B] (only meaningful for needed groups), on_grid bool[S, B/n].
    """
    S, B = xval.shape
    n = grid.n
    l = np.clip(nearest_int(F(0.5) * (idv[:, None] * xval - F(1))), 0, grid.nlev - 1).reshape(S, B // n, n)
    u = _keys(grid, l)
    gi = grid.kmap[u]
    on_grid = gi >= 0
    todo = ~on_grid if need is None else ~on_grid & need
    if todo.any():
        si, gk = np.nonzero(todo)
        xg, wg = xval.reshape(S, B // n, n), waux.reshape(S, B // n, n)
        gi[si, gk] = _best_neighbour(grid, u[si, gk], xg[si, gk], wg[si, gk], scale[si])
        l[si, gk] = grid.levels[gi[si, gk]]
    return l.reshape(S, B), on_grid


# ------------------------------------------------------------------------- IQ2_XXS/XS/S, IQ3_XXS/S core

@dataclass(frozen=True)
class _Search:
    grid: str
    eps: np.float32 | None  # max < eps -> zero sub-block; None: `if (!max)` (IQ3_S)
    nsteps: int           # is = -nsteps..nsteps
    step: float
    resnap: str           # "all" (IQ2_XXS), "offgrid" (only off-grid groups), "all_if_offgrid" (IQ3_S)
    on_grid0: bool        # is_on_grid before the search (false only in IQ3_S)
    qp_start: bool        # IQ2_XXS: start from make_qp_quants instead of max/(2*kMaxQ-1)


def _search_subblocks(sp: _Search, xval: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sub-block scale/grid search shared by the IQ2/IQ3 impls.

    xval, w f32[S, B] -> scale f32[S] (may be negative: the caller flips signs), levels i64[S, B],
    written bool[S]. Sub-blocks that C skips (`continue`, nothing written) get scale 0 and levels 0.
    """
    grid = _grid(sp.grid)
    S, B = xval.shape
    kmaxq = grid.nlev
    L = np.zeros((S, B), dtype=np.int64)
    scale_out = np.zeros(S, dtype=F)
    mx = np.max(xval, axis=1)
    act = (mx != 0) if sp.eps is None else ~(mx < sp.eps)
    if sp.qp_start:
        sc = np.zeros(S, dtype=F)
        sc[act] = _make_qp_scale(xval[act], w[act], kmaxq + 1)
        denom = sc * F(kmaxq)                                          # eff_max
        act &= denom > 0
    else:
        denom = mx
        sc = mx / F(2 * kmaxq - 1)
    idx = np.flatnonzero(act)
    if not len(idx):
        return scale_out, L, act
    xv, ww, den = xval[idx], w[idx], denom[idx]
    wa = np.sqrt(ww)
    scale = sc[idx]
    best = np.zeros(len(idx), dtype=F)
    Lb = np.zeros((len(idx), B), dtype=np.int64)
    on_grid = np.full((len(idx), B // grid.n), sp.on_grid0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for is_ in range(-sp.nsteps, sp.nsteps + 1):
            idv = (F(2 * kmaxq - 1) + F(is_) * F(sp.step)) / den
            la, og = _snap(grid, xv, wa, idv, F(1) / idv)
            sumqx, sumq2 = _sumqx_sumq2(ww, xv, (2 * la + 1).astype(F))
            acc = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(acc, sumqx / sumq2, scale)
            best = np.where(acc, scale * sumqx, best)
            Lb[acc] = la[acc]
            on_grid[acc] = og[acc]
        if sp.resnap == "all":
            rs = scale > 0
            need = None
        else:
            rs = (~on_grid).any(1) & (scale > 0)
            need = None if sp.resnap == "all_if_offgrid" else ~on_grid[rs]
        if rs.any():
            s = scale[rs]
            la, _ = _snap(grid, xv[rs], wa[rs], F(1) / s, s, need)
            if need is not None:
                la = np.where(np.repeat(need, grid.n, axis=1), la, Lb[rs])
            Lb[rs] = la
            sumqx, sumq2 = _sumqx_sumq2(ww[rs], xv[rs], (2 * la + 1).astype(F))
            scale[rs] = np.where(sumq2 > 0, sumqx / sumq2, s)
    scale_out[idx] = scale
    L[idx] = Lb
    return scale_out, L, act


def _grid_indices(grid: _Grid, L: np.ndarray) -> np.ndarray:
    """Final levels i64[S, B] -> grid indices i64[S, B/n] (C aborts on an off-grid point)."""
    S, B = L.shape
    gi = grid.kmap[_keys(grid, L.reshape(S, B // grid.n, grid.n))]
    if (gi < 0).any():
        raise RuntimeError("grid search left a point off the grid")  # GGML_ABORT in C
    return gi


def _to_superblocks(rows: np.ndarray, imatrix: np.ndarray | None):
    """rows f32[R, N] (+ imatrix f32[N]) -> chunks of (xs f32[T, 256], qw f32[T, 256] | None)."""
    R, N = rows.shape
    nbl = N // QK_K
    xs = np.ascontiguousarray(rows, dtype=F).reshape(R * nbl, QK_K)
    qw = None if imatrix is None else np.asarray(imatrix, dtype=F).reshape(nbl, QK_K)
    for t0 in range(0, R * nbl, _CHUNK):
        t1 = min(t0 + _CHUNK, R * nbl)
        yield xs[t0:t1], None if qw is None else qw[np.arange(t0, t1) % nbl]


def _run(cls, rows: np.ndarray, imatrix: np.ndarray | None, blocks_fn) -> np.ndarray:
    R, N = rows.shape
    parts = [blocks_fn(xs, qw) for xs, qw in _to_superblocks(rows, imatrix)]
    out = np.concatenate(parts) if parts else np.zeros((0, cls.type_size()), np.uint8)
    return out.reshape(R, N // QK_K * cls.type_size())


# ---------------------------------------------------------------------------------- IQ2 / IQ3 writers

_IQ2_XXS = _Search("iq2xxs", GROUP_MAX_EPS, 6, 0.1, "all", True, True)
_IQ2_XS = _Search("iq2xs", GROUP_MAX_EPS, 9, 0.1, "offgrid", True, False)
_IQ2_S = _Search("iq2s", GROUP_MAX_EPS_IQ2_S, 9, 0.1, "offgrid", True, False)
_IQ3_XXS = _Search("iq3xxs", GROUP_MAX_EPS_IQ3_XXS, 15, 0.2, "offgrid", True, False)
_IQ3_S = _Search("iq3s", None, 9, 0.2, "all_if_offgrid", False, False)


def _iq2_xxs_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq2_xxs_impl: f32[T, 256] -> u8[T, 66]."""
    T = len(xs)
    w = _superblock_weights(xs, qw, 1, "x2").reshape(T * 8, 32)
    xval, signs = _parity_signs(xs.reshape(T * 8, 32), w)              # signs u8[T*8, 4]
    scale, L, act = _search_subblocks(_IQ2_XXS, xval, w)
    neg = scale < 0
    scale = np.abs(scale)
    signs = np.where(neg[:, None], ~signs & 127, signs)
    signs = np.where(act[:, None], signs, 0).astype(np.uint32)
    gi = _grid_indices(_grid("iq2xxs"), L).astype(np.uint32)           # [T*8, 4]
    a = (gi << (8 * np.arange(4, dtype=np.uint32))).sum(1, dtype=np.uint32).reshape(T, 8)
    b = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(1, dtype=np.uint32).reshape(T, 8)
    max_scale, d, ls = _superblock_scales(scale.reshape(T, 8), 15)
    has = max_scale > 0
    b = np.where(has[:, None], b | (ls.astype(np.uint32) << 28), 0)
    a = np.where(has[:, None], a, 0)
    q = np.stack([a, b], axis=-1).reshape(T, 16).astype("<u4")
    out = np.empty((T, 66), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d, F(0)))
    out[:, 2:] = q.view(np.uint8)
    return out


def _iq2_xs_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq2_xs_impl: f32[T, 256] -> u8[T, 74]."""
    T = len(xs)
    w = _superblock_weights(xs, qw, 1, "x2").reshape(T * 16, 16)
    xval, signs = _parity_signs(xs.reshape(T * 16, 16), w)             # [T*16, 2]
    scale, L, act = _search_subblocks(_IQ2_XS, xval, w)
    neg = scale < 0
    scale = np.abs(scale)
    signs = np.where(neg[:, None], ~signs & 127, signs)
    signs = np.where(act[:, None], signs, 0).astype(np.uint16)
    gi = _grid_indices(_grid("iq2xs"), L).astype(np.uint16)            # [T*16, 2]
    qs = (gi | (signs << 9)).reshape(T, 32)
    max_scale, d, ls = _superblock_scales(scale.reshape(T, 16), 15)
    has = max_scale > 0
    qs = np.where(has[:, None], qs, 0).astype("<u2")
    sc = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    sc = np.where(has[:, None], sc, 0)
    out = np.empty((T, 74), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d, F(0)))
    out[:, 2:66] = qs.view(np.uint8)
    out[:, 66:] = sc
    return out


def _iq2_s_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq2_s_impl: f32[T, 256] -> u8[T, 82] (d, qs[32] grid low bytes, signs[32], qh[8], scales[8])."""
    T = len(xs)
    w = _superblock_weights(xs, qw, 2, "iq2s").reshape(T * 16, 16)
    x = xs.reshape(T * 16, 16)
    xval, signs = _plain_signs(x)                                      # [T*16, 2]
    scale, L, act = _search_subblocks(_IQ2_S, xval, w)
    neg = scale < 0
    scale = np.abs(scale)
    signs = np.where(neg[:, None], ~signs, signs)
    signs = np.where(act[:, None], signs, 0).astype(np.uint8)
    gi = _grid_indices(_grid("iq2s"), L)                               # [T*16, 2]
    gi = np.where(act[:, None], gi, 0).reshape(T, 32)
    qh = ((gi >> 8).reshape(T, 8, 4) << (2 * np.arange(4))).sum(-1).astype(np.uint8)
    max_scale, d, ls = _superblock_scales(scale.reshape(T, 16), 15)
    has = max_scale > 0
    sc = np.where(has[:, None], ls[:, 0::2] | (ls[:, 1::2] << 4), 0).astype(np.uint8)
    out = np.empty((T, 82), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d * F(0.9875), F(0)))
    out[:, 2:34] = (gi & 255).astype(np.uint8)
    out[:, 34:66] = signs.reshape(T, 32)
    out[:, 66:74] = qh
    out[:, 74:] = sc
    return out


def _iq3_xxs_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq3_xxs_impl(256): f32[T, 256] -> u8[T, 98] (d, qs[64], scales_and_signs u32[8])."""
    T = len(xs)
    w = _superblock_weights(xs, qw, 2, "x2").reshape(T * 8, 32)
    xval, signs = _parity_signs(xs.reshape(T * 8, 32), w)              # [T*8, 4]
    scale, L, act = _search_subblocks(_IQ3_XXS, xval, w)
    neg = scale < 0
    scale = np.abs(scale)
    signs = np.where(neg[:, None], ~signs & 127, signs)
    signs = np.where(act[:, None], signs, 0).astype(np.uint32)
    gi = _grid_indices(_grid("iq3xxs"), L).reshape(T, 64)
    ss = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(1, dtype=np.uint32).reshape(T, 8)
    max_scale, d, ls = _superblock_scales(scale.reshape(T, 8), 15)
    has = max_scale > 0
    ss = np.where(has[:, None], ss | (ls.astype(np.uint32) << 28), 0).astype("<u4")
    out = np.empty((T, 98), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d * F(1.0125), F(0)))
    out[:, 2:66] = np.where(has[:, None], gi, 0).astype(np.uint8)
    out[:, 66:] = ss.view(np.uint8)
    return out


def _iq3_s_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq3_s_impl(32): f32[T, 256] -> u8[T, 110] (d, qs[64], qh[8], signs[32], scales[4])."""
    T = len(xs)
    w = _superblock_weights(xs, qw, 2, "x2").reshape(T * 8, 32)
    xval, signs = _plain_signs(xs.reshape(T * 8, 32))                  # [T*8, 4]
    scale, L, act = _search_subblocks(_IQ3_S, xval, w)
    neg = scale < 0
    scale = np.abs(scale)
    signs = np.where(neg[:, None], ~signs, signs)
    signs = np.where(act[:, None], signs, 0).astype(np.uint8)
    gi = _grid_indices(_grid("iq3s"), L)                               # [T*8, 8]
    gi = np.where(act[:, None], gi, 0)
    qh = ((gi >> 8) << np.arange(8)).sum(1).astype(np.uint8).reshape(T, 8)
    max_scale, d, ls = _superblock_scales(scale.reshape(T, 8), 15)
    has = max_scale > 0
    sc = np.where(has[:, None], ls[:, 0::2] | (ls[:, 1::2] << 4), 0).astype(np.uint8)
    # C advances its qs/signs pointers only past sub-blocks it writes (max != 0): the written ones are
    # packed to the front and the tail stays zero; qh and scales are indexed by ib.
    act = act.reshape(T, 8)
    slot = np.where(act, np.cumsum(act, axis=1) - 1, 8)                # 8: a scratch slot, dropped
    rows = np.arange(T)[:, None]
    qs = np.zeros((T, 9, 8), dtype=np.uint8)
    qs[rows, slot] = (gi & 255).astype(np.uint8).reshape(T, 8, 8)
    sg = np.zeros((T, 9, 4), dtype=np.uint8)
    sg[rows, slot] = signs.reshape(T, 8, 4)
    out = np.empty((T, 110), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d * F(1.033), F(0)))
    out[:, 2:66] = qs[:, :8].reshape(T, 64)
    out[:, 66:74] = qh
    out[:, 74:106] = sg[:, :8].reshape(T, 32)
    out[:, 106:] = sc
    return out


# ----------------------------------------------------------------------------------------- IQ1_S, IQ1_M

_IQ1_DELTA = F(0.125)
_X_P = np.array([F(-1) + _IQ1_DELTA, _IQ1_DELTA, F(1) + _IQ1_DELTA], dtype=F)
_X_M = np.array([F(-1) - _IQ1_DELTA, -_IQ1_DELTA, F(1) - _IQ1_DELTA], dtype=F)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(i1, i2) for 0 <= i1 <= i2 <= n in the C loop order."""
    return np.triu_indices(n + 1)


def _scan_best(sumqx: np.ndarray, sumq2: np.ndarray, scale0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequential `if (sumq2 > 0 && sumqx^2 > best*sumq2) {scale = sumqx/sumq2; best = scale*sumqx;}`
    with best = -FLT_MAX: f32[S, C] candidates (C order) -> (scale f32[S], best candidate i64[S] or -1)."""
    S, C = sumqx.shape
    best = np.full(S, -np.finfo(F).max, dtype=F)
    scale = scale0.copy()
    arg = np.full(S, -1, dtype=np.int64)
    qx, q2 = np.ascontiguousarray(sumqx.T), np.ascontiguousarray(sumq2.T)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for c in range(C):
            a, b = qx[c], q2[c]
            acc = (b > 0) & (a * a > best * b)
            if acc.any():
                scale = np.where(acc, a / b, scale)
                best = np.where(acc, scale * a, best)
                arg[acc] = c
    return scale, arg


def _split_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """L[idx[j]] = 0 for j < i1, 1 for i1 <= j < i2, 2 after: order i64[S, B] -> L i64[S, B]."""
    S, B = order.shape
    j = np.arange(B)
    ls = (j >= i1[:, None]).astype(np.int64) + (j >= i2[:, None])
    L = np.empty_like(ls)
    np.put_along_axis(L, order, ls, axis=1)
    return L


def _iq1_snap(grid: _Grid, L: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray,
              xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map each group of 8 through kmap, off-grid ones via iq1_find_best_neighbour2.

    L i64[S, B], x/w f32[S, B], scale f32[S], xx f32[S, B/8, 3] -> grid index i64[S, B/8], all_on_grid bool[S].
    """
    S, B = L.shape
    u = _keys(grid, L.reshape(S, B // 8, 8))
    gi = grid.kmap[u]
    off = gi < 0
    if off.any():
        si, gk = np.nonzero(off)
        gi[si, gk] = _best_neighbour(grid, u[si, gk], x.reshape(S, B // 8, 8)[si, gk],
                                     w.reshape(S, B // 8, 8)[si, gk], scale[si], xx[si, gk])
    return gi, ~off.any(1)


def _iq1_refit(grid: _Grid, gi: np.ndarray, x: np.ndarray, w: np.ndarray, xx: np.ndarray):
    """sum w*q*x, sum w*q*q over the sub-block with q = xx[level]: gi i64[S, G] -> f32[S] x2."""
    S, G = gi.shape
    q = np.take_along_axis(xx, grid.levels[gi], axis=2).reshape(S, G * 8)
    return _seq_sum(w * q * x), _seq_sum(w * q * q)


def _iq1_s_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq1_s_impl: f32[T, 256] -> u8[T, 50] (d, qs[32], qh u16[8])."""
    grid = _grid("iq1s")
    T = len(xs)
    S = T * 8
    w = _superblock_weights(xs, qw, 2, "x2").reshape(S, 32)
    x = xs.reshape(S, 32)
    mx = np.max(np.abs(x), axis=1)
    act = np.flatnonzero(~(mx < GROUP_MAX_EPS_IQ1_S))
    scales = np.zeros(S, dtype=F)
    shifts = np.ones(S, dtype=np.int64)
    gi_all = np.zeros((S, 4), dtype=np.int64)
    if len(act):
        xa, wa = x[act], w[act]
        order = np.argsort(xa, axis=1, kind="stable")                  # glibc qsort: stable merge sort
        wx = np.take_along_axis(wa * xa, order, axis=1)
        ws = np.take_along_axis(wa, order, axis=1)
        sumx = np.zeros((len(act), 33), dtype=F)
        sumw = np.zeros((len(act), 33), dtype=F)
        for j in range(32):
            sumx[:, j + 1] = sumx[:, j] + wx[:, j]
            sumw[:, j + 1] = sumw[:, j] + ws[:, j]
        i1, i2 = _pairs(32)
        cand_qx, cand_q2 = [], []
        for xv in (_X_P, _X_M):
            a, b, c = sumx[:, i1] - sumx[:, :1], sumx[:, i2] - sumx[:, i1], sumx[:, 32:] - sumx[:, i2]
            cand_qx.append(a * xv[0] + b * xv[1] + c * xv[2])
            a, b, c = sumw[:, i1] - sumw[:, :1], sumw[:, i2] - sumw[:, i1], sumw[:, 32:] - sumw[:, i2]
            cand_q2.append(a * xv[0] * xv[0] + b * xv[1] * xv[1] + c * xv[2] * xv[2])
        npair = len(i1)
        # C order: for each pair, the x_p candidate then the x_m one
        qx = np.stack(cand_qx, axis=2).reshape(len(act), 2 * npair)
        q2 = np.stack(cand_q2, axis=2).reshape(len(act), 2 * npair)
        scale, arg = _scan_best(qx, q2, mx[act])
        found = arg >= 0
        pair, shift = arg // 2, np.where(arg % 2 == 0, 1, -1)
        L = _split_levels(order, i1[pair], i2[pair])
        neg = scale < 0
        L = np.where(neg[:, None], 2 - L, L)
        scale = np.abs(scale)
        shift = np.where(neg, -shift, shift)
        xx = np.where((shift == 1)[:, None], _X_P, _X_M)[:, None, :].repeat(4, axis=1)   # [S', 4, 3]
        with np.errstate(over="ignore", invalid="ignore"):
            gi, on = _iq1_snap(grid, L, xa, wa, scale, xx)
            sqx, sq2 = _iq1_refit(grid, gi, xa, wa, xx)
            scale = np.where(~on & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
        keep = act[found]
        scales[keep] = scale[found]
        shifts[keep] = shift[found]
        gi_all[keep] = gi[found]
    gi_all = gi_all.reshape(T, 32)
    qh = ((gi_all >> 8).reshape(T, 8, 4) << (3 * np.arange(4))).sum(-1)
    max_scale, d, ls = _superblock_scales(scales.reshape(T, 8), 7)
    has = max_scale > 0
    ls = ls | np.where(shifts.reshape(T, 8) == -1, 8, 0)
    qh = np.where(has[:, None], qh | (ls << 12), qh).astype("<u2")
    out = np.empty((T, 50), dtype=np.uint8)
    out[:, :2] = fp16_bytes(np.where(has, d * F(1.125), F(0)))
    out[:, 2:34] = (gi_all & 255).astype(np.uint8)
    out[:, 34:] = qh.view(np.uint8)
    return out


def _iq1_m_blocks(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq1_m_impl (vendored fast search): f32[T, 256] -> u8[T, 56] (qs[32], qh[16], scales u16[4])."""
    grid = _grid("iq1s")
    T = len(xs)
    S = T * 16
    w = _superblock_weights(xs, qw, 2, "x2").reshape(S, 16)
    x = xs.reshape(S, 16)
    mx = np.max(np.abs(x), axis=1)
    act = np.flatnonzero(~(mx < GROUP_MAX_EPS_IQ1_M))
    scales = np.zeros(S, dtype=F)
    shifts = np.zeros(S, dtype=np.int64)
    gi_all = np.zeros((S, 2), dtype=np.int64)
    if len(act):
        xa, wa = x[act], w[act]
        n = len(act)
        order = np.argsort(xa, axis=1, kind="stable")
        wx = np.take_along_axis(wa * xa, order, axis=1)
        ws = np.take_along_axis(wa, order, axis=1)
        half = (order >= 8).astype(np.int64)                           # h of the j-th sorted value
        px = np.zeros((2, n, 17), dtype=F)
        pw = np.zeros((2, n, 17), dtype=F)
        rows = np.arange(n)
        for j in range(16):
            h = half[:, j]
            px[:, :, j + 1] = px[:, :, j]
            pw[:, :, j + 1] = pw[:, :, j]
            px[h, rows, j + 1] = px[h, rows, j] + wx[:, j]
            pw[h, rows, j + 1] = pw[h, rows, j] + ws[:, j]
        p2, m2 = _X_P[2], _X_M[2]
        cp1 = _X_P[0] * _X_P[0] - _X_P[1] * _X_P[1]
        cp2 = _X_P[1] * _X_P[1] - _X_P[2] * _X_P[2]
        cm1 = _X_M[0] * _X_M[0] - _X_M[1] * _X_M[1]
        cm2 = _X_M[1] * _X_M[1] - _X_M[2] * _X_M[2]
        i1, i2 = _pairs(16)
        qx_p, qx_m, q2_p, q2_m = [], [], [], []
        for h in range(2):
            txs, tws = px[h, :, 16:], pw[h, :, 16:]
            sx = px[h][:, i1] + px[h][:, i2]
            qx_p.append(txs * p2 - sx)
            qx_m.append(txs * m2 - sx)
            q2_p.append(tws * p2 * p2 + pw[h][:, i1] * cp1 + pw[h][:, i2] * cp2)
            q2_m.append(tws * m2 * m2 + pw[h][:, i1] * cm1 + pw[h][:, i2] * cm2)
        qx = np.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], axis=2)
        q2 = np.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], axis=2)
        scale, arg = _scan_best(qx.reshape(n, -1), q2.reshape(n, -1), mx[act])
        found = arg >= 0
        pair, best_k = arg // 4, arg % 4
        L = _split_levels(order, i1[pair], i2[pair])
        neg = scale < 0
        L = np.where(neg[:, None], 2 - L, L)
        scale = np.abs(scale)
        best_k = np.where(neg, 3 - best_k, best_k)
        xx = np.stack([np.where((best_k < 2)[:, None], _X_P, _X_M),
                       np.where((best_k % 2 == 0)[:, None], _X_P, _X_M)], axis=1)      # [S', 2, 3]
        with np.errstate(over="ignore", invalid="ignore"):
            gi, on = _iq1_snap(grid, L, xa, wa, scale, xx)
            sqx, sq2 = _iq1_refit(grid, gi, xa, wa, xx)
            scale = np.where(~on & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
        keep = act[found]
        scales[keep] = scale[found]
        shifts[keep] = best_k[found]
        gi_all[keep] = gi[found]
    qs = (gi_all & 255).astype(np.uint8).reshape(T, 32)
    qh = ((gi_all[:, 0] >> 8) | ((gi_all[:, 1] >> 8) << 4)).reshape(T, 16)
    max_scale, d, ls = _superblock_scales(scales.reshape(T, 16), 7)
    has = max_scale > 0
    masks = np.array([0x00, 0x80, 0x08, 0x88])
    qh = np.where(has[:, None], qh | masks[shifts.reshape(T, 16)], qh)
    # Final refit of d over the whole superblock with the stored levels, sequential over ib, k, j.
    xx = np.stack([np.where((shifts < 2)[:, None], _X_P, _X_M),
                   np.where((shifts % 2 == 0)[:, None], _X_P, _X_M)], axis=1)          # [S, 2, 3]
    q = np.take_along_axis(xx, grid.levels[gi_all], axis=2).reshape(T, 16, 16)
    q = q * (2 * ls[:, :, None] + 1).astype(F)
    wt, xt = w.reshape(T, 16, 16), x.reshape(T, 16, 16)
    sqx = _seq_sum((wt * q * xt).reshape(T, 256))
    sq2 = _seq_sum((wt * q * q).reshape(T, 256))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sq2 > 0, sqx / sq2, d)
    s16 = fp16_bytes(d * F(1.1125)).view("<u2")[:, 0].astype(np.int64)
    sc = (ls.reshape(T, 4, 4) << (3 * np.arange(4))).sum(-1)
    sc = sc | np.stack([(s16 & 0x000F) << 12, (s16 & 0x00F0) << 8, (s16 & 0x0F00) << 4, s16 & 0xF000], axis=1)
    sc = np.where(has[:, None], sc, 0).astype("<u2")
    out = np.empty((T, 56), dtype=np.uint8)
    out[:, :32] = qs
    out[:, 32:48] = qh.astype(np.uint8)
    out[:, 48:] = sc.view(np.uint8)
    return out


# ------------------------------------------------------------------------------------------- the types

@register
class IQ2_XXS(QuantType):
    qtype = GGMLQuantizationType.IQ2_XXS
    imatrix = "required"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq2_xxs_blocks)


@register
class IQ2_XS(QuantType):
    qtype = GGMLQuantizationType.IQ2_XS
    imatrix = "required"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq2_xs_blocks)


@register
class IQ2_S(QuantType):
    """ggml quantizes IQ2_S without an imatrix too (w = 0.25*sigma2 + x^2); llama-quantize demands one."""

    qtype = GGMLQuantizationType.IQ2_S
    imatrix = "optional"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq2_s_blocks)


@register
class IQ3_XXS(QuantType):
    qtype = GGMLQuantizationType.IQ3_XXS
    imatrix = "optional"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq3_xxs_blocks)


@register
class IQ3_S(QuantType):
    qtype = GGMLQuantizationType.IQ3_S
    imatrix = "optional"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq3_s_blocks)


@register
class IQ1_S(QuantType):
    qtype = GGMLQuantizationType.IQ1_S
    imatrix = "required"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq1_s_blocks)


@register
class IQ1_M(QuantType):
    """ggml quantizes IQ1_M without an imatrix too (w = x^2); llama-quantize demands one."""

    qtype = GGMLQuantizationType.IQ1_M
    imatrix = "optional"

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        return _run(cls, rows, imatrix, _iq1_m_blocks)
