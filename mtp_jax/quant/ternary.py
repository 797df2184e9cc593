"""TQ1_0, TQ2_0 (ternary, BitNet b1.58 / TriLM) and MXFP4: ggml ignores the imatrix for all three.

Mirrors ``quantize_row_tq1_0_ref``, ``quantize_row_tq2_0_ref`` and ``quantize_row_mxfp4_ref`` in
ggml-quants.c (block structs in ggml-common.h). Like the legacy reference paths (legacy.py's module
docstring), blocks run in cache-sized pieces in the lane layout: value 4k + m of block p at [k, p, m].
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.legacy import (
    Scratch,
    block_pieces,
    c_int,
    groups,
    lane_reduce,
    lanes,
    nibbles,
    per_lane,
    put_fp16,
    put_groups,
    ref_inverse,
)
from mtp_jax.quant.primitives import F32

KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
# the midpoints between consecutive magnitudes 0, 1, 2, 3, 4, 6, 8, 12, halved (MXFP4 compares |x|/(2d))
_MXFP4_MIDS = [F32(m) for m in (KVALUES_MXFP4[:7] + KVALUES_MXFP4[1:8]) / 4]


def _trits(x: np.ndarray, buf: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """Superblocks f32[P, 256] -> (d = amax f32[P], trits ``lroundf(x*id) + 1`` as groups u32[64, P]).

    |x*id| <= 1 + 2^-22, so lroundf (half away from zero) is -1 for x*id <= -0.5, 1 for >= 0.5, else 0, and
    the trit is (x*id >= 0.5) + (x*id > -0.5). id = inf (a subnormal amax) makes every product inf or NaN,
    for which glibc's lroundf returns LONG_MIN, whose low 32 bits plus 1 give trit 1: what id = 0 gives.
    """
    P = len(x)
    v = lanes(x, buf("v", (64, P, 4)))
    d = lane_reduce(np.maximum, np.abs(v, out=buf("a", v.shape)), buf, "amax")  # amax = MAX(amax, fabsf(x))
    id_, _ = ref_inverse(d)  # 0 where 1/d overflows, as explained above
    v2 = v.reshape(64, -1)
    np.multiply(v2, per_lane(id_, buf), out=v2)
    up = np.greater_equal(v, F32(0.5), out=buf("up", v.shape, np.bool_))
    mid = np.greater(v, F32(-0.5), out=buf("mid", v.shape, np.bool_))
    return d, groups(np.add(up.view(np.uint8), mid.view(np.uint8), out=buf("t", v.shape, np.uint8)))


def _base3(trits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """C's ``q = q*3 + xi`` over trit groups u32[n, ...] (most significant first) -> out u32[...]; bytewise,
    as no byte exceeds 3^5 - 1."""
    np.copyto(out, trits[0])
    for t in trits[1:]:
        out *= 3
        out += t
    return out


@register
class TQ1_0(QuantType):
    """54 B / 256: qs[48] (5 trits per byte), qh[4] (4 trits per byte), d. ``quantize_row_tq1_0_ref``."""

    qtype = GGMLQuantizationType.TQ1_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        res, work = block_pieces(rows, QK_K, cls.type_size())
        for x, o, buf in work:  # x f32[P, 256]
            P = len(x)
            d, t = _trits(x, buf)  # t[k]: values 4k..4k+3
            q = buf("q", (13, P), np.uint32)  # the 52 bytes as groups: bytes 4i..4i+3 = q[i]
            # qs[0:32]: byte m of x[m + 32n], n = 0..4 (rows 8n + m/4); qs[32:48]: x[160 + m + 16n] (rows
            # 40 + 4n + m/4); qh[0:4]: byte j of x[240 + j + 4n], n = 0..3 (row 60 + n), then a 0 trit
            _base3(t[:40].reshape(5, 8, P), q[:8])
            _base3(t[40:60].reshape(5, 4, P), q[8:12])
            _base3(t[60:], q[12])
            q[12] *= 3
            # the ceiling division by 3^5, ((uint16_t)q*256 + 242)/243, in float32: the numerator is exact, and
            # a quotient that is not an integer lies >= 1/243 from one, far beyond its rounding error (2^-16)
            qb = q.view(np.uint8)
            f = np.multiply(qb, F32(256), out=buf("f", qb.shape), dtype=F32)
            f += F32(242)
            f /= F32(243)
            np.copyto(qb, f, casting="unsafe")
            put_groups(o[:, :52], q)
            put_fp16(o[:, 52:54], d)
        return res


@register
class TQ2_0(QuantType):
    """66 B / 256: qs[64] (2 bits per trit), d. ``quantize_row_tq2_0_ref``."""

    qtype = GGMLQuantizationType.TQ2_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        res, work = block_pieces(rows, QK_K, cls.type_size())
        for x, o, buf in work:  # x f32[P, 256]
            P = len(x)
            d, t = _trits(x, buf)
            # byte 32c + m holds x[128c + 32n + m] at bits 2n: rows 32c + 8n + m/4 of the trit groups
            t = t.reshape(2, 4, 8, P)  # [c, n, m/4, P]
            q = np.left_shift(t[:, 3], 6, out=buf("q", (2, 8, P), np.uint32))
            for n in (2, 1, 0):
                q |= t[:, n] << np.uint32(2 * n)
            put_groups(o[:, :64], q.reshape(16, P))
            put_fp16(o[:, 64:66], d)
        return res


def _e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """``ggml_e8m0_to_fp32_half``: 2^(e - 128), built from the float bits."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


@register
class MXFP4(QuantType):
    """17 B / 32: e (E8M0 shared exponent), qs[16] (E2M1 nibbles). ``quantize_row_mxfp4_ref``.

    ``best_index_mxfp4`` takes the first index with the smallest float |kv*d - x|. d is a power of two, so
    kv*d is exact, and where two neighbouring candidates' errors are close both are exact (Sterbenz: each
    pair a < b of magnitudes has b <= 2a, and for (0, 1) the error |x| is exact), while a candidate further
    away is worse by at least d out of at most 28d: the C search is exactly "nearest |kv|, a tie going to the
    smaller", i.e. the count of midpoints below |x|/d, with the sign adding 8 (a zero stays index 0, which
    precedes the -0 at 8). |x|*(0.5/d) is exact (0.5/d is a finite power of two; an underflow lies far below
    the first midpoint) and compared with the halved midpoints.
    """

    qtype = GGMLQuantizationType.MXFP4
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        res, work = block_pieces(rows, 32, cls.type_size())
        for x, o, buf in work:  # x f32[P, 32]
            P = len(x)
            v = lanes(x, buf("v", (8, P, 4)))
            a = np.abs(v, out=buf("a", v.shape))
            amax = lane_reduce(np.maximum, a, buf, "amax")  # [P]
            # floorf(log2f(amax)): log2 rounded once to f32, as glibc's log2f (which rounds up to k just
            # below 2^k, k >= 4)
            with np.errstate(divide="ignore"):
                lg = np.log2(amax.astype(np.float64)).astype(F32)
            ef = np.floor(lg) - F32(2) + F32(127)
            ex = np.where(amax > 0, c_int(ef) & 0xFF, 0).astype(np.uint8)  # (uint8_t) of the float
            a2 = a.reshape(8, -1)
            np.multiply(a2, per_lane(F32(0.5) / _e8m0_to_fp32_half(ex), buf), out=a2)  # |x|/(2d)
            nonzero = np.greater(a, _MXFP4_MIDS[0], out=buf("nonzero", v.shape, np.bool_))
            idx = buf("idx", v.shape, np.uint8)
            np.copyto(idx, nonzero.view(np.uint8))
            above = buf("above", v.shape, np.bool_)
            for mid in _MXFP4_MIDS[1:]:
                idx += np.greater(a, mid, out=above).view(np.uint8)
            neg = np.less(v, F32(0), out=above)
            neg &= nonzero  # a zero index stays 0 for x < 0
            sign = groups(neg.view(np.uint8))
            sign <<= 3
            q = groups(idx)
            q |= sign
            o[:, 0] = ex
            put_groups(o[:, 1:], nibbles(q, buf))
        return res
