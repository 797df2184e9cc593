"""Shared helper algorithms of ggml's quantizers (ggml-quants.c), vectorized across blocks, bit-exact.

Layout convention: **element-major**. Every block-wise function takes ``x`` shaped ``[n, *batch]``: axis 0 is
the element index inside one block (16, 32, ...), the trailing axes index the blocks (any shape, e.g.
``[rows, blocks_per_row]``). Per-block results are shaped ``[*batch]``, per-element ones ``[n, *batch]``.
Weight arrays may be any shape that broadcasts against ``x`` (e.g. an imatrix slice ``[n, 1, S]``).
``element_major`` turns ``[*batch, n]`` blocks into that layout.

Why element-major: C accumulates ``s += term`` strictly in element order. ``np.add.reduce`` over axis 0 of a
C-contiguous array with two or more blocks adds whole rows one after another, i.e. exactly that order,
while a reduction over the contiguous axis (or over a lone block) is pairwise and breaks bit-exactness;
``seqsum`` handles every case.

Float rules (spec section 1): float32 everywhere, C operation order (``w*x*l`` is ``(w*x)*l``), every
literal a float32, no FMA. Integer temporaries that C stores in narrow types wrap like C.

Speed: the long searches (make_qx_quants, make_qkx2_quants) run on cache-sized pieces of the batch
(``_PIECE`` values), reuse their temporaries in place, keep only per-block scalars per step and select them
branch-free (``_blend``); a product summed over a block is one einsum pass (``dot0``, sequential like C).
The searches return the winning parameters (``make_qx_search``, ``make_qkx_search``); the K-quants need
the search-stage levels only for sub-blocks whose quantized scale is 0 (``qx_levels``, ``qkx_levels``).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

GROUP_MAX_EPS = F32(1e-15)
GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
GROUP_MAX_EPS_IQ1_M = F32(1e-7)
GROUP_MAX_EPS_IQ1_S = F32(1e-12)

_MAGIC = F32(12582912.0)  # 1.5 * 2^23, nearest_int's rounding constant
_SAFE_RINT = F32(2**21)  # |v| below this: np.rint(v) == nearest_int(v) (exact for |v| < 2^22)
_clip = getattr(np._core.umath, "clip", np.clip)  # the ufunc itself: np.clip adds ~3 us of Python per call
QKX_PIECES = 3  # make_qkx runs ~25 per-block calls per step: pieces of 3*_PIECE amortize them (2.73 vs 2.88 ns/value/step)
_PIECE = 1 << 16  # values per piece of the search loops (temporaries of 256 KiB stay in L2)


def element_major(blocks: np.ndarray) -> np.ndarray:
    """``[*batch, n]`` (blocks of n consecutive values) -> C-contiguous ``[n, *batch]``."""
    return np.ascontiguousarray(np.moveaxis(blocks, -1, 0))


def seqsum(a: np.ndarray, from_first: bool = False) -> np.ndarray:
    """C's ``float s = 0; for (i) s += a[i];`` over axis 0: ``[n, *batch] -> [*batch]``.

    ``from_first``: C's ``float s = a[0]; for (i = 1..) s += a[i];`` instead (differs only in the sign of
    an all-zero sum). ``np.add.reduce`` over axis 0 of a C-contiguous array with >= 2 blocks adds whole rows
    in order; with a single block (or another layout) numpy may reduce along the fast axis pairwise, so
    those go through an explicit loop / a contiguous copy.
    """
    if a.ndim == 1 or a[0].size == 1:
        acc = a[0].copy() if from_first else np.zeros(a.shape[1:], F32) + a[0]
        for row in a[1:]:
            acc = acc + row
        return acc
    a = np.ascontiguousarray(a)
    return np.add.reduce(a, axis=0) if from_first else np.add.reduce(a, axis=0, initial=F32(0))


def _einsum_is_sequential() -> bool:
    """Whether ``np.einsum('ij,ij->j')`` (and the three-operand form) is C's ``s += a[i]*b[i]`` loop.

    NumPy's baseline einsum kernels multiply, then add, row after row; a build whose kernels use FMA or
    another order would differ in the last bit of most of these random 16-term sums (~60% with FMA).
    """
    # generic floats from a sine hash, not numpy.random (whose import is ~6 MB of RSS in every worker process)
    a, b, c = (np.sin(np.arange(k * 16 * 257, (k + 1) * 16 * 257) * 12.9898).astype(F32).reshape(16, 257) * F32(97)
               for k in range(3))
    s2 = np.zeros(257, F32)
    s3 = np.zeros(257, F32)
    for i in range(16):
        s2 = s2 + a[i] * b[i]
        s3 = s3 + (a[i] * b[i]) * c[i]
    return np.array_equal(np.einsum("ij,ij->j", a, b), s2) and np.array_equal(np.einsum("ij,ij,ij->j", a, b, c), s3)


_SEQUENTIAL_EINSUM = _einsum_is_sequential()
# np.einsum's C core without its Python wrapper (~0.7 us less per call in the search loops)
_c_einsum = getattr(np._core.multiarray, "c_einsum", np.einsum)


def dot0(*ops: np.ndarray, out: np.ndarray | None = None, tmp: np.ndarray | None = None) -> np.ndarray:
    """C's ``float s = 0; for (i) s += a[i]*b[i]`` (or ``(a[i]*b[i])*c[i]``) over axis 0 of C-contiguous
    [n, B >= 2] arrays -> [B], in one pass when einsum is sequential (probed at import), else as
    multiply(s) into ``tmp`` (or a new array) and a row-by-row reduction."""
    if _SEQUENTIAL_EINSUM:
        out = np.empty(ops[0].shape[1:], F32) if out is None else out
        return _c_einsum("ij,ij->j" if len(ops) == 2 else "ij,ij,ij->j", *ops, out=out)
    t = np.multiply(ops[0], ops[1], out=tmp)
    for o in ops[2:]:
        np.multiply(t, o, out=t)
    return np.add.reduce(t, axis=0, initial=F32(0), out=out)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` exactly, int32: round half to even for |v| < 2^22, C's bit garbage beyond.

    C adds 12582912.0f and reinterprets the float's bits; np.rint agrees only for |v| < 2^22 (and not on
    inf/nan), which matters where C divides by a tiny partial sum.
    """
    return nearest_int_inplace(np.array(v, dtype=F32))


def nearest_int_inplace(t: np.ndarray) -> np.ndarray:
    """``nearest_int`` of a float32 scratch array, computed in its own memory: returns an int32 view of ``t``
    (no temporaries: the final requantizations run it on a million values per chunk)."""
    t += _MAGIC
    i = t.view(np.int32)
    i &= 0x007FFFFF
    i -= 0x00400000
    return i


def nearest_int_f(v: np.ndarray) -> np.ndarray:
    """``nearest_int`` as float32 (for use in further float arithmetic), exact on every input."""
    return nearest_int(v).astype(F32)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: float32 rounded to fp16 (nearest even) and back."""
    with np.errstate(over="ignore"):  # beyond 65504 -> inf, as in C
        return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16(v)`` as little-endian bytes: ``[*batch] -> u8[*batch, 2]``."""
    with np.errstate(over="ignore"):  # beyond 65504 -> inf, as in C
        h = np.ascontiguousarray(np.asarray(v, dtype=F32).astype("<f2"))
    return h.view(np.uint8).reshape(*h.shape, 2)


def signed_absmax(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """C's ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` loop along ``axis``.

    Returns (max: the signed value with the largest |x|, the first one when +a and -a tie; amax = |max|).
    When every value is 0 this gives +-0 where C keeps +0; callers test amax against an eps first.
    """
    hi = x.max(axis=axis)
    lo = x.min(axis=axis)
    mx = np.where(hi >= -lo, hi, lo)
    tie = np.flatnonzero((hi == -lo) & (hi > 0))
    if tie.size:  # +a and -a both present: the first occurrence wins
        xm = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)[:, tie]
        mx.reshape(-1)[tie] = xm[np.argmax(np.abs(xm), axis=0), np.arange(tie.size)]
    return mx, np.abs(mx)


def positive_max(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """C's ``float m = 0; if (x[i] > m) m = x[i];`` along ``axis`` (+0 when nothing is positive)."""
    m = x.max(axis=axis)
    return np.where(m > 0, m, F32(0))


def _select_bits(mask: np.ndarray) -> np.ndarray:
    """bool[B] -> int32[B] of 0 / -1, the mask for ``_blend``."""
    return np.negative(mask.view(np.int8), dtype=np.int32)


def _blend(bits: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``np.where(mask, new, old)`` for float32 via integer bit ops (``bits`` from ``_select_bits``).

    np.where branches per element and mispredicts on the random masks of the search loops (~3 ns/value);
    this is branch-free and bit-exact.
    """
    o = old.view(np.int32)
    r = np.bitwise_xor(new.view(np.int32), o)
    r &= bits
    r ^= o
    return r.view(F32)


_RMSE_WEIGHTS = {1: lambda x: x * x, 2: np.ones_like, 3: np.abs, 4: lambda x: np.sqrt(np.abs(x))}


def make_qx_quants(
    x: np.ndarray, nmax: int, rmse_type: int = 1, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants``: signed-scale fit x ~ scale*(L - nmax) with a 19-step scale search.

    x: f32[n, *batch]; qw: weights broadcastable to x or None (then rmse_type picks them: 1 -> x^2,
    2 -> 1, 3 -> |x|, 4 -> sqrt|x|; rmse_type 0 skips the fit). Negative rmse_type is not supported.
    Returns (scale f32[*batch], L u8[n, *batch] in [0, 2*nmax-1]); blocks with max|x| < eps give 0, 0.
    """
    scale, iscale, zero = make_qx_search(x, nmax, rmse_type, qw)
    return scale, qx_levels(x, iscale, zero, nmax)


def make_qx_search(
    x: np.ndarray, nmax: int, rmse_type: int = 1, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qx_quants without its levels: (scale, the winning iscale f32[*batch], zero bool[*batch]).

    ``qx_levels`` gives the levels from these when (and where) a caller needs them; the K-quants need
    them only for sub-blocks whose quantized scale is 0.

    Speed: the levels of a try depend only on its iscale, not on which try won so far, so the element
    passes (levels and the two sums, ``_qx_sums``) run first for all 19 tries, piece by piece, and the
    sequential selection (``_qx_select``) then runs once on the per-block sums of the whole batch: its
    per-try calls on 4K blocks (one piece) cost mostly call overhead (Q6_K profile: 12% of the time).
    """
    if rmse_type < 0:
        raise NotImplementedError("make_qx_quants: negative rmse_type")
    shape = x.shape
    n = shape[0]
    x = np.ascontiguousarray(x, dtype=F32).reshape(n, -1)  # [n, B]
    w = None if qw is None else np.broadcast_to(qw, shape).reshape(n, -1)
    nmax_f = F32(nmax)
    mx, amax = signed_absmax(x)  # [B]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -nmax_f / mx
        scale = F32(1) / iscale
        if rmse_type:
            # C returns early on all-zero blocks: when they are many, only the others are searched
            live = np.flatnonzero(~zero) if np.count_nonzero(zero) * 16 > zero.size else slice(None)
            xl = np.ascontiguousarray(x[:, live])  # [n, L]: C order (the sums' einsum is sequential only there)
            wl = None if w is None else np.ascontiguousarray(w[:, live], dtype=F32)
            iscales = np.divide(-(nmax_f + F32(0.1) * _QX_TRIES)[:, None], mx[live])  # [19, L]
            win, scales = _qx_select(*_qx_sums(xl, wl, iscales, nmax, rmse_type))
            pick = win.astype(np.intp) * xl.shape[1] + np.arange(xl.shape[1])  # [L]: the winner in [19, L]
            scale[live], iscale[live] = scales.reshape(-1)[pick], iscales.reshape(-1)[pick]
    return tuple(a.reshape(shape[1:]) for a in (np.where(zero, F32(0), scale), iscale, zero))


# make_qx_quants' tries in C's order: the first iscale -nmax/max (is = 0), then is = -9..9 without 0
_QX_TRIES = np.array([0, *range(-9, 0), *range(1, 10)], F32)


def _qx_sums(x, w, iscales, nmax, rmse_type):
    """C's ``sumlx += w*x*l; suml2 += w*l*l`` of every try: x f32[n, B] (w f32[n, B] or None: rmse_type picks
    it), iscales f32[19, B] -> (sumlx, suml2) f32[19, B], in pieces of ``_PIECE`` values (temporaries in L2).

    l = clamp(nearest_int(iscale*x), -nmax, nmax-1): |iscale*x| <= nmax + 1, so np.rint is exact, and for
    is <= -6 it is <= (nmax - 0.6)(1 + 2^-22) < nmax - 1/2, so those four tries need no clamp.
    """
    nmax_f = F32(nmax)
    clamp = _QX_TRIES > -6
    n, B = x.shape
    sumlx = np.empty((19, B), F32)
    suml2 = np.empty((19, B), F32)
    step = max(2, _PIECE // n)
    for s in range(0, B, step):
        e = min(s + step, B)
        xp = x[:, s:e]  # [n, P], a view: only the level passes read it
        wp = np.ascontiguousarray(_RMSE_WEIGHTS[min(rmse_type, 4)](xp) if w is None else w[:, s:e], dtype=F32)
        wx = wp * xp
        t = np.empty((n, e - s), F32)
        u = None if _SEQUENTIAL_EINSUM else np.empty_like(t)
        for k in range(19):
            np.multiply(xp, iscales[k, s:e], out=t)
            np.rint(t, out=t)
            if clamp[k]:
                _clip(t, -nmax_f, nmax_f - 1, out=t)
            if e - s < 2:
                sumlx[k, s:e], suml2[k, s:e] = seqsum(wx * t), seqsum(wp * t * t)
            else:
                dot0(wx, t, out=sumlx[k, s:e])
                dot0(wp, t, t, out=suml2[k, s:e], tmp=u)
    return sumlx, suml2


def _qx_select(sumlx, suml2):
    """make_qx_quants' choice among its tries from their sums f32[19, B] (sumlx is overwritten) -> (the
    index of the winning try int8[B], the scale of each try f32[19, B]).

    C: scale = suml2 ? sumlx/suml2 : 0; best = scale*sumlx; then for each further try
    if (suml2 > 0 && sumlx*sumlx > best*suml2) { scale = sumlx/suml2; best = scale*sumlx; }
    """
    scale = np.divide(sumlx, suml2)  # [19, B]: the scale and best of each try, if it wins
    scale[0] = np.where(suml2[0] != 0, scale[0], F32(0))
    best_k = np.multiply(scale, sumlx)
    np.multiply(sumlx, sumlx, out=sumlx)  # sumlx^2, -inf where !(suml2 > 0): it never passes the test
    np.copyto(sumlx, F32(-np.inf), where=~(suml2 > 0))
    B = sumlx.shape[1]
    upd = np.zeros((19, B), bool)  # try k replaced the best
    best = best_k[0]
    prod = np.empty(B, F32)
    for k in range(1, 19):
        np.greater(sumlx[k], np.multiply(best, suml2[k], out=prod), out=upd[k])
        best = _blend(_select_bits(upd[k]), best_k[k], best)
    return np.multiply(upd, np.arange(19, dtype=np.int8)[:, None]).max(axis=0), scale  # the last replacing try


def qx_levels(x: np.ndarray, iscale: np.ndarray, zero: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx_quants' L from its winning iscale: x f32[n, *batch] -> u8[n, *batch] (0 where ``zero``)."""
    nmax_f = F32(nmax)
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.multiply(x, iscale, dtype=F32)
    np.rint(t, out=t)  # |iscale*x| <= nmax + 1, so np.rint is nearest_int
    _clip(t, -nmax_f, nmax_f - 1, out=t)
    t += nmax_f
    t[:, zero] = 0
    return t.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int, do_rmse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants``: signed-scale levels in [-nmax, nmax-1], refined coordinate-wise with w = x^2.

    x: f32[n, *batch] -> (scale f32[*batch], L u8[n, *batch] = level + nmax; 0 for max|x| < eps blocks).
    """
    nmax_f = F32(nmax)
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -nmax_f / mx
        l = np.clip(np.rint(iscale * x), -nmax_f, nmax_f - 1)  # [n, *batch]
        if not do_rmse:
            return np.where(zero, F32(0), F32(1) / iscale), np.where(zero, 0, l + nmax_f).astype(np.uint8)
        w = x * x
        wx = w * x
        sumlx = seqsum(wx * l)
        suml2 = seqsum(w * l * l)
        for _ in range(5):
            n_changed = 0
            for i in range(x.shape[0]):
                li = l[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                new_l = np.clip(nearest_int_f(x[i] * sl2 / slx), -nmax_f, nmax_f - 1)
                slx_n = slx + wx[i] * new_l
                sl2_n = sl2 + w[i] * new_l * new_l
                acc = (slx > 0) & (new_l != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
                l[i] = np.where(acc, new_l, li)
                sumlx = np.where(acc, slx_n, sumlx)
                suml2 = np.where(acc, sl2_n, suml2)
                n_changed += int(acc.any())
            if not n_changed:  # a pass without changes is a fixed point, so blocks that C stopped are unaffected
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, l + nmax_f).astype(np.uint8)


def _make_qkx_core(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2/3_quants on one piece: x, w f32[n, B] (their degenerate tests agree on finite input).

    Speed: each step selects only per-block scalars; the winning levels are recomputed (qkx_levels) from
    the winning (iscale, min) pair, which reproduces them exactly. Temporaries are reused in place. The
    clamps and the exact rounding are applied only where they can matter: iscale*(x - min) <= c*(1 + 2^-22)
    for the step constant c = rmin + rdelta*is + nmax (float rounding is monotonic), and it is >= 0 unless an
    accepted least-squares min lies above the block's smallest value (``ratio`` tracks how far).
    """
    nmax_f = F32(nmax)
    B = x.shape[1]

    def sum_into(a, out):
        """out = seqsum(a), the fast reduction unless the piece is a lone block."""
        if B < 2:
            out[...] = seqsum(a)
        else:
            np.add.reduce(a, axis=0, initial=F32(0), out=out)

    t = np.empty(x.shape, F32)  # levels of the current step
    u = np.empty(x.shape, F32)  # scratch
    v = np.empty(x.shape, F32)  # scratch
    xmin = x.min(axis=0)
    zero_min = np.flatnonzero(xmin == 0)
    if zero_min.size:  # C keeps the first of equal minima: the sign of a zero min follows it (it is returned)
        xz = x[:, zero_min]
        xmin[zero_min] = xz[np.argmax(xz == 0, axis=0), np.arange(zero_min.size)]
    mx = x.max(axis=0)
    # S = sum_w, sum_x, sum_l, sum_l2, sum_xl (C starts sum_w and sum_x from element 0, not from 0)
    S = np.empty((5, B), F32)
    S[0] = seqsum(w, from_first=True)
    np.multiply(w, x, out=u)
    S[1] = seqsum(u, from_first=True)
    mn = np.where(xmin > 0, F32(0), xmin)
    degenerate = ~(mx > mn)
    rng = np.where(degenerate, F32(1), mx - mn)

    def levels(iscale, mn, clamp, exact):
        """t = clamp(nearest_int(iscale*(x - mn)), 0, nmax)."""
        np.subtract(x, mn, out=t)
        np.multiply(t, iscale, out=t)
        if exact:
            t[...] = nearest_int_f(t)
        else:
            np.rint(t, out=t)
        if clamp:
            _clip(t, F32(0), nmax_f, out=t)
        return t

    def error(scale, mn, l, out, u=u):
        """out = sum_i w*f(scale*l + mn - x), f = |.| or square (C: ``diff = diff*diff; mad += w*diff``).
        ``u`` receives the differences (the levels' own buffer when they are not needed afterwards)."""
        np.multiply(l, scale, out=u)
        np.add(u, mn, out=u)
        np.subtract(u, x, out=u)
        if B < 2:
            out[...] = seqsum(w * (np.abs(u) if use_mad else u * u))
        elif use_mad:
            dot0(w, np.abs(u, out=u), out=out)
        else:
            dot0(u, u, w, out=out, tmp=v)
        return out

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / rng
        # best error (-inf: degenerate blocks never update), scale, min, range = max - min, and the
        # (iscale, min) pair that produced the kept levels
        state = np.empty((6, B), F32)
        error(F32(1) / iscale, mn, levels(iscale, mn, False, False), state[0])
        state[0][degenerate] = -np.inf
        state[1] = F32(1) / iscale
        state[2] = mn
        state[3] = rng
        state[4] = iscale
        state[5] = mn
        new = np.empty_like(state)
        prods = np.empty((3, 2, B), F32)  # the products in D and in this_scale's and this_min's numerators
        det = np.empty((3, B), F32)  # D and the two numerators
        ratio, bounded = 0.0, True  # max (min - x_min)/range; every range > 0
        steps = np.arange(nstep + 1 if nstep >= 1 else 0, dtype=F32)
        for c in (F32(rmin) + F32(rdelta) * steps + nmax_f).tolist():  # exact float32 values as Python floats
            iscale = np.divide(F32(c), state[3], out=new[4])
            exact = not (bounded and ratio * float(c) * 1.001 < _SAFE_RINT)
            l = levels(iscale, state[2], ratio > 0 or float(c) >= nmax + 0.499 or not bounded, exact)
            if B < 2:
                np.multiply(w, l, out=u)  # w*l
                sum_into(u, S[2])
                sum_into(u * l, S[3])
                sum_into(u * x, S[4])
            else:  # sum_l += w*l; sum_l2 += w*l*l; sum_xl += w*l*x
                dot0(w, l, out=S[2])
                dot0(w, l, l, out=S[3], tmp=u)
                dot0(w, l, x, out=S[4], tmp=u)
            # D = sum_w*sum_l2 - sum_l*sum_l, this_scale = (sum_w*sum_xl - sum_x*sum_l)/D,
            # this_min = (sum_l2*sum_x - sum_l*sum_xl)/D; S = sum_w, sum_x, sum_l, sum_l2, sum_xl
            np.multiply(S[0], S[3:5], out=prods[0])  # w*l2, w*xl
            np.multiply(S[2], S[1:3], out=prods[1])  # l*x, l*l
            np.multiply(S[3], S[1], out=prods[2, 0])  # l2*x
            np.multiply(S[2], S[4], out=prods[2, 1])  # l*xl
            np.subtract(prods[0], prods[1, ::-1], out=det[:2])
            np.subtract(prods[2, 0], prods[2, 1], out=det[2])
            D = det[0]
            this = np.divide(det[1:], D, out=new[1:3])  # this_scale, this_min
            if np.fmax.reduce(this[1]) > 0:  # some this_min > 0 (NaN ignored, as C's test is false for it)
                pos = this[1] > 0
                this[1][pos] = 0
                this[0][pos] = (S[4] / S[3])[pos]
            err = error(this[0], this[1], l, new[0], u=l)  # the levels' last use
            upd = (D > 0) & (err < state[0])
            if upd.any():
                np.subtract(mx, this[1], out=new[3])
                new[5] = state[2]
                state = _blend(_select_bits(upd), new, state)
                bounded = bool(state[3].min() > 0)
                ratio = float(((state[2] - xmin) / state[3]).max()) if bounded else np.inf
    return (np.where(degenerate, F32(0), state[1]), -state[2], state[4], state[5], degenerate), None


def _in_pieces(core, x, weights, piece=None):
    """Runs ``core(x_piece, w_piece) -> ((per-block results...), L or None)`` over pieces of the batch.

    x f32[n, *batch] (weights broadcastable to it, or None) is flattened to [n, B] and cut into column
    pieces of about ``piece`` (default ``_PIECE``) values, so that the search loops' temporaries stay in the
    CPU cache. Returns the per-block results [*batch] and L [n, *batch] (None if the core gives none).
    """
    shape = x.shape
    n = shape[0]
    x = np.ascontiguousarray(x, dtype=F32).reshape(n, -1)
    w = None if weights is None else np.ascontiguousarray(np.broadcast_to(weights, shape), dtype=F32).reshape(n, -1)
    B = x.shape[1]
    step = max(2, (piece or _PIECE) // n)
    if B <= step:
        outs, L = core(x, w)
    else:
        outs, L = None, None
        for s in range(0, B, step):
            e = min(s + step, B)
            piece = (np.ascontiguousarray(a[:, s:e]) if a is not None else None for a in (x, w))  # contiguous: faster
            o, Lp = core(*piece)
            if outs is None:
                outs = tuple(np.empty(B, a.dtype) for a in o)
            if Lp is not None:
                L = np.empty((n, B), np.uint8) if L is None else L
                L[:, s:e] = Lp
            for dst, src in zip(outs, o):
                dst[s:e] = src
    return (*(o.reshape(shape[1:]) for o in outs), None if L is None else L.reshape(shape))


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants``: asymmetric fit x ~ scale*L - the_min, L in [0, nmax], searched over nstep+1 scales.

    x: f32[n, *batch]; weights: broadcastable to x (required). Returns (scale f32[*batch],
    the_min f32[*batch] (= -min, >= 0 except for constant negative blocks), L u8[n, *batch]).
    """
    scale, the_min, iscale, lmin, degenerate = make_qkx_search(x, weights, nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, qkx_levels(x, iscale, lmin, degenerate, nmax)


def make_qkx_search(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, ...]:
    """make_qkx2_quants without its levels: (scale, the_min, and the (iscale, min) pair of the kept levels
    f32[*batch], degenerate bool[*batch]); ``qkx_levels`` gives the levels where a caller needs them."""
    core = lambda xp, wp: _make_qkx_core(xp, wp, nmax, rmin, rdelta, nstep, use_mad)
    return _in_pieces(core, x, weights, QKX_PIECES * _PIECE)[:5]


def qkx_levels(x: np.ndarray, iscale: np.ndarray, lmin: np.ndarray, degenerate: np.ndarray, nmax: int) -> np.ndarray:
    """make_qkx2_quants' L from its kept (iscale, min): clamp(nearest_int(iscale*(x - min)), 0, nmax), 0 for
    degenerate blocks: x f32[n, *batch] -> u8[n, *batch]. The exact nearest_int: an accepted least-squares
    min far above the block's values can push iscale*(x - min) past 2^22."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.subtract(x, lmin, dtype=F32)
        t *= iscale
        t = nearest_int_f(t)
    _clip(t, F32(0), F32(nmax), out=t)
    t[:, degenerate] = 0
    return t.astype(np.uint8)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: positive-scale fit x ~ scale*L, L in [0, nmax], with C's uint8 wrap of L.

    x: f32[n, *batch] (normally >= 0, negative values wrap like the C ``uint8_t L[]``), qw: weights
    broadcastable to x. Returns (scale f32[*batch], L u8[n, *batch]); max(x) < eps blocks give 0, 0.
    """
    nmax_f = F32(nmax)
    n = x.shape[0]
    w = np.broadcast_to(qw, x.shape)
    mx = np.zeros(x.shape[1:], F32)
    for i in range(n):
        mx = np.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / mx
        Lw = (nearest_int(iscale * x) & 0xFF).astype(F32)  # the stored uint8 values
        scale = F32(1) / iscale
        diff = x - scale * Lw
        best_mse = seqsum(w * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + nmax_f) / mx
            scale_is = F32(1) / iscale_is
            l = np.minimum(nmax_f, nearest_int_f(iscale_is * x))
            diff = x - scale_is * l
            mse = seqsum(w * diff * diff)
            upd = mse < best_mse
            best_mse = np.where(upd, mse, best_mse)
            iscale = np.where(upd, iscale_is, iscale)
        l = np.minimum(nmax_f, nearest_int_f(iscale * x))  # the int, unwrapped, feeds the sums
        wx = w * x
        sumlx = seqsum(wx * l)
        suml2 = seqsum(w * l * l)
        Lw = (l.astype(np.int32) & 0xFF).astype(F32)
        # C refines each block until a pass changes nothing (at most 5 passes): later passes run only on
        # the blocks the previous pass changed (a pass without changes is a fixed point).
        shape = x.shape
        x2, w2, wx2 = (np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(n, -1) for a in (x, w, wx))
        L2 = np.array(np.broadcast_to(Lw, shape), dtype=F32).reshape(n, -1)  # a writable copy
        sumlx, suml2 = sumlx.reshape(-1).copy(), suml2.reshape(-1).copy()
        act = None  # the first pass: every block
        for _ in range(5):
            if act is None:
                xa, wa, wxa, La, slxa, sl2a = x2, w2, wx2, L2, sumlx, suml2
            else:
                xa, wa, wxa, La, slxa, sl2a = x2[:, act], w2[:, act], wx2[:, act], L2[:, act], sumlx[act], suml2[act]
            changed = _qp_pass(xa, wa, wxa, La, slxa, sl2a, nmax)
            if act is None:
                act = np.flatnonzero(changed)
            else:
                L2[:, act], sumlx[act], suml2[act] = La, slxa, sl2a
                act = act[changed]
            if not act.size:
                break
        Lw = L2.reshape(shape)
        sumlx, suml2 = sumlx.reshape(shape[1:]), suml2.reshape(shape[1:])
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), Lw).astype(np.uint8)


def _qp_pass(x, w, wx, L, sumlx, suml2, nmax: int) -> np.ndarray:
    """One refinement pass of make_qp_quants over blocks [n, B], updating L (the stored uint8 values, as
    float32), sumlx and suml2 in place -> bool[B]: the block changed. C, per element in order:
    ``slx = sumlx - w*x*L; sl2 = suml2 - w*L*L; if (slx > 0 && sl2 > 0) { l = MIN(nmax, nearest_int(x*sl2/slx));
    if (l != L) { slx += w*x*l; sl2 += w*l*l; if (slx*slx*suml2 > sumlx*sumlx*sl2) take } }``.

    Each step computes the proposal for every block; the remaining arithmetic runs only on the blocks
    whose proposal differs from L (usually few).
    """
    n, B = x.shape
    wxL = wx * L  # an element's own L changes only at its own step, so these are its values there
    wLL = (w * L) * L
    changed = np.zeros(B, bool)
    slx, sl2, t = np.empty(B, F32), np.empty(B, F32), np.empty(B, F32)
    ti = t.view(np.int32)
    for i in range(n):
        np.subtract(sumlx, wxL[i], out=slx)
        np.subtract(suml2, wLL[i], out=sl2)
        np.multiply(x[i], sl2, out=t)
        t /= slx
        t += _MAGIC  # nearest_int, C's bits also where |x*sl2/slx| >= 2^22
        ti &= 0x007FFFFF
        ti -= 0x00400000
        np.minimum(ti, nmax, out=ti)
        new = ti.astype(F32)
        cand = np.flatnonzero((new != L[i]) & (np.minimum(slx, sl2) > 0))
        if not cand.size:
            continue
        nl, a, b = new[cand], slx[cand], sl2[cand]
        a += wx[i, cand] * nl
        b += (w[i, cand] * nl) * nl
        sx, s2 = sumlx[cand], suml2[cand]
        ok = (a * a) * s2 > (sx * sx) * b
        cand, nl = cand[ok], nl[ok]
        L[i, cand] = (nl.astype(np.int32) & 0xFF).astype(F32)
        sumlx[cand], suml2[cand] = a[ok], b[ok]
        changed[cand] = True
    return changed


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``best_index_int8``: index of the nearest entry of the sorted int8 table ``values`` (ties go up).

    values: int8[k] ascending; x: f32[...] -> int64[...].
    """
    vals = np.asarray(values, dtype=F32)
    k = vals.shape[0]
    mu = np.clip(np.searchsorted(vals, x, side="right"), 1, k - 1)
    idx = np.where(x - vals[mu - 1] < vals[mu] - x, mu - 1, mu)
    return np.where(x <= vals[0], 0, np.where(x >= vals[k - 1], k - 1, idx))
