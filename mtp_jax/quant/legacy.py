"""Legacy 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-quants.c).

Without an imatrix ggml runs the ``quantize_row_*_ref`` quantizers (no fitting; truncating casts);
with one, ``quantize_row_*_impl``: a weighted scale search, weights qw*sqrt(sigma2 + x^2) with sigma2
taken over the whole row. Q8_0 ignores the imatrix.

Speed: in C the reference paths are a few elementwise passes per value, so what costs in NumPy is the
number of passes, fresh temporaries and short inner loops (a reduction over one 32-value block, a
broadcast of one per-block scalar). Blocks therefore run in cache-sized pieces with scratch reused
across pieces (``Scratch``), in the *lane layout* (``lanes``): each block's 8 groups of 4 consecutive
values are transposed as 16-byte items, f32[P, 32] -> f32[8, P, 4]. There a per-block max / min is a
reduction over 8 long rows plus 3 steps over the 4 lanes (``lane_reduce``), a per-block scalar
broadcasts along rows of P*4 values (``per_lane``), the nibble partners j and j + 16 are rows k and k + 4,
and the levels go back to the block bytes by a transpose of 4-byte items (``groups``, ``put_groups``). The imatrix
paths run primitives' searches per piece of whole rows (sigma2 is a row statistic), element-major there.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QuantType, register
from mtp_jax.quant.primitives import (
    _PIECE,
    F32,
    QKX_PIECES,
    dot0,
    element_major,
    make_qkx_search,
    make_qx_search,
    qkx_levels,
    qx_levels,
    signed_absmax,
)

_GROUP = np.dtype("V16")  # 4 float32 values, moved as one item by the lane transpose
_SIGN = np.int32(-(2**31))  # the float32 sign bit
_BELOW_HALF = np.nextafter(F32(0.5), F32(0)).view(np.int32)  # bits of 0.5f - 2^-25
_HIGH_BIT_GATHER = np.uint32(0x00204081)  # 1 + 2^7 + 2^14 + 2^21, see high_bits

# ---- float32 / C-cast helpers ----------------------------------------------------------------------


def inv_or_zero(d: np.ndarray) -> np.ndarray:
    """C ``d ? 1.0f/d : 0.0f`` (1/subnormal overflows to inf, as in C)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def c_int(v: np.ndarray) -> np.ndarray:
    """x86-64 cvttss2si: truncate f32 to int32; NaN and out-of-range give INT_MIN. The narrow C casts
    (int8_t)/(uint8_t) of a float are this, then the low byte."""
    ok = np.abs(v) < F32(2.0**31)
    return np.where(ok, np.trunc(np.where(ok, v, F32(0))), F32(-(2.0**31))).astype(np.int64)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``qs[j] = q[j] | q[j+16] << 4`` (stored as uint8): int[32, nb] -> u8[nb, 16]."""
    return ((q[:16] | (q[16:] << 4)) & 0xFF).astype(np.uint8).T


def blocks32(rows: np.ndarray) -> np.ndarray:
    """f32[R, N] -> element-major f32[32, nb] (block b = row b // (N/32), columns 32*(b % (N/32)) + j)."""
    return element_major(np.asarray(rows, dtype=F32).reshape(-1, 32))


def ref_inverse(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference paths' ``id = d ? 1.0f/d : 0.0f`` -> (id f32[P], special: indices of blocks).

    ``special``: blocks where d or 1/d is infinite (a subnormal d; a max - min beyond FLT_MAX). There every
    C level is the cast of +-inf, NaN or (x - min)*0 + 0.5, i.e. 0 (cvttss2si gives INT_MIN, whose low
    byte is 0). id is 0 there (C's for d = inf; for a subnormal d it keeps inf out of the passes), and
    callers zero those levels whatever the passes gave (NumPy's cast of a NaN is undefined).
    """
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.divide(F32(1), d, dtype=F32)
    bad = np.isinf(inv)  # d = 0 (id = 0 in C) or a subnormal d
    special = np.flatnonzero((bad & (d != 0)) | (inv == 0))
    inv[bad] = 0
    return inv, special


def add_half_away(v: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """v += copysign(0.5f - 2^-25, v) in place (``tmp``: scratch of v's shape): truncating the result gives
    C's roundf(v), half away from zero, for every float (adding 0.5f itself would round 0.5f - 2^-25 up).
    The sign is copied with integer bit ops, 4x cheaper than np.copysign."""
    h = np.bitwise_and(v.view(np.int32), _SIGN, out=tmp.view(np.int32))
    h |= _BELOW_HALF
    v += h.view(F32)
    return v


def put_fp16(dst: np.ndarray, v: np.ndarray) -> None:
    """``GGML_FP32_TO_FP16(v)`` into the byte columns dst u8[P, 2] (nearest even; beyond 65504 -> inf)."""
    with np.errstate(over="ignore"):
        np.copyto(dst.view("<f2")[:, 0], v, casting="same_kind")


# ---- the lane layout ---------------------------------------------------------------------------------


class Scratch:
    """Named flat buffers reused by every piece of one call (fresh large temporaries cost page faults);
    ``buf(name, shape, dtype)`` is a C-contiguous view of the first prod(shape) items."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, np.dtype], np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype=F32) -> np.ndarray:
        n = math.prod(shape)
        key = (name, np.dtype(dtype))
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = self._bufs[key] = np.empty(n, dtype)
        return buf[:n].reshape(shape)


def pieces(n: int, size: int):
    """(start, stop) of consecutive pieces of ``size`` items covering range(n)."""
    return ((s, min(s + size, n)) for s in range(0, n, size))


def block_pieces(rows: np.ndarray, block: int, type_size: int):
    """The piece loop of the reference quantizers: rows f32[R, N] as blocks of ``block`` values in pieces of
    about ``_PIECE`` values. Returns (the output u8[R, N/block*type_size], an iterator of (x f32[P, block],
    its output rows u8[P, type_size], the scratch shared by all pieces)); the caller fills each piece's rows."""
    x = np.ascontiguousarray(rows, dtype=F32).reshape(-1, block)
    out = np.empty((len(x), type_size), np.uint8)
    buf = Scratch()
    work = ((x[s:e], out[s:e], buf) for s, e in pieces(len(x), _PIECE // block))
    return out.reshape(len(rows), -1), work


def lanes(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """f32[P, n] C-contiguous blocks -> f32[n/4, P, 4] in ``out``: value 4k + m of block p at [k, p, m]."""
    np.copyto(out.view(_GROUP).reshape(out.shape[:2]), x.view(_GROUP).T)
    return out


def lane_reduce(ufunc: np.ufunc, v: np.ndarray, buf: Scratch, name: str) -> np.ndarray:
    """Per-block ``ufunc.reduce`` (np.maximum / np.minimum: order-free) of lanes f32[k, P, 4] -> f32[P]."""
    r = ufunc.reduce(v, axis=0, out=buf("lane_r", v.shape[1:]))  # [P, 4]
    out = ufunc(r[:, 0], r[:, 1], out=buf(name, r.shape[:1]))
    ufunc(out, r[:, 2], out=out)
    return ufunc(out, r[:, 3], out=out)


def per_lane(s: np.ndarray, buf: Scratch) -> np.ndarray:
    """f32[P] -> f32[P*4], each block's value on its 4 lanes: broadcasts along the rows of lanes[k, P*4]."""
    s4 = buf("per_lane", (len(s), 4))
    for m in range(4):  # 2.5x faster than one broadcasting copy, whose inner loops are 4 values long
        s4[:, m] = s
    return s4.reshape(-1)


def groups(q: np.ndarray) -> np.ndarray:
    """Byte lanes u8[k, P, 4] -> u32[k, P], each block's 4 bytes of a lane row as one little-endian word.
    Byte-wise arithmetic runs on these words whenever no byte can carry into the next: NumPy has no SIMD
    loop for uint8 shifts (8x slower than for uint32)."""
    return q.view(np.uint32).reshape(q.shape[:2])


def put_groups(dst: np.ndarray, g: np.ndarray) -> None:
    """Words u32[k, P] (``groups``) -> the byte columns dst u8[P, 4k] (bytes 4i..4i+3 = g[i, p]), written as
    a transpose of 4-byte items straight into the (unaligned, strided) output."""
    np.copyto(dst.view(np.uint32), g.T)


def high_bits(q: np.ndarray, buf: Scratch) -> np.ndarray:
    """Bit 4 of level j -> bit j of a uint32 (Q5_0/Q5_1's qh): groups u32[8, P] of levels < 32 -> u32[P].

    Per group, the high bits as 0/1 bytes b0..b3 of v gather as (v * (1 + 2^7 + 2^14 + 2^21)) >> 21: b_i
    lands on bit 21 + i from the product term 2^(8i + 7(3 - i)), and the other 12 terms hit distinct bits
    outside 21..24 (those at 29 and up are masked off), so nothing carries into them.
    """
    g = np.right_shift(q, 4, out=buf("hb", q.shape, np.uint32))
    g &= np.uint32(0x01010101)
    g *= _HIGH_BIT_GATHER
    g >>= 21
    g &= 15
    g <<= np.arange(0, 32, 4, dtype=np.uint32)[:, None]  # group k holds bits 4k..4k+3
    return np.bitwise_or.reduce(g, axis=0)


def nibbles(q: np.ndarray, buf: Scratch) -> np.ndarray:
    """``qs[j] = (q[j] & 15) | q[j+16] << 4`` (uint8): groups u32[8, P] -> groups u32[4, P] (the halves of a
    block are the lane rows 0-3 and 4-7)."""
    qs = np.left_shift(q[4:], 4, out=buf("qs", (4, q.shape[1]), np.uint32))
    qs &= np.uint32(0xF0F0F0F0)
    qs |= q[:4] & np.uint32(0x0F0F0F0F)
    return qs


# ---- imatrix fitting, per piece of rows -----------------------------------------------------------------


def row_sumsq(xr: np.ndarray, buf: Scratch) -> np.ndarray:
    """C's ``sum_x2 += x[j]*x[j]`` over each row of f32[r, N] -> f32[r], sequential: dot0 over the transposed
    rows (it needs two columns: a lone row is copied into both)."""
    r, n = xr.shape
    xt = buf("xt", (n, max(r, 2)))
    np.copyto(xt, xr.T)
    return dot0(xt, xt)[:r]


def impl_pieces(rows: np.ndarray, imatrix: np.ndarray, piece: int):
    """Yields (block range, x f32[32, P], w f32[32, P]) per piece of whole rows (about ``piece`` values):
    x element-major, w = qw*sqrtf(sigma2 + x*x) with sigma2 = (sequential sum of the row's x^2)/n_per_row."""
    n_rows, n = rows.shape
    nbr = n // 32
    qw = np.ascontiguousarray(np.asarray(imatrix, F32).reshape(nbr, 32).T)  # [32, nbr]
    buf = Scratch()
    step = max(1, piece // n)
    for s, e in pieces(n_rows, step):
        xr = rows[s:e]  # [r, N]
        sigma2 = row_sumsq(xr, buf) / F32(n)  # [r]
        x = buf("x", (32, (e - s) * nbr))
        np.copyto(x, xr.reshape(-1, 32).T)
        w = np.multiply(x, x, out=buf("w", x.shape))
        w3 = w.reshape(32, e - s, nbr)
        w3 += sigma2[:, None]
        np.sqrt(w, out=w)
        np.multiply(w3, qw[:, None, :], out=w3)
        yield (s * nbr, e * nbr), x, w


def em_groups(L: np.ndarray, buf: Scratch) -> np.ndarray:
    """Element-major levels u8[32, P] -> groups u32[8, P], by way of the blocks' bytes u8[P, 32] (a byte
    transpose straight to [8, P, 4] runs 4-byte inner loops, 2x slower)."""
    rows = buf("L_rows", L.shape[::-1], np.uint8)
    np.copyto(rows, L.T)
    g = buf("L_groups", (8, L.shape[1]), np.uint32)
    np.copyto(g, rows.view(np.uint32).T)
    return g


# ---- the types ---------------------------------------------------------------------------------------


@register
class Q8_0(QuantType):
    """34 B / 32: d, qs[32] (int8). ``quantize_row_q8_0_ref``: d = amax/127, q = roundf(x/d)."""

    qtype = GGMLQuantizationType.Q8_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        res, work = block_pieces(rows, 32, cls.type_size())
        for x, o, buf in work:  # x f32[P, 32]
            P = len(x)
            v = lanes(x, buf("v", (8, P, 4)))
            a = np.abs(v, out=buf("a", v.shape))
            d = lane_reduce(np.maximum, a, buf, "amax") / F32(127)  # [P]
            id_, _ = ref_inverse(d)  # its special blocks get id = 0, hence the levels 0 they have in C
            v2 = v.reshape(8, -1)
            np.multiply(v2, per_lane(id_, buf), out=v2)  # |x*id| <= 127 (1 + 2^-20)
            q = buf("q", v.shape, np.int8)
            np.copyto(q, add_half_away(v, a), casting="unsafe")  # (int8_t)roundf(x*id); 0 where id = 0
            put_fp16(o[:, 0:2], d)
            put_groups(o[:, 2:], groups(q))
        return res


class _LegacyType(QuantType):
    """Q4_0 / Q5_0 (``symmetric``: value d*(q - nmax)) and Q4_1 / Q5_1 (value d*q + m), levels of
    ``bits`` bits: the reference path per piece of blocks, the imatrix path per piece of rows."""

    symmetric: bool
    nmax: int
    bits: int

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        if imatrix is None:
            res, work = block_pieces(rows, 32, cls.type_size())
            for x, o, buf in work:
                cls._store(o, *cls._ref(x, buf), buf)
            return res
        rows = np.ascontiguousarray(rows, dtype=F32)
        out = np.empty((rows.size // 32, cls.type_size()), np.uint8)
        buf = Scratch()
        piece = _PIECE if cls.symmetric else QKX_PIECES * _PIECE  # as primitives' searches cut them
        for (s, e), x, w in impl_pieces(rows, imatrix, piece):
            cls._store(out[s:e], *cls._impl(x, w, buf), buf)
        return out.reshape(len(rows), -1)

    @classmethod
    def _ref(cls, x: np.ndarray, buf: Scratch) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``quantize_row_q4_0_ref`` etc. on blocks f32[P, 32] -> (d f32[P], m f32[P] or None, groups u32[8, P])."""
        P = len(x)
        v = lanes(x, buf("v", (8, P, 4)))
        v2 = v.reshape(8, -1)
        hi = lane_reduce(np.maximum, v, buf, "hi")
        lo = lane_reduce(np.minimum, v, buf, "lo")
        nmax = cls.nmax
        if cls.symmetric:
            # C: max = the first x of the largest |x|; d = max/-nmax; q = MIN(2nmax-1, (int8_t)(x*id + nmax+0.5f))
            with np.errstate(over="ignore"):  # only the sign of hi + lo is used
                s = np.add(hi, lo)  # its sign picks hi or lo (exactly: a float sum is 0 only for hi = -lo)
            mx = np.copysign(np.maximum(hi, np.negative(lo)), s)
            tie = np.flatnonzero(s == 0)
            if tie.size:  # +a and -a both present (or all zeros): the first occurrence wins
                mx[tie] = signed_absmax(x[tie], axis=1)[0]
            d = np.add(mx, F32(0)) / F32(-nmax)  # + 0: an all-zero block keeps C's max = +0 (d = -0)
            m = None
            id_, special = ref_inverse(d)
            np.multiply(v2, per_lane(id_, buf), out=v2)
            v2 += F32(nmax + 0.5)  # > 0, as |x*id| <= nmax (1 + 2^-21)
            np.fmin(v2, F32(2 * nmax - 1), out=v2)  # C's MIN of the truncated value, before truncating
        else:
            # C: d = (max - min)/nmax; q = (int)((x - min)*id + 0.5f), Q4_1 taking MIN(15, (int8_t)q)
            z = np.flatnonzero(lo == 0)
            if z.size:  # C's strict < keeps the first of equal minima: the sign of a zero min is stored in m
                xz = x[z]
                lo[z] = xz[np.arange(z.size), np.argmax(xz == 0, axis=1)]
            with np.errstate(over="ignore", invalid="ignore"):  # a range beyond FLT_MAX: a special block
                # + 0: an all-zero block's C max and min are one element (+0 apart), NumPy's may be -0 and +0
                d = (np.subtract(hi, lo) + F32(0)) / F32(nmax)
                m = lo
                id_, special = ref_inverse(d)
                v2 -= per_lane(m, buf)
                np.multiply(v2, per_lane(id_, buf), out=v2)
            v2 += F32(0.5)  # <= nmax (1 + 2^-21) + 0.5: Q4_1's MIN(15, .) is a no-op
        q = buf("q", v.shape, np.uint8)
        with np.errstate(invalid="ignore"):  # the NaN of a special block, zeroed next
            np.copyto(q, v, casting="unsafe")
        q[:, special] = 0
        return d, m, groups(q)

    @classmethod
    def _impl(cls, x: np.ndarray, w: np.ndarray, buf: Scratch) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``quantize_row_q4_0_impl`` etc. on x, w f32[32, P] -> (d, m or None, groups u32[8, P])."""
        if cls.symmetric:  # make_qx_quants(32, nmax, x, L, 1, weight)
            d, iscale, zero = make_qx_search(x, cls.nmax, 1, w)
            return d, None, em_groups(qx_levels(x, iscale, zero, cls.nmax), buf)
        # make_qkx3_quants(32, nmax, x, weight, L, &min, Laux, -0.9f, 0.05f, 36, false); m = -min
        d, the_min, iscale, lmin, degenerate = make_qkx_search(x, w, cls.nmax, -0.9, 0.05, 36, False)
        return d, -the_min, em_groups(qkx_levels(x, iscale, lmin, degenerate, cls.nmax), buf)

    @classmethod
    def _store(cls, out: np.ndarray, d: np.ndarray, m: np.ndarray | None, q: np.ndarray, buf: Scratch) -> None:
        """Block bytes u8[P, ts]: d, then m (Q4_1/Q5_1), then qh (5-bit levels), then qs."""
        put_fp16(out[:, 0:2], d)
        col = 2
        if m is not None:
            put_fp16(out[:, 2:4], m)
            col = 4
        if cls.bits == 5:
            out[:, col : col + 4].view("<u4")[:, 0] = high_bits(q, buf)
            col += 4
        put_groups(out[:, col:], nibbles(q, buf))


@register
class Q4_0(_LegacyType):
    """18 B / 32: d, qs[16] (q[j] | q[j+16] << 4); value d*(q-8)."""

    qtype = GGMLQuantizationType.Q4_0
    symmetric, nmax, bits = True, 8, 4


@register
class Q5_0(_LegacyType):
    """22 B / 32: d, qh[4] (bit 4 of q[j] at bit j), qs[16]; value d*(q-16)."""

    qtype = GGMLQuantizationType.Q5_0
    symmetric, nmax, bits = True, 16, 5


@register
class Q4_1(_LegacyType):
    """20 B / 32: d, m, qs[16]; value d*q + m."""

    qtype = GGMLQuantizationType.Q4_1
    symmetric, nmax, bits = False, 15, 4


@register
class Q5_1(_LegacyType):
    """24 B / 32: d, m, qh[4], qs[16]; value d*q + m."""

    qtype = GGMLQuantizationType.Q5_1
    symmetric, nmax, bits = False, 31, 5
