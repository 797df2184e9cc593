"""Grid ("i-quant") types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, bit-exact with ggml.

Mirrors ``quantize_row_{iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s,iq1_s,iq1_m}_impl`` in ggml-quants.c (the
llama.cpp tree vendored in llama-cpp-python 0.3.36, whose IQ1_M search is the fast prefix-sum one).
Level indices of the grids are derived from gguf-py's grid tables (they equal the C ``kgrid_*``).
See shared/notes/gguf-quantization-spec.md sections 3.7-3.11 and 4.

Structure: the five IQ2/IQ3 types share one pipeline (``_GridType``: weights, signs, a scale search whose
every try snaps groups of n values to the grid, a re-snap, the superblock scales); IQ1_S and IQ1_M share
another (``_OneBitType``: an exhaustive search over sorted splits, a snap, a refit). A type states only
its parameters, its candidate scores (IQ1) and its byte layout. Off-grid groups of both go through
``_neighbour_batches`` (``_best_neighbours``, C's loop over one table per group, is its exact fallback).

Layout: superblocks are quantized in pieces of ``_CHUNK*chunks``; inside a piece arrays are element-major
``[n, S]`` (element of a sub-block, sub-block), so that C's sequential sums are one-pass ``dot0``
reductions. Every float operation is C's, in C's order; vectorization is across groups, sub-blocks and
candidates only.

Speed (issue 19). Profile before (cProfile + line_profiler, 256x4096 rows, imatrix): the IQ2/IQ3 types
spent 70-85% in the neighbour search, ~45-65 ns per candidate (per candidate and value one gather of a
code, index arithmetic and one random gather of a table term, for every off-grid group of every try
separately); IQ2_XXS another ~15% in make_qp_quants' refinement (~2000 tiny numpy calls per piece). IQ1_S
and IQ1_M spent ~55% in the split selection (a Python-level step for each of the 1122/612 candidates of
C's order), ~30% in neighbours of off-grid groups, much of the rest in np.add/maximum.accumulate along
axis 0 (about 9x slower than a loop over rows) and np.where on random masks (~4 ns per element).
Changes: (1) ``_neighbour_batches``: the off-grid groups of all tries of a piece are sorted by key (radix sort)
into tiles of 4-16 groups sharing a key, so a candidate is n - prefix + 1 row gathers and adds for the
whole tile (~3-4 ns per padded candidate), with size classes bounding the padding; IQ3 runs in batches of
32K groups, whose temporaries are reused instead of page-faulted (a third of IQ3_XXS's time was sys time).
(2) IQ1: ``_scan`` computes every candidate's score at once and replays C's loop exactly over the few
candidates within 2^-12 of the best (the proof is in its docstring; ~2 per sub-block), IQ1_S's scores
share their power-of-two products, prefix sums are row loops, pieces are 4x larger. (3) make_qp_quants
(primitives.py): per element, the proposal is computed for every block and the rest only where it
differs. (4) No np.where on random masks in the per-value steps. After (benchmarks/quantize_speed.py,
1024x4096, 2 repeats, ratio = libggml CPU time / ours): IQ1_S 0.36x -> 0.71x, IQ1_M 0.30x -> 0.69x,
IQ2_XXS 0.29x -> 0.77x, IQ2_XS 0.32x -> 1.37x, IQ2_S 0.40x -> 0.92x, IQ3_XXS 0.31x -> 0.46x,
IQ3_S 0.25x -> 0.57x (a quiet machine; on a busy one 0.86/0.68/0.76/1.09/0.74/0.43/0.52x: runs vary by
~15%), all bit-exact (tests/quant/test_iqgrid*.py). Where the time goes now: the neighbour search is still
60-85% of every IQ2/IQ3 type (IQ3_XXS: ~180 ns per off-grid group with ~8 candidates, C ~90 ns all in),
bound by the ~250 element operations per group (term table, gathers, first minimum) at numpy's 0.2-1 ns
each, while C's scalar loop is cheap for so few candidates; IQ1's split scores are ~12 operations per
candidate. Types with many candidates per group (IQ2_XS) beat C; the others would need fewer element
operations than we found a way to do in pure NumPy.

Second round (issue 19, IQ3 first). Profile (line_profiler and perf_counter sections of ``_snap`` on one
IQ3_XXS piece, 256 superblocks, 31 tries, ~410K off-grid groups, 8.1 candidates each, ~110 ns per group):
the neighbour search was ~80% of IQ3_XXS (IQ3_S ~75%); inside it ~40% went to the per-batch sort and
its permutations (argsort, scattering group ids and scales to slots and the results back), ~25% to the
term tables, ~15% to the gathered sums, ~12% to the first minimum. The term table cost ~29 ns per slot in
the pipeline against ~10 ns when repeated on the same arrays: fresh temporaries per step (page faults,
cold cache), not arithmetic. 32K-group batches also left W = 4 with ~33% padded slots (one call for the
piece: W = 16, ~7%) and paid ~14 size classes of per-step overhead per batch. Changes: one search per
``_snap`` call, its counting sort (``_slots``) in cache-sized batches with a running count per key and no
permutation compositions; values and weights gathered per step; every per-step temporary in scratch
arrays; C's ``d2 = 0`` start dropped (it only changes the sign of a zero, which no comparison sees). The
IQ2/IQ1 types share the code; their neighbour search had few batches and gains little.

Third round (issue 19, memory). tracemalloc peak of ``quantize`` on one 1024x1024 f32 piece with an imatrix
in a fresh process (the one-time grid tables included), before -> after: IQ2_XXS 70 -> 20, IQ2_XS 85 -> 23,
IQ2_S 70 -> 21, IQ3_XXS 48 -> 23, IQ3_S 31 -> 17, IQ1_S 235 -> 23, IQ1_M 235 -> 29 MiB; with the tables
already built 31/34/30/46/28/31/29 -> 17/19/18/21/15/17/23 MiB; tables kept 16/19/8/1/2/47 -> 3.4/2.5/1.2/.2/.3/3.9
MB (iq2xxs/iq2xs/iq2s/iq3xxs/iq3s/iq1s). Profile: the cold peaks were ``_grid`` (a distance matrix of 4096
keys x G grid points per step, and the ``codes`` of all neighbours of all 43692 keys, most of them keys no
quantizer forms: 1.33M for iq1s) and the tiles' intp codes; per piece ~80 bytes per off-grid group in
``_snap``/the neighbour search (int64 positions and ids, their concatenated copies, the slot permutation, the
least distances: IQ3_XXS ~410K groups) and the IQ1 split search's ~20 arrays of [33 or 68, 8192] f32.
Changes: neighbour lists only for keys of levels (nb i16, no codes: ``_best_neighbours`` derives its own),
built 256 keys per step; tile codes i8 and nb i16; ``_snap`` feeds ``_neighbour_batches`` batch by batch
(stretches of ~_SORT_BATCH positions, groups found with flatnonzero and small tables: boolean indexing
costs ~4 ns per position, integer division more), which keeps an i32 slot per group and ~12 bytes per slot;
the IQ1 split search runs every pass in column steps (_SPLIT_COLS = 4096 sub-blocks, IQ1_M 8192; the
retries of all steps in one pass), forms the per-i1 terms on the fly and lends ``_collect`` its scratch
(IQ1_M). Speed: the tile table's prefix is chosen per size class (``_class_prefix``; IQ2_XXS's term tables
~30% cheaper), the IQ1_M split scores take 8 calls per i1 instead of ~22. Timing caveat: with only small
arrays glibc keeps its mmap threshold low and returns freed memory, so every piece page-faults its
temporaries anew (IQ1_M ~100K faults per 16 MB call, ~25% of its time; IQ3_XXS ~130K); the old 235 MB
peak had raised the threshold as a side effect. benchmarks/quantize_speed.py (1024x4096, 2 repeats, ratio
libggml/ours, two alternating runs each, before -> after): IQ1_S .73/.65 -> .82/.64, IQ1_M .72/.70 ->
.54/.55, IQ2_XXS .82/.85 -> .83/.85, IQ2_XS 1.34/1.32 -> 1.15/1.16, IQ2_S .77/.85 -> .77/.74, IQ3_XXS
.70/.75 -> .59/.58, IQ3_S .78/.73 -> .66/.74; with MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=67108864 for both (no faults either way): IQ1_S .71/.68 -> .64/.77, IQ1_M .80/.70 ->
.64/.78, IQ2_XXS .81/.85 -> 1.11/.86, IQ2_XS 1.25/1.22 -> .94/1.28, IQ2_S .88/.85 -> .96/.87, IQ3_XXS
.76/.73 -> .71/.71, IQ3_S .66/.79 -> .78/.76 (same speed within the box's noise). All bit-exact.
The quantize command's processes and benchmarks/quantize_speed.py now set those two thresholds with mallopt
(quant.stream.tune_malloc): a fresh benchmark process then measured IQ1_M 0.77x, IQ3_XXS 0.75x, IQ2_XXS 0.88x,
IQ1_S 0.74x (1024x4096, 2 repeats, a loaded box).

Tried and dropped (2026-12-04): pruning IQ1_M's split scan per (i1 block, sub-block) with an upper bound of the
block's best score (|sumqx| from suffix maxima and minima of the halves' prefix sums, sumq2 at its least, i2 = 16)
would skip only ~11% of the candidates (weighted by block size) even against the final best score; against the
running best ~29% of the (block, sub-block) pairs, mostly the small late blocks: the bound is loose where blocks
are large. Per candidate the scan is ~9.5 element operations
at ~0.3 ns each (qx, q2, the score, its running maximum, the threshold test), C's loop ~3 ns all in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

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
    dot0,
    element_major,
    fp16_bytes,
    make_qp_quants,
    nearest_int,
    seqsum,
)

F = np.float32
_CHUNK = 256  # superblocks per piece (times the type's ``chunks``)
_MAGIC2 = F(25165824.0)  # v + 2*12582912 has the mantissa bits of 0.5*v + 12582912 (C's nearest_int)
_TILE_CANDS = 1 << 16  # padded candidates per step of the neighbour search (its temporaries stay in the cache)
_TILE_SLOTS = 1 << 13  # and groups (slots) per step
_FLT_MAX = np.finfo(F).max
_SORT_BATCH = 1 << 15  # groups per step of the neighbour search's counting sort (its arrays stay in the cache)


# ------------------------------------------------------------------------------- grids and neighbours

@dataclass(frozen=True)
class _Grid:
    """A quantizer-side grid (iq2xs_init_impl / iq3xs_init_impl) and its neighbour lists.

    Groups of n values have levels l in 0..nlev-1 and the key u = sum l_i << bits*i. levels i64[G, n]
    and odd f32[G, n] = 2l+1 per grid point; kmap i32[K]: grid index of an on-grid key, -1 otherwise.
    The neighbours of an off-grid key u, in C order (by distance, then index; every point within the
    nwant smallest distinct distances), are nb[nb_start[u] : nb_start[u] + nb_count[u]] (i16; only for
    keys whose digits are all levels, the only ones a quantizer forms: C also lists the others).
    ``_best_neighbours`` sums the first ``prefix`` values in one table lookup; ``_tiles`` lays the same
    lists out for ``_neighbour_batches``.
    """

    n: int
    bits: int
    nlev: int
    prefix: int
    levels: np.ndarray
    odd: np.ndarray
    kmap: np.ndarray
    nb_start: np.ndarray
    nb_count: np.ndarray
    nb: np.ndarray

    @property
    def table_rows(self) -> int:
        return self.nlev**self.prefix + (self.n - self.prefix) * self.nlev


_GRID_SPECS = {  # name -> (gguf-py class holding grid_hex, bits per level, nlev, kmap size, nwant, prefix)
    # prefix: values folded into the first table lookup; more pays off where groups have more neighbours
    "iq2xxs": (gguf_quants.IQ2_XXS, 2, 3, 43692, 2, 4),
    "iq2xs": (gguf_quants.IQ2_XS, 2, 3, 43692, 2, 5),
    "iq2s": (gguf_quants.IQ2_S, 2, 3, 43692, 1, 3),
    "iq1s": (gguf_quants.IQ1_S, 2, 3, 43692, 3, 4),
    "iq3xxs": (gguf_quants.IQ3_XXS, 3, 8, 4096, 2, 1),
    "iq3s": (gguf_quants.IQ3_S, 3, 8, 4096, 3, 1),
}


_GRID_BUILD_KEYS = 256  # off-grid keys per step of _grid's distance matrix (its temporaries stay small)


@cache
def _grid(name: str) -> _Grid:
    """Build (once) the grid, kmap and neighbour lists as iq2xs_init_impl / iq3xs_init_impl do."""
    cls, bits, nlev, kmap_size, nwant, prefix = _GRID_SPECS[name]
    cls.init_grid()
    values = cls.grid.reshape(cls.grid_shape)
    levels = np.searchsorted(np.array(cls.grid_map, dtype=F), values).astype(np.int64)   # [G, n]
    G, n = levels.shape
    shifts = bits * np.arange(n)
    kmap = np.full(kmap_size, -1, dtype=np.int32)
    kmap[(levels << shifts).sum(1)] = np.arange(G)
    odd = (2 * levels + 1).astype(F)

    digits = (np.arange(kmap_size)[:, None] >> shifts) & ((1 << bits) - 1)              # [K, n]
    off = np.flatnonzero((kmap < 0) & (digits < nlev).all(1))                            # keys a quantizer forms
    del digits
    g2 = (odd * odd).sum(1)
    starts, counts, nbs = np.zeros(kmap_size, np.int32), np.zeros(kmap_size, np.int32), []
    big = np.int32(1 << 30)
    total = 0
    for c0 in range(0, len(off), _GRID_BUILD_KEYS):
        u = off[c0:c0 + _GRID_BUILD_KEYS]
        p = (2 * ((u[:, None] >> shifts) & ((1 << bits) - 1)) + 1).astype(F)              # [U, n]
        d2 = np.rint((p * p).sum(1)[:, None] + g2[None, :] - 2 * (p @ odd.T)).astype(np.int32)  # exact ints
        thr = d2.min(1)
        for _ in range(nwant - 1):
            nxt = np.where(d2 > thr[:, None], d2, big).min(1)
            thr = np.where(nxt == big, big, nxt)
        rows, cols = np.nonzero(d2 <= thr[:, None])
        order = np.lexsort((cols, d2[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        cnt = np.bincount(rows, minlength=len(p))
        counts[u] = cnt
        starts[u] = total + np.cumsum(cnt) - cnt
        total += len(cols)
        nbs.append(cols.astype(np.int16))
    return _Grid(n, bits, nlev, prefix, levels, odd, kmap, starts, counts, np.concatenate(nbs))


def _codes(nl: np.ndarray, nlev: int, prefix: int) -> np.ndarray:
    """Levels int[..., n] of candidates -> their rows in a term table i16[n-prefix+1, ...] (row 0: the partial
    sum over the first ``prefix`` values, nlev**prefix rows; then nlev rows for each further value)."""
    nl = nl.astype(np.int16)
    n = nl.shape[-1]
    codes = [sum(nl[..., i] * np.int16(nlev**i) for i in range(prefix))]
    codes += [np.int16(nlev**prefix + (i - prefix) * nlev) + nl[..., i] for i in range(prefix, n)]
    return np.stack(codes)


@dataclass(frozen=True)
class _Tiles:
    """The neighbour lists of a grid laid out for ``_neighbour_batches``.

    The off-grid keys (valid level combinations only) are ordered by size class of their neighbour count
    (counts padded up to the class size Kp, at most ~1.2x), then by key; rank i16[K] gives a key's place in
    that order (-1: on the grid or not a level combination), keys i32[nkeys] the key of a rank. classes: per
    class (first rank, end rank, Kp, prefix p, codes i8[keys, n - p + 1, Kp]: each candidate's rows in the
    term table (``_codes`` with this prefix), nb i16[keys * Kp]: its grid index). Padding candidates repeat
    the first neighbour: equal distance, so the first one still wins.
    """

    rank: np.ndarray
    keys: np.ndarray
    nkeys: int
    classes: tuple


_GATHER_COST = 1.5  # a candidate's gathered and added table row, in units of a term table element (measured)


def _class_prefix(n: int, nlev: int, Kp: int) -> int:
    """The prefix p of a size class: the fewest element operations per group, the table's running sums over
    the first p values (nlev^2 + ... + nlev^p rows) against Kp * (n - p + 1) gathered rows (i8 codes: at
    most 128 table rows)."""
    ok = [p for p in range(1, n) if nlev**p + (n - p) * nlev <= 128]
    return min(ok, key=lambda p: sum(nlev**i for i in range(2, p + 1)) + _GATHER_COST * Kp * (n - p + 1))


@cache
def _tiles(name: str) -> _Tiles:
    """Build (once) the tile layout of a grid's neighbour lists (see _Tiles)."""
    grid = _grid(name)
    n, nlev = grid.n, grid.nlev
    vk = np.flatnonzero(grid.nb_count > 0)                                                # searchable keys
    K = grid.nb_count[vk]
    sizes = [1]
    while sizes[-1] < K.max():
        sizes.append(max(sizes[-1] + 1, int(np.ceil(sizes[-1] * 1.2))))
    cls = np.searchsorted(sizes, K)
    order = np.lexsort((vk, cls))
    vk, cls, K = vk[order], cls[order], K[order]
    rank = np.full(len(grid.kmap), -1, np.int16)
    rank[vk] = np.arange(len(vk))
    levels = grid.levels.astype(np.int8)
    classes = []
    for c in np.unique(cls):
        sel = np.flatnonzero(cls == c)
        Kp = sizes[c]
        p = _class_prefix(n, nlev, Kp)
        j = np.minimum(np.arange(Kp), K[sel, None] - 1)                                  # [keys, Kp]
        j = np.where(np.arange(Kp) < K[sel, None], j, 0)
        nb = grid.nb[grid.nb_start[vk[sel], None] + j]                                   # [keys, Kp]
        codes = _codes(levels[nb], nlev, p).astype(np.int8).transpose(1, 0, 2)          # [keys, n', Kp]
        classes.append((int(sel[0]), int(sel[-1]) + 1, Kp, p, np.ascontiguousarray(codes), nb.reshape(-1)))
    return _Tiles(rank, vk.astype(np.int32), len(vk), tuple(classes))


def _neighbour_batches(name: str, cnt: np.ndarray, batches, xg: np.ndarray, wg: np.ndarray, qv: np.ndarray,
                       per_group_table: bool) -> list[np.ndarray]:
    """The neighbour search of groups that come in batches -> their grid indices, i16 per batch.

    cnt [nkeys]: the number of groups per key rank (``_Tiles.rank``); batches: an iterable of (rank i16[m],
    gid [m] the group's column in xg, wg f32[n, NG] (values, weights), s f32[m] the scale, qsel [m] the group's
    row of the level tables qv f32[V, nlev], None unless per_group_table) per batch. The result is the first
    neighbour minimizing C's ``d2 += w*diff*diff`` (diff = s*q - x, sequential over the n values): C's
    iq2/iq3_find_best_neighbour and iq1_find_best_neighbour2. Per group only its slot is kept (4 bytes), per
    slot its column, scale, table, result and flag (~12 bytes).

    The groups are sorted by key (``_slots``: a counting sort of int16 ranks, batch by batch with a running
    next slot per key) into tiles of W groups of one key (W = 4, 8 or 16: wide, but with little padding for
    the keys' group counts; all tries of a piece come in one call, so few keys end in a partial tile). A
    tile's term table (C's ``(w*diff)*diff`` for every value and level, the first p values already summed in
    C order for every level combination; p per size class, ``_class_prefix``) has rows of W floats, so each
    candidate of the key costs n - p + 1 row gathers and additions (in C order) for all W groups, and the first minimum
    is a few passes over [Kp, slots]. The tiles run in steps of at most _TILE_CANDS padded candidates and
    _TILE_SLOTS groups per size class, each gathering its groups' values and weights, every temporary in
    scratch arrays allocated once per call. Groups whose least distance is NaN or not below FLT_MAX (NaN
    weights; C ignores NaN and aborts on the latter) go through the C loop (``_best_neighbours``).
    """
    grid, t = _grid(name), _tiles(name)
    n, nlev = grid.n, grid.nlev
    M = int(cnt.sum())
    if not M:
        return [np.empty(0, np.int16) for _ in batches]
    per_key = M / np.count_nonzero(cnt)
    W = 16 if per_key >= 24 else 8 if per_key >= 8 else 4  # tile width: wide enough, little padding
    tiles = -(-cnt // W)
    tstart = np.cumsum(tiles) - tiles
    S = int(tstart[-1] + tiles[-1]) * W
    g = np.full(S, -1, np.int32)  # padding slots: group -1 (gathers clip it to 0), scale 0, table 0, ignored
    ss = np.zeros(S, F)
    qs = np.zeros(S, np.int8) if per_group_table else None
    ok = np.empty(S, bool)
    nxt = tstart * W                                                                     # next free slot per key
    dests = []
    for rank, gid, s, qsel in batches:
        d = _slots(rank, nxt)                                                             # group -> slot
        g[d], ss[d] = gid, s
        if qs is not None:
            qs[d] = qsel
        dests.append(d)
    q0 = qv[0][:, None]
    tile_rank = np.repeat(np.arange(t.nkeys, dtype=np.intp), tiles)
    res = np.empty(S, np.int16)
    steps = [max(1, min(_TILE_CANDS // c[2], _TILE_SLOTS) // W) for c in t.classes]       # tiles per step
    # scratch, reused by every step (fresh temporaries cost page faults and cache misses): the most any class needs
    need = np.zeros(7, np.int64)
    for (_, _, Kp, p, _, _), st in zip(t.classes, steps):
        ns, n1 = st * W, n - p + 1
        need = np.maximum(need, [ns, (nlev**p + (n - p) * nlev) * ns, max(p, n - p) * nlev * ns, p * nlev * ns,
                                 nlev ** (p - 1) * ns, n1 * Kp * st, n1 * Kp * ns])
    ns_max, tab_max, tw_max, hd_max, comb_max, rows_max, cands_max = need.tolist()
    xw, least, lv = np.empty((2, n, ns_max), F), np.empty(ns_max, F), np.empty(nlev * ns_max, F)
    tab, tw, hd, comb = np.empty(tab_max, F), np.empty(tw_max, F), np.empty(hd_max, F), np.empty((2, comb_max), F)
    rows_at, terms = np.empty(rows_max, np.intp), np.empty(cands_max, F)
    cands = max(st * W * c[2] for st, c in zip(steps, t.classes))                    # padded candidates per step
    d2b, eqb = np.empty(cands, F), np.empty(cands, bool)
    for (r0, r1, Kp, p, codes, nbs), step in zip(t.classes, steps):
        rows = nlev**p + (n - p) * nlev                                                  # term table rows per group
        n1 = n - p + 1
        a, b = int(tstart[r0]), int(tstart[r1 - 1] + tiles[r1 - 1])
        wd = np.arange(Kp, 0, -1, dtype=np.int8 if Kp < 128 else np.int16)[:, None]
        for c0 in range(a, b, step):
            c1 = min(b, c0 + step)
            nt, sl = c1 - c0, slice(c0 * W, c1 * W)
            ns = nt * W
            gsl = g[sl].astype(np.intp)
            xsc, wsc = (np.take(v, gsl, axis=1, out=o.reshape(-1)[:n * ns].reshape(n, ns), mode="clip")
                        for v, o in zip((xg, wg), xw))                                     # [n, ns]
            lvc = lv[:nlev * ns].reshape(nlev, ns)                                        # s*q [nlev, ns]
            np.multiply(ss[sl], q0 if qs is None else np.take(qv, qs[sl], axis=0).T, out=lvc)
            table = tab[:rows * ns].reshape(rows, ns)
            head = table[:nlev].reshape(1, nlev, ns) if p == 1 else hd[:p * nlev * ns].reshape(p, nlev, ns)
            for dst, lo, hi in ((table[nlev**p:].reshape(n - p, nlev, ns), p, n), (head, 0, p)):
                np.subtract(lvc, xsc[lo:hi, None], out=dst)                                 # diff = s*q - x
                dst *= np.multiply(wsc[lo:hi, None], dst, out=tw[:(hi - lo) * nlev * ns].reshape(-1, nlev, ns))
            # C starts d2 at +0; starting from the first term instead changes at most the sign of a zero
            part = head[0]
            for i in range(1, p):  # row of (l_0..l_i) = sum l_k nlev^k
                dst = table[:nlev**(i + 1)] if i == p - 1 else comb[i % 2, :nlev**(i + 1) * ns].reshape(-1, ns)
                np.add(part[None], head[i][:, None], out=dst.reshape(nlev, -1, ns))
                part = dst
            kl = tile_rank[c0:c1] - r0
            R = rows_at[:n1 * Kp * nt].reshape(n1, Kp, nt)
            np.multiply(np.take(codes, kl, axis=0).transpose(1, 2, 0), nt, out=R, dtype=np.intp)  # [n', Kp, nt]
            R += np.arange(nt)
            G = np.take(table.reshape(rows * nt, W), R, axis=0, out=terms[:n1 * Kp * ns].reshape(n1, Kp, nt, W),
                        mode="clip")
            d2 = np.add.reduce(G, axis=0, out=d2b[:Kp * ns].reshape(Kp, nt, W)).reshape(Kp, ns)  # C order
            m = np.min(d2, axis=0, out=least[:ns])
            np.less(m, _FLT_MAX, out=ok[sl])  # (no minimum, NaN: replaced below)
            eq = np.equal(d2, m, out=eqb[:Kp * ns].reshape(Kp, ns))
            eq = eq.view(np.int8) if Kp < 128 else eq
            k = np.max(np.multiply(eq, wd, out=eq if Kp < 128 else None), axis=0).astype(np.intp)  # Kp - first min
            k = np.subtract(np.repeat(kl * Kp + Kp, W), k)
            np.take(nbs, k, out=res[sl], mode="clip")
    fail = np.flatnonzero(~ok & (g >= 0))  # NaN, or nothing below FLT_MAX
    if len(fail):
        gf = g[fail]
        qf = q0 if qs is None else qv[qs[fail]].T
        res[fail] = _best_neighbours(grid, t.keys[tile_rank[fail // W]], xg[:, gf], wg[:, gf], ss[fail], qf)
    return [np.take(res, d) for d in dests]


def _slots(rank: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """A stable counting sort of one batch: rank i16[m] (keys 0..K-1), nxt intp[K] the next free slot per key
    (advanced past the batch) -> slot i32[m] = nxt[rank[i]] plus the number of earlier i' of the same rank.
    Batches of _SORT_BATCH stay in the cache; the radix sort is numpy's for 16-bit keys."""
    d = np.empty(len(rank), np.int32)
    d[np.argsort(rank.view(np.uint16), kind="stable")] = np.arange(len(rank), dtype=np.int32)  # in the sorted batch
    c = np.bincount(rank, minlength=len(nxt))
    d += np.take(nxt - (np.cumsum(c) - c), rank)
    nxt += c
    return d


def _best_neighbours(grid: _Grid, u: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray,
                     qv: np.ndarray) -> np.ndarray:
    """iq2/iq3_find_best_neighbour and iq1_find_best_neighbour2 for M groups at once.

    u i32[M] off-grid keys; x, w f32[n, M] the groups' values and weights; scale f32[M]; qv f32[nlev, M]
    (or [nlev, 1]) the value of each level -> grid index i32[M] of the first neighbour minimizing C's
    ``d2 += w*diff*diff`` (diff = scale*q - x, sequential over the n values, strict <).

    Every term ``(w*diff)*diff`` depends only on the group, the value i and its level, so they are computed
    once per group into a table [rows, M] whose first rows already hold C's running sums over the first
    ``prefix`` values for every level combination; a candidate's d2 is then n - prefix + 1 lookups and
    additions in C order. Raises where C aborts: a group without a distance below FLT_MAX (NaN, inf).
    """
    M = len(u)
    p, nlev, n = grid.prefix, grid.nlev, grid.n
    table = np.empty((grid.table_rows, M), F)
    head = np.empty((p, nlev, M), F)  # terms of the first p values
    level_x = scale * qv                                                                # [nlev, M]
    for dst, lo, hi in ((head, 0, p), (table[nlev**p:].reshape(n - p, nlev, M), p, n)):
        if hi > lo:  # dst [hi-lo, nlev, M] = (w*diff)*diff
            diff = np.subtract(level_x[None], x[lo:hi, None], out=np.empty(dst.shape, F))
            np.multiply(w[lo:hi, None], diff, out=dst)
            dst *= diff
    part = head[0]
    part += F(0)  # C starts d2 at +0
    for i in range(1, p):  # row of (l_0..l_i) = sum l_k nlev^k
        dst = table[:nlev**(i + 1)] if i == p - 1 else np.empty((nlev**(i + 1), M), F)
        np.add(part[None], head[i][:, None], out=dst.reshape(nlev, -1, M))
        part = dst
    if p == 1:
        table[:nlev] = part

    cnt = grid.nb_count[u].astype(np.intp)
    first = np.cumsum(cnt) - cnt                                                         # [M]
    T = int(first[-1] + cnt[-1])
    seg = np.repeat(np.arange(M, dtype=np.intp), cnt)                                   # [T] -> group
    pos = np.take(grid.nb_start[u] - first, seg)                                         # [T] into nb
    pos += np.arange(T)
    flat = table.reshape(-1)
    d2 = np.empty(T, F)
    term = np.empty(T, F)
    for c, codes in enumerate(_codes(grid.levels[np.take(grid.nb, pos)], nlev, p)):
        idx = codes.astype(np.intp) * M + seg
        np.take(flat, idx, out=term if c else d2, mode="clip")
        if c:
            d2 += term
    # the first minimum per group: the least int64 key (d2 as an ordered int in the high word, position low)
    rank = d2.view(np.int32)
    rank ^= (rank >> 31) & 0x7FFFFFFF  # negative floats (from negative weights) order below +0
    key = np.left_shift(rank, 32, dtype=np.int64)
    key |= np.arange(T)
    best = np.minimum.reduceat(key, first)
    hi = best >> 32
    if ((hi >= 0x7F7FFFFF) | (hi < -0x7F800001)).any():  # the least is FLT_MAX or more, or NaN
        raise RuntimeError("neighbour search found no distance below FLT_MAX")  # GGML_ASSERT in C
    best &= 0xFFFFFFFF
    return grid.nb[pos[best]].astype(np.int32)


def _keys(grid: _Grid, levels: np.ndarray) -> np.ndarray:
    """Levels i32[B, S] (element-major, overwritten) -> keys i32[B/n, S] of the groups of n values."""
    B, S = levels.shape
    levels <<= (grid.bits * (np.arange(B, dtype=np.int32) % grid.n))[:, None]
    return np.bitwise_or.reduce(levels.reshape(B // grid.n, grid.n, S), axis=1)


def _round_keys(grid: _Grid, xval: np.ndarray, idv: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Keys i32[B/n, S] of the levels clamp(nearest_int(0.5*(idv*xval - 1)), 0, nlev-1), computed in the
    int32 buffer ``levels`` [B, S]: v + 2*12582912 has the mantissa bits of C's 0.5*v + 12582912 (scaling
    by two is exact), so the 0.5 multiply is folded into the constant."""
    t = levels.view(F)
    np.multiply(xval, idv, out=t)
    t -= F(1)
    t += _MAGIC2
    levels &= 0x7FFFFF
    levels -= 0x400000
    np.clip(levels, 0, grid.nlev - 1, out=levels)
    return _keys(grid, levels)


def _group_major(a: np.ndarray, n: int) -> np.ndarray:
    """f32[B, S] -> [n, B/n*S]: column k*S + s is group k of sub-block s (the flat index of a group)."""
    B, S = a.shape
    return np.ascontiguousarray(a.reshape(B // n, n, S).transpose(1, 0, 2)).reshape(n, -1)


def _snap(name: str, u: np.ndarray, search: np.ndarray, scale: np.ndarray, xg: np.ndarray, wg: np.ndarray,
          qv: np.ndarray, qsel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keys u i32[..., k, S] -> (grid index i32[..., k, S], off bool[..., k, S]: the key is off the grid).

    Off-grid groups where ``search`` (bool, broadcast to u) get their best neighbour: scale f32[..., S] per
    sub-block, values and weights xg, wg f32[n, k*S] (_group_major; every leading index shares them), level
    values qv f32[V, nlev] with qsel i[k*S] (None: table 0). Other off-grid groups keep -1. The groups go to
    the search in batches of about _SORT_BATCH keys (whole tries, or parts of one), found from the mask
    when needed (group and scale from small tables, no integer division).
    """
    grid = _grid(name)
    gi = np.take(grid.kmap, u)
    off = gi < 0
    S, NG = u.shape[-1], u.shape[-1] * u.shape[-2]
    mask = np.logical_and(off, search).reshape(-1)
    t = _tiles(name)
    scf = np.ascontiguousarray(scale, dtype=F).reshape(-1, S)
    nt = len(scf)
    tb = max(1, _SORT_BATCH // NG)                                                     # tries per batch
    if tb > 1:
        spans = [(t0 * NG, min(t0 + tb, nt) * NG, t0) for t0 in range(0, nt, tb)]       # (first, end position, try)
    else:
        spans = [(t0 * NG + c0, t0 * NG + min(c0 + _SORT_BATCH, NG), t0) for t0 in range(nt)
                 for c0 in range(0, NG, _SORT_BATCH)]
    gtab = np.tile(np.arange(NG, dtype=np.int32), tb)                                  # position -> group
    stab = (np.arange(tb, dtype=np.int32)[:, None] * S + np.tile(np.arange(S, dtype=np.int32), NG // S)).reshape(-1)
    uf = u.reshape(-1)
    # per batch the ranks of its groups' keys (boolean indexing costs ~4 ns per position: flatnonzero and take)
    ranks = [np.take(t.rank, np.take(uf[p0:p1], np.flatnonzero(mask[p0:p1]))) for p0, p1, _ in spans]
    cnt = np.zeros(t.nkeys, np.intp)
    for r in ranks:
        cnt += np.bincount(r, minlength=t.nkeys)

    def batches():  # stretches of the flat positions: whole tries t0.., or a part of try t0
        for (p0, p1, t0), r in zip(spans, ranks):
            i = np.flatnonzero(mask[p0:p1])
            i += p0 - t0 * NG                                                            # from try t0's start
            gid = np.take(gtab, i)
            yield r, gid, np.take(scf[t0:].reshape(-1), np.take(stab, i)), None if qsel is None else qsel[gid]

    res = _neighbour_batches(name, cnt, batches(), xg, wg, qv, qsel is not None)
    gf = gi.reshape(-1)
    for (p0, p1, _), r in zip(spans, res):
        gf[p0 + np.flatnonzero(mask[p0:p1])] = r
    return gi, off


def _grid_values(table: np.ndarray, gi: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-value rows of grid points: table [G, n], gi i32[k, S] -> out [k*n, S] element-major."""
    k, S = gi.shape
    np.copyto(out.reshape(k, -1, S), np.take(table, gi, axis=0, mode="clip").transpose(0, 2, 1))
    return out


def _dot(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """C's ``s += a*b`` (or ``(a*b)*c``) over axis 0 of [n, B] -> f32[B], also for a lone block."""
    ops = (a, b) if c is None else (a, b, c)
    if a.shape[1] >= 2:
        return dot0(*ops, out=np.empty(a.shape[1], F))
    return seqsum(a * b if c is None else (a * b) * c)


# -------------------------------------------------------------------------------- shared per-type steps

class _PieceType(QuantType):
    """A type quantized superblock by superblock (rows are independent), in pieces of _CHUNK*chunks."""

    chunks = 1

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        R, N = rows.shape
        nbl = N // QK_K
        xs = np.ascontiguousarray(rows, dtype=F).reshape(R * nbl, QK_K)
        qw = None if imatrix is None else np.asarray(imatrix, dtype=F).reshape(nbl, QK_K)
        out = np.empty((R * nbl, cls.type_size()), np.uint8)
        step = _CHUNK * cls.chunks
        for t0 in range(0, R * nbl, step):
            t1 = min(t0 + step, R * nbl)
            out[t0:t1] = cls._quantize(xs[t0:t1], None if qw is None else qw[np.arange(t0, t1) % nbl])
        return out.reshape(R, nbl * cls.type_size())

    @classmethod
    def _quantize(cls, xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        """Superblocks f32[T, 256] (+ their imatrix columns f32[T, 256]) -> blocks u8[T, type_size]."""
        raise NotImplementedError


def _subblocks(xs: np.ndarray, qw: np.ndarray | None, sub: int, sigma_mul: int,
               plain: str = "x2") -> tuple[np.ndarray, np.ndarray]:
    """xs f32[T, 256] (+ qw) -> x, w f32[sub, S]: element-major sub-blocks of ``sub`` values, S = T*256/sub.

    With qw: w = qw*sqrt(sigma2 + x^2), sigma2 = sigma_mul*sum(x^2)/256 per superblock (sequential sum).
    Without: x^2 (plain "x2") or 0.25*sigma2 + x^2 ("iq2s").
    """
    x = element_major(xs.reshape(-1, sub))
    sigma2 = np.repeat(F(sigma_mul) * seqsum(element_major(xs * xs)) / F(QK_K), QK_K // sub)   # [S]
    if qw is not None:
        return x, element_major(qw.reshape(-1, sub)) * np.sqrt(sigma2 + x * x)
    return x, (x * x if plain == "x2" else F(0.25) * sigma2 + x * x)


def _signs(x: np.ndarray, w: np.ndarray, parity: bool) -> tuple[np.ndarray, np.ndarray]:
    """x, w f32[B, S] -> xval = |x| (C keeps -0.0) f32[B, S], sign codes u8[B/8, S] (bit i: value 8k+i < 0).

    ``parity`` (IQ2_XXS, IQ2_XS, IQ3_XXS store 7 bits, the 8th is the parity): a group of 8 with an odd
    number of negatives keeps the sign of its element with the smallest w*x*x (the first on ties; its
    xval turns negative) and that bit is toggled.
    """
    B, S = x.shape
    neg = ~(x >= 0)
    xval = np.abs(x)
    np.copyto(xval, x, where=x == 0)  # -0.0 >= 0: C keeps it
    neg8 = neg.reshape(B // 8, 8, S)
    signs = np.packbits(neg8, axis=1, bitorder="little")[:, 0]
    if parity:
        odd = np.logical_xor.reduce(neg8, axis=1)                                         # [B/8, S]
        ax = ((w * x) * x).reshape(B // 8, 8, S)
        low, imin = ax[:, 0].copy(), np.zeros((B // 8, S), np.int64)
        for i in range(1, 8):  # C's first minimum (strict <)
            lt = ax[:, i] < low
            np.copyto(low, ax[:, i], where=lt)
            imin[lt] = i
        flip = odd[:, None] & (np.arange(8)[:, None] == imin[:, None])                    # [B/8, 8, S]
        np.negative(xval, out=xval, where=flip.reshape(B, S))
        signs ^= np.where(odd, np.left_shift(1, imin), 0).astype(np.uint8)
        signs &= 127
    return xval, signs


def _superblock_scales(scales: np.ndarray, lmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scales f32[T, nsub] -> (has = max_scale > 0 bool[T], d = max_scale/(2*lmax+1) f32[T], l i64[T, nsub]).

    l = clamp(nearest_int(0.5*(s/d - 1)), 0, lmax) as the C superblock loops (meaningful where has).
    """
    max_scale = np.maximum(np.max(scales, axis=1), F(0))
    d = max_scale / F(2 * lmax + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(F(0.5) * ((F(1) / d)[:, None] * scales - F(1))), 0, lmax)
    return max_scale > 0, d, l.astype(np.int64)


def _rows(a: np.ndarray, T: int) -> np.ndarray:
    """Element-major data of the sub-blocks [m, S] -> [T, S/T*m], in the superblock's memory order."""
    return a.T.reshape(T, -1)


def _fields(values: np.ndarray, width: int) -> np.ndarray:
    """C's ``v |= values[j] << width*j`` over the last axis: int[..., m] -> int64[...]."""
    return (values.astype(np.int64) << (width * np.arange(values.shape[-1]))).sum(-1)


def _nibbles(ls: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Scale codes i64[T, 2m] -> u8[T, m] (even sub-block low, odd high); 0 where the superblock is zero."""
    return np.where(has[:, None], ls[:, 0::2] | (ls[:, 1::2] << 4), 0).astype(np.uint8)


def _front(a: np.ndarray, act: np.ndarray) -> np.ndarray:
    """[T, nsub, m] -> [T, nsub*m]: the written sub-blocks (act bool[T, nsub]) moved to the front, zeros
    after (IQ3_S advances its qs/signs pointers only past the sub-blocks it writes)."""
    T, nsub, m = a.shape
    slot = np.where(act, np.cumsum(act, axis=1) - 1, nsub)                               # nsub: dropped
    out = np.zeros((T, nsub + 1, m), a.dtype)
    out[np.arange(T)[:, None], slot] = a
    return out[:, :nsub].reshape(T, -1)


# ------------------------------------------------------------------------------ IQ2_XXS/XS/S, IQ3_XXS/S

class _GridType(_PieceType):
    """quantize_row_{iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s}_impl: one scale per sub-block, searched over tries
    id = (2*nlev - 1 + step*is)/max (IQ2_XXS: /(nlev*make_qp scale)), each snapping the groups to the grid
    (off-grid ones to their best neighbour) and scoring sum(w*x*q)^2/sum(w*q*q); then a re-snap at the
    winning scale and a refit."""

    grid: str
    sub: int                 # values per sub-block
    sigma_mul: int           # sigma2 = sigma_mul*sum(x^2)/256
    plain = "x2"             # weights without an imatrix (see _subblocks)
    parity: bool             # 7-bit even-parity sign codes instead of sign bytes
    eps: np.float32 | None   # max < eps: nothing written; None: ``if (!max)``
    nsteps: int              # is = -nsteps..nsteps
    step: float
    resnap: str              # re-snap "all" groups, the "offgrid" ones, or "all_if_offgrid" (any is)
    qp_start = False         # IQ2_XXS: start from make_qp_quants(n, nlev+1) instead of max/(2*nlev-1)

    @classmethod
    def _quantize(cls, xs, qw):
        T = len(xs)
        x, w = _subblocks(xs, qw, cls.sub, cls.sigma_mul, cls.plain)                     # [sub, S]
        xval, signs = _signs(x, w, cls.parity)
        scale, gi, act = cls._search(xval, w)
        signs ^= np.where(scale < 0, 127 if cls.parity else 255, 0).astype(np.uint8)     # C flips sign and codes
        signs *= act
        has, d, ls = _superblock_scales(np.abs(scale).reshape(T, -1), 15)
        return cls._bytes(has, d, ls, _rows(gi, T), _rows(signs, T), act.reshape(T, -1))

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act) -> np.ndarray:
        """has bool[T] (max_scale > 0), d f32[T] (max_scale/31), ls i64[T, nsub] scale codes, gi i32[T, 256/n]
        grid indices, signs u8[T, 32] sign codes, act bool[T, nsub] (sub-blocks C writes) -> u8[T, type_size]."""
        raise NotImplementedError

    @classmethod
    def _search(cls, xval: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """xval, w f32[B, S] -> (scale f32[S] (negative: the caller flips the signs), grid indices
        i32[B/n, S], act bool[S]: the sub-blocks C writes; the others get scale 0 and index 0).

        The tries are independent up to the selection: the keys of every try are rounded first and their
        off-grid groups searched in one ``_snap``; the selection then runs over per-sub-block sums and
        keeps the winning try's index, whose grid indices and off-grid flags feed the re-snap.
        """
        grid = _grid(cls.grid)
        B, S = xval.shape
        n = grid.n
        k = B // n
        wx = w * xval
        xg, wg = _group_major(xval, n), _group_major(np.sqrt(w), n)                       # C's waux = sqrt(w)
        odd = (2 * np.arange(grid.nlev) + 1).astype(F)[None]                              # [1, nlev]: q of each level
        mx = np.max(xval, axis=0)
        act = (mx != 0) if cls.eps is None else ~(mx < cls.eps)
        top = F(2 * grid.nlev - 1)
        if cls.qp_start:
            scale0 = make_qp_quants(xval, grid.nlev + 1, w)[0]
            den = scale0 * F(grid.nlev)
            act &= den > 0
        else:
            den, scale0 = mx, mx / top
        levels, q = np.empty((B, S), np.int32), np.empty((B, S), F)

        def fit(gi):
            """C's sum (w*x)*q, sum (w*q)*q over the sub-block, q = 2l+1 of the grid points gi."""
            _grid_values(grid.odd, gi, q)
            return dot0(wx, q, out=np.empty(S, F)), dot0(w, q, q, out=np.empty(S, F))

        steps = np.arange(-cls.nsteps, cls.nsteps + 1).astype(F)
        nt = len(steps)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            idv = (top + steps[:, None] * F(cls.step)) / den                              # [nt, S]
            keys = np.empty((nt, k, S), np.int32)
            for t in range(nt):
                keys[t] = _round_keys(grid, xval, idv[t], levels)
            gis, offs = _snap(cls.grid, keys, act, F(1) / idv, xg, wg, odd)              # every try at once
            best, scale, win = np.zeros(S, F), scale0.copy(), np.full(S, -1, np.intp)
            for t in range(nt):
                sumqx, sumq2 = fit(gis[t])
                take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                this = sumqx / sumq2
                scale = np.where(take, this, scale)
                best = np.where(take, this * sumqx, best)
                win[take] = t
            cols = np.arange(S)
            tried = win >= 0
            gi = np.where(tried, gis[win, :, cols].T, grid.kmap[0])                       # C's L = 0 (memset)
            off = np.where(tried, offs[win, :, cols].T, cls.resnap == "all_if_offgrid")
            redo = act & (scale > 0)
            if cls.resnap == "offgrid":
                redo = off & redo
            elif cls.resnap == "all_if_offgrid":
                redo = off.any(0) & redo
            redo = np.broadcast_to(redo, (k, S))
            if redo.any():  # re-snap at id = 1/scale, neighbours at scale, then refit
                g2 = _snap(cls.grid, _round_keys(grid, xval, F(1) / scale, levels), redo, scale, xg, wg, odd)[0]
                gi = np.where(redo, g2, gi)
                sumqx, sumq2 = fit(gi)
                scale = np.where(redo.any(0) & (sumq2 > 0), sumqx / sumq2, scale)
        return np.where(act, scale, F(0)), np.where(act, gi, 0), act


@register
class IQ2_XXS(_GridType):
    """66 B: d, then per 32 values u32 (4 grid bytes) and u32 (4 x 7-bit sign codes | scale << 28)."""

    qtype = GGMLQuantizationType.IQ2_XXS
    imatrix = "required"
    grid, sub, sigma_mul, parity = "iq2xxs", 32, 1, True
    eps, nsteps, step, resnap, qp_start = GROUP_MAX_EPS, 6, 0.1, "all", True
    chunks = 2

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act):
        T = len(d)
        words = np.stack([_fields(gi.reshape(T, 8, 4), 8), _fields(signs.reshape(T, 8, 4), 7) | (ls << 28)], -1)
        words = np.where(has[:, None, None], words, 0).astype("<u4").reshape(T, 16)
        return np.concatenate([fp16_bytes(np.where(has, d, F(0))), words.view(np.uint8)], axis=1)


@register
class IQ2_XS(_GridType):
    """74 B: d, qs u16[32] (9-bit grid index | 7-bit sign code << 9), scales[8] (a nibble per 16 values)."""

    qtype = GGMLQuantizationType.IQ2_XS
    imatrix = "required"
    grid, sub, sigma_mul, parity = "iq2xs", 16, 1, True
    eps, nsteps, step, resnap = GROUP_MAX_EPS, 9, 0.1, "offgrid"
    chunks = 2

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act):
        qs = np.where(has[:, None], gi | (signs.astype(np.int32) << 9), 0).astype("<u2")
        return np.concatenate([fp16_bytes(np.where(has, d, F(0))), qs.view(np.uint8), _nibbles(ls, has)], axis=1)


@register
class IQ2_S(_GridType):
    """82 B: d, qs[32] (grid index low bytes), signs[32], qh[8] (2 high bits per group), scales[8].

    ggml quantizes IQ2_S without an imatrix too (w = 0.25*sigma2 + x^2); llama-quantize demands one.
    """

    qtype = GGMLQuantizationType.IQ2_S
    imatrix = "optional"
    grid, sub, sigma_mul, plain, parity = "iq2s", 16, 2, "iq2s", False
    eps, nsteps, step, resnap = GROUP_MAX_EPS_IQ2_S, 9, 0.1, "offgrid"
    chunks = 2

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act):
        T = len(d)
        parts = [fp16_bytes(np.where(has, d * F(0.9875), F(0))), gi & 255, signs,
                 _fields((gi >> 8).reshape(T, 8, 4), 2), _nibbles(ls, has)]
        return np.concatenate([p.astype(np.uint8) for p in parts], axis=1)


@register
class IQ3_XXS(_GridType):
    """98 B: d, qs[64] (a grid index per 4 values), then per 32 values u32 (4 x 7-bit sign codes | scale << 28)."""

    qtype = GGMLQuantizationType.IQ3_XXS
    imatrix = "optional"
    grid, sub, sigma_mul, parity = "iq3xxs", 32, 2, True
    eps, nsteps, step, resnap = GROUP_MAX_EPS_IQ3_XXS, 15, 0.2, "offgrid"

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act):
        T = len(d)
        ss = np.where(has[:, None], _fields(signs.reshape(T, 8, 4), 7) | (ls << 28), 0).astype("<u4")
        qs = np.where(has[:, None], gi, 0).astype(np.uint8)
        return np.concatenate([fp16_bytes(np.where(has, d * F(1.0125), F(0))), qs, ss.view(np.uint8)], axis=1)


@register
class IQ3_S(_GridType):
    """110 B: d, qs[64] (grid index low bytes), qh[8] (high bits), signs[32], scales[4]."""

    qtype = GGMLQuantizationType.IQ3_S
    imatrix = "optional"
    grid, sub, sigma_mul, parity = "iq3s", 32, 2, False
    eps, nsteps, step, resnap = None, 9, 0.2, "all_if_offgrid"

    @classmethod
    def _bytes(cls, has, d, ls, gi, signs, act):
        T = len(d)
        parts = [fp16_bytes(np.where(has, d * F(1.033), F(0))), _front((gi & 255).reshape(T, 8, 8), act),
                 _fields((gi >> 8).reshape(T, 8, 8), 1), _front(signs.reshape(T, 8, 4), act), _nibbles(ls, has)]
        return np.concatenate([p.astype(np.uint8) for p in parts], axis=1)


# ----------------------------------------------------------------------------------------- IQ1_S, IQ1_M

_XX = np.array([[-0.875, 0.125, 1.125], [-1.125, -0.125, 0.875]], F)  # C's x_p, x_m: -1, 0, 1 +- delta 0.125


_SPLIT_COLS = 4096  # sub-blocks per step of the IQ1 split search
_NEAR = F(1 - 2.0**-12)  # candidates scoring at least this fraction of the best score are replayed (_scan)
_GAP = F(1 - 2.0**-19)  # ... and none may score in [_GAP, 1) times that threshold
_MAX_TAKES = 6  # takes among the replayed candidates that the bound of _scan allows


def _replay(c, s, qx, q2, S: int, scale0: np.ndarray):
    """C's selection loop over the given candidates (candidate index c, sub-block s, sumqx, sumq2; sorted by
    c), the j-th candidate of every sub-block in one step, from best = -FLT_MAX -> (scale, index of the last
    candidate taken or -1, number of takes) per sub-block."""
    best = np.full(S, -np.finfo(F).max, F)
    scale, arg, takes = scale0.copy(), np.full(S, -1, np.int32), np.zeros(S, np.int32)
    order = np.argsort(s.astype(np.uint16) if S <= 65536 else s, kind="stable")         # by sub-block, then c
    c, s, qx, q2 = c[order], s[order], qx[order], q2[order]
    cnt = np.bincount(s, minlength=S)
    j = np.arange(len(s)) - np.repeat(np.cumsum(cnt) - cnt, cnt)                          # rank in the sub-block
    by_j = np.argsort(j.astype(np.uint16) if cnt.max(initial=0) <= 65536 else j, kind="stable")
    lo = 0
    for hi in np.cumsum(np.bincount(j)).tolist():
        sel = by_j[lo:hi]
        lo = hi
        ss, x, y = s[sel], qx[sel], q2[sel]
        take = (y > 0) & (x * x > best[ss] * y)
        if take.any():
            ss, x, y = ss[take], x[take], y[take]
            sc = x / y
            scale[ss] = sc
            best[ss] = sc * x
            arg[ss] = c[sel][take]
            takes[ss] += 1
    return scale, arg, takes


def _collect(blocks, S: int, thr: np.ndarray | None):
    """One pass over candidate blocks (sumqx, sumq2 f32[r, S]) in C order -> the candidates whose score
    (sumqx/sumq2)*sumqx is at least thr f32[S] (None: just below (G*_NEAR)*_GAP for the running largest score
    G, a superset of the candidates at least that for the final G) as (index, sub-block, score, sumqx, sumq2),
    and the largest score per sub-block (NaN ignored; -inf if none)."""
    G = np.full(S, -np.inf, F)
    found, c0, buf, hit = [], 0, None, None
    lim = np.empty(S, F) if thr is None else thr
    for block in blocks:  # (sumqx, sumq2[, scratch f32[>= r, S] free until the next block])
        qx, q2 = block[:2]
        r = len(qx)
        if hit is None or len(hit) < r:
            hit = np.empty((r, S), bool)
        if len(block) < 3 and (buf is None or len(buf) < r):
            buf = np.empty((r, S), F)
        score = np.divide(qx, q2, out=(block[2] if len(block) > 2 else buf)[:r])
        score *= qx
        np.fmax(G, np.fmax.reduce(score, axis=0), out=G)
        if thr is None:  # one ulp below _scan's first threshold (G*_NEAR)*_GAP, whatever G's range
            np.nextafter(np.multiply(G, _NEAR, out=lim) * _GAP, -np.inf, out=lim)
        idx = np.flatnonzero(np.greater_equal(score, lim, out=hit[:r]))
        found.append((idx + c0 * S, qx.reshape(-1)[idx], q2.reshape(-1)[idx]))
        c0 += r
    idx, qx, q2 = (np.concatenate(a) for a in zip(*found))
    c, s = np.divmod(idx, S)
    return (c, s, (qx / q2) * qx, qx, q2), G  # the same score, one call for all blocks


def _collect_steps(blocks_of, cols: np.ndarray | None, S: int, thr: np.ndarray | None, step: int):
    """``_collect`` over the sub-blocks cols (None: all S) in steps of ``step``, so that a step's candidate
    blocks stay small -> as _collect, with sub-block indices into cols."""
    n = S if cols is None else len(cols)
    found, Gs = [], []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        (c, s, r, qx, q2), G = _collect(blocks_of(slice(c0, c1) if cols is None else cols[c0:c1]), c1 - c0,
                                        None if thr is None else thr[c0:c1])
        found.append((c, s + c0, r, qx, q2))
        Gs.append(G)
    return tuple(np.concatenate(a) for a in zip(*found)), np.concatenate(Gs)


def _scan(blocks_of, S: int, scale0: np.ndarray, exact: np.ndarray, step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """C's ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2; best = scale*sumqx; }`` with
    best = -FLT_MAX, over the candidates of blocks_of(cols) (blocks of sumqx, sumq2 f32[r, m] in C order for
    the sub-blocks cols: a slice or m indices, at most ``step``, default _SPLIT_COLS) -> (scale f32[S], index
    i32[S] of the last candidate taken, -1 if none). Every pass runs in column steps (``_collect_steps``);
    the few sub-blocks that need another pass are gathered over all steps, so a pass costs its per-call
    overhead once per step of sub-blocks that need it.

    Pruned, exactly: a take sets best to the candidate's score r = (sumqx/sumq2)*sumqx, and C's test passes
    only for r above best to within a few ulps. With G the largest r of the sub-block and T = _NEAR*G,
    every candidate below T*_GAP fails once a candidate above T has been taken (takes lower best by a few
    ulps each: up to _MAX_TAKES keep it above T*_GAP), and the first candidate above T passes whatever the
    earlier ones did. So C's loop is replayed only over the candidates above T. Sub-blocks with a candidate
    in [T*_GAP, T) or more takes try a lower T, then replay every candidate, as do those where ``exact``
    (negative weights: r can be negative) or G is not finite.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _scan_pruned(blocks_of, S, scale0, exact, step or _SPLIT_COLS)


def _scan_pruned(blocks_of, S: int, scale0: np.ndarray, exact: np.ndarray,
                 step: int) -> tuple[np.ndarray, np.ndarray]:
    (c, s, r, qx, q2), G = _collect_steps(blocks_of, None, S, None, step)
    scale, arg = scale0.copy(), np.full(S, -1, np.int32)
    todo = np.arange(S)
    for attempt in range(3):
        T = G * F(_NEAR ** (2 ** attempt)) if attempt < 2 else np.full(len(todo), -np.inf, F)
        bad = ~(G < np.inf) | exact[todo] if attempt < 2 else np.zeros(len(todo), bool)
        bad[s[(r >= T[s] * _GAP) & ~(r >= T[s])]] = True                                 # in the gap
        near = r >= T[s]
        sc, ar, takes = _replay(c[near], s[near], qx[near], q2[near], len(todo), scale0[todo])
        if attempt < 2:
            bad |= takes > _MAX_TAKES
        ok = ~bad
        scale[todo[ok]], arg[todo[ok]] = sc[ok], ar[ok]
        if ok.all():
            break
        cols = np.flatnonzero(bad)
        todo, G = todo[cols], G[cols]
        thr = np.full(len(todo), -np.inf, F) if attempt == 1 else (G * F(_NEAR ** (2 ** (attempt + 1)))) * _GAP
        (c, s, r, qx, q2), _ = _collect_steps(blocks_of, todo, S, thr, step)
    return scale, arg


def _prefix(a: np.ndarray) -> np.ndarray:
    """C's ``s[0] = 0; s[j+1] = s[j] + a[j]`` over axis 0: f32[n, S] -> [n+1, S] (a loop of whole rows:
    numpy's accumulate along axis 0 is many times slower)."""
    out = np.empty((len(a) + 1,) + a.shape[1:], F)
    out[0] = 0
    for j in range(len(a)):
        np.add(out[j], a[j], out=out[j + 1])
    return out


def _split_table(n: int, masks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IQ1 candidates in C order (``for i1 <= n: for i2 = i1..n: for each delta mask``): i1, i2, mask."""
    i1, i2 = np.triu_indices(n + 1)
    return np.repeat(i1, len(masks)), np.repeat(i2, len(masks)), np.tile(masks, len(i1))


class _OneBitType(_PieceType):
    """quantize_row_iq1_{s,m}_impl: per sub-block the values are sorted and every split into the levels
    -1, 0, 1 (+ or - delta) is scored from prefix sums; the best is snapped to the grid in groups of 8
    (off-grid groups to their best neighbour, scored with the same level values) and refitted."""

    sub: int
    eps: np.float32
    splits: tuple[np.ndarray, np.ndarray, np.ndarray]  # _split_table; mask bit g: group g uses -delta
    chunks = 4  # few off-grid groups per piece: bigger pieces share the neighbour search's tiles
    split_mul = 1  # split search steps of _SPLIT_COLS * split_mul sub-blocks

    @classmethod
    def _quantize(cls, xs, qw):
        T = len(xs)
        x, w = _subblocks(xs, qw, cls.sub, 2)                                            # [sub, S]
        scale, mask, gi = cls._search(x, w)
        has, d, ls = _superblock_scales(scale.reshape(T, -1), 7)
        return cls._bytes(has, d, ls, _rows(gi, T), mask.reshape(T, -1), x, w)

    @classmethod
    def _bytes(cls, has, d, ls, gi, mask, x, w) -> np.ndarray:
        """has bool[T], d f32[T] (max_scale/15), ls i64[T, nsub], gi i32[T, 256/8], delta masks i64[T, nsub],
        x, w f32[sub, S] -> u8[T, type_size]."""
        raise NotImplementedError

    @classmethod
    def _scores(cls, wx: np.ndarray, w: np.ndarray, order: np.ndarray):
        """Sorted w*x and w f32[sub, S], order i64[sub, S] -> blocks of (sumqx, sumq2) f32[r, S] in C order."""
        raise NotImplementedError

    @classmethod
    def _search(cls, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, w f32[B, S] -> (scale f32[S], delta mask i64[S], grid indices i32[B/8, S]); sub-blocks that C
        skips get 0, 0, 0."""
        grid = _grid("iq1s")
        B, S = x.shape
        k = B // 8
        mx = np.max(np.abs(x), axis=0)
        order = np.argsort(x, axis=0, kind="stable")  # C's qsort (glibc's is a stable merge sort)
        wxs, ws = np.take_along_axis(w * x, order, 0), np.take_along_axis(w, order, 0)
        exact = (w < 0).any(axis=0)

        # only the sub-blocks C searches: in an all-zero one every split ties, and _scan would replay them all
        # (a mostly-zero matrix, such as a constructed eh_proj, took ~108 MiB and 5x the time per piece)
        live = np.flatnonzero(~(mx < cls.eps))
        lw, lws, lo = (np.ascontiguousarray(a[:, live]) for a in (wxs, ws, order))

        def blocks_of(cols):
            return cls._scores(lw[:, cols], lws[:, cols], lo[:, cols])

        scale, arg = np.zeros(S, F), np.full(S, -1, np.int32)
        if live.size:
            scale[live], arg[live] = _scan(blocks_of, live.size, mx[live], exact[live], _SPLIT_COLS * cls.split_mul)
        found = ~(mx < cls.eps) & (arg >= 0)
        i1, i2, masks = (a[np.where(found, arg, 0)] for a in cls.splits)
        L = np.empty((B, S), np.int32)  # L[order[j]] = 0 for j < i1, 1 for j < i2, else 2
        j = np.arange(B)[:, None]
        np.put_along_axis(L, order, (j >= i1).astype(np.int32) + (j >= i2), axis=0)
        flip = scale < 0  # C mirrors the levels and the deltas
        L = np.where(flip, 2 - L, L)
        scale = np.abs(scale)
        mask = masks ^ np.where(flip, (1 << k) - 1, 0)
        minus = (mask >> np.arange(k)[:, None]) & 1                                       # [k, S]
        gi, off = _snap("iq1s", _keys(grid, L), found, scale, _group_major(x, 8), _group_major(w, 8), _XX,
                        minus.reshape(-1))
        values = _XX[:, grid.levels].reshape(-1, 8)                                       # [2G, 8]
        q = _grid_values(values, gi + minus * len(grid.levels), np.empty((B, S), F))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            sqx, sq2 = _dot(w, q, x), _dot(w, q, q)
            scale = np.where(off.any(0) & (sqx > 0) & (sq2 > 0), sqx / sq2, scale)
        return np.where(found, scale, F(0)), np.where(found, mask, 0), np.where(found, gi, 0)


@register
class IQ1_S(_OneBitType):
    """50 B: d, qs[32] (grid index low bytes), qh u16[8] (3 high bits per group | scale << 12 | minus << 15)."""

    qtype = GGMLQuantizationType.IQ1_S
    imatrix = "required"
    sub, eps = 32, GROUP_MAX_EPS_IQ1_S
    splits = _split_table(32, [0, 15])  # x_p, then x_m for all four groups

    @classmethod
    def _scores(cls, wx, w, order):
        """The three runs of sorted values (sums a, b, c of w*x) give sumqx = a*x0 + b*x1 + c*x2 and, with
        the sums of w, sumq2 = a*x0*x0 + b*x1*x1 + c*x2*x2 (x_p then x_m); one block per i1."""
        (p0, p1, p2), (m0, m1, m2) = _XX
        S = w.shape[1]
        sx, sw = _prefix(wx), _prefix(w)                                                   # [33, S]
        c = np.subtract(sx[-1], sx)                                                        # sums of the c run
        cxp, cxm = c * p2, c * m2
        cwp, cwm = (np.subtract(sw[-1], sw, out=c) * p2) * p2, (c * m2) * m2
        del c
        qx, q2, t, u = np.empty((66, S), F), np.empty((66, S), F), np.empty((33, S), F), np.empty((33, S), F)
        for a in range(33):
            r = 33 - a
            axp, axm, awp, awm = sx[a] * p0, sx[a] * m0, (sw[a] * p0) * p0, (sw[a] * m0) * m0  # sx[a] - sx[0] = sx[a]
            tb = np.subtract(sx[a:], sx[a], out=t[:r])
            tb *= p1  # b*x1; x_m[1] = -x_p[1], so b*m1 = -tb and (bw*m1)*m1 = (bw*p1)*p1 exactly
            ub = np.subtract(sw[a:], sw[a], out=u[:r])
            ub *= p1
            ub *= p1
            X, Q = qx[:2 * r].reshape(r, 2, S), q2[:2 * r].reshape(r, 2, S)
            np.add(axp, tb, out=X[:, 0])
            X[:, 0] += cxp[a:]
            np.subtract(axm, tb, out=X[:, 1])
            X[:, 1] += cxm[a:]
            np.add(awp, ub, out=Q[:, 0])
            Q[:, 0] += cwp[a:]
            np.add(awm, ub, out=Q[:, 1])
            Q[:, 1] += cwm[a:]
            yield qx[:2 * r], q2[:2 * r]

    @classmethod
    def _bytes(cls, has, d, ls, gi, mask, x, w):
        T = len(d)
        code = np.where(has[:, None], (ls | np.where(mask != 0, 8, 0)) << 12, 0)
        qh = (_fields((gi >> 8).reshape(T, 8, 4), 3) | code).astype("<u2")
        return np.concatenate([fp16_bytes(np.where(has, d * F(1.125), F(0))), (gi & 255).astype(np.uint8),
                               qh.view(np.uint8)], axis=1)


@register
class IQ1_M(_OneBitType):
    """56 B: qs[32] (grid index low bytes), qh[16] (per group 3 high bits | minus << 3), scales u16[4]
    (3-bit scales; the fp16 superblock scale spread over their top nibbles).

    ggml quantizes IQ1_M without an imatrix too (w = x^2); llama-quantize demands one.
    """

    qtype = GGMLQuantizationType.IQ1_M
    imatrix = "optional"
    sub, eps = 16, GROUP_MAX_EPS_IQ1_M
    splits = _split_table(16, [0, 2, 1, 3])  # C's k = 0..3: (+,+) (+,-) (-,+) (-,-) for the two groups
    split_mul = 2  # twice the sub-blocks of IQ1_S per piece; its steps pay ~5% per-call overhead at 4096

    @classmethod
    def _scores(cls, wx, w, order):
        """C's prefix sums per half (the sorted values of group h): as x1 - x0 = x2 - x1 = 1, half h of a
        split scores sumqx_h = T_h*x2 - (P_h[i1] + P_h[i2]), sumq2_h = W_h*x2*x2 + Q_h[i1]*c1 + Q_h[i2]*c2;
        the four candidates add the halves' x_p/x_m terms. One block per i1."""
        S = w.shape[1]
        halves = []  # per half: prefix sums of w*x; per level set v (axis -2): T*x2, W*x2*x2 + pw*c1, pw*c2
        for h in (0, 1):
            mine = (order >= 8) == h
            px, pw = _prefix(wx * mine), _prefix(w * mine)  # [17, S] (x*0 = -0 for negative x: adds nothing)
            tx = np.stack([px[16] * v2 for _, _, v2 in _XX])                                  # [2, S]
            e1 = np.stack([(pw[16] * v2) * v2 + pw * (v0 * v0 - v1 * v1) for v0, v1, v2 in _XX], axis=1)
            e2 = np.stack([pw * (v1 * v1 - v2 * v2) for v0, v1, v2 in _XX], axis=1)           # [17, 2, S]
            halves.append((px, tx, e1, e2))
        QX, Q2 = np.empty((68, S), F), np.empty((68, S), F)
        sx = np.empty((17, 1, S), F)
        part = np.empty((2, 17, 2, S), F)  # [half, i2, level set]: the halves' sumqx, then their sumq2
        for a in range(17):
            r = 17 - a
            for h, (px, tx, _, _) in enumerate(halves):
                np.add(px[a], px[a:], out=sx[:r, 0])
                np.subtract(tx, sx[:r], out=part[h, :r])
            np.add(part[0, :r, :, None], part[1, :r, None], out=QX[:4 * r].reshape(r, 2, 2, S))  # k = 2*v0 + v1
            for h, (_, _, e1, e2) in enumerate(halves):
                np.add(e1[a], e2[a:], out=part[h, :r])
            np.add(part[0, :r, :, None], part[1, :r, None], out=Q2[:4 * r].reshape(r, 2, 2, S))
            yield QX[:4 * r], Q2[:4 * r], part.reshape(-1, S)  # part: scratch for _collect until the next block

    @classmethod
    def _bytes(cls, has, d, ls, gi, mask, x, w):
        T = len(d)
        # C refits d over the whole superblock with the stored levels, sequentially over its 256 values
        minus = np.stack([mask & 1, mask >> 1], axis=-1)                                  # [T, 16, 2]
        q = _XX[minus[..., None], _grid("iq1s").levels[gi.reshape(T, 16, 2)]]            # [T, 16, 2, 8]
        q = element_major((q.reshape(T, 16, 16) * (2 * ls[:, :, None] + 1).astype(F)).reshape(T, 256))
        wt, xt = element_major(_rows(w, T)), element_major(_rows(x, T))                   # [256, T]
        with np.errstate(divide="ignore", invalid="ignore"):
            sqx, sq2 = _dot(wt, q, xt), _dot(wt, q, q)
            d = np.where(sq2 > 0, sqx / sq2, d)
        s16 = fp16_bytes(d * F(1.1125)).view("<u2")[:, 0].astype(np.int64)
        sc = _fields(ls.reshape(T, 4, 4), 3)
        sc |= np.stack([(s16 & 0x000F) << 12, (s16 & 0x00F0) << 8, (s16 & 0x0F00) << 4, s16 & 0xF000], axis=1)
        gi = gi.reshape(T, 16, 2)
        qh = (gi[..., 0] >> 8) | ((gi[..., 1] >> 8) << 4)
        qh |= np.where(has[:, None], ((mask & 1) << 3) | ((mask >> 1) << 7), 0)  # C's masks[k]
        return np.concatenate([(gi & 255).astype(np.uint8).reshape(T, 32), qh.astype(np.uint8),
                               np.where(has[:, None], sc, 0).astype("<u2").view(np.uint8)], axis=1)
