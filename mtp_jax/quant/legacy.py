"""Legacy 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-quants.c).

Without an imatrix ggml runs the ``quantize_row_*_ref`` quantizers (no fitting; truncating casts);
with one, ``quantize_row_*_impl``: a weighted scale search, weights qw*sqrt(sigma2 + x^2) with sigma2
taken over the whole row. Q8_0 ignores the imatrix.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QuantType, register
from mtp_jax.quant.primitives import (
    F32,
    element_major,
    fp16_bytes,
    make_qkx3_quants,
    make_qx_quants,
    seqsum,
    signed_absmax,
)

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


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32."""
    t = np.trunc(v)
    with np.errstate(invalid="ignore"):  # inf - inf for the inf products of a subnormal scale
        return t + np.where(np.abs(v - t) >= F32(0.5), np.copysign(F32(1), v), F32(0)).astype(F32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``qs[j] = q[j] | q[j+16] << 4`` (stored as uint8): int[32, nb] -> u8[nb, 16]."""
    return ((q[:16] | (q[16:] << 4)) & 0xFF).astype(np.uint8).T


def pack_qh(q: np.ndarray) -> np.ndarray:
    """Bit 4 of q[j] -> bit j of a little-endian uint32: int[32, nb] -> u8[nb, 4]."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)[:, None]
    return np.bitwise_or.reduce(bits, axis=0).astype("<u4").view(np.uint8).reshape(-1, 4)


# ---- imatrix fitting, element-major [32, nb] -------------------------------------------------------------


def blocks32(rows: np.ndarray) -> np.ndarray:
    """f32[R, N] -> element-major f32[32, nb] (block b = row b // (N/32), columns 32*(b % (N/32)) + j)."""
    return element_major(np.asarray(rows, dtype=F32).reshape(-1, 32))


def row_weights(rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """qw*sqrtf(sigma2 + x^2), sigma2 = (sequential sum of x^2 over the row)/n_per_row: f32[R, N] -> f32[32, nb]."""
    rows = np.asarray(rows, dtype=F32)
    xt = element_major(rows)  # [N, R]
    sigma2 = seqsum(xt * xt) / F32(rows.shape[1])  # [R]
    return blocks32(np.asarray(imatrix, dtype=F32) * np.sqrt(sigma2[:, None] + rows * rows))


# ---- the types ---------------------------------------------------------------------------------------


@register
class Q8_0(QuantType):
    """34 B / 32: d, qs[32] (int8). ``quantize_row_q8_0_ref``: d = amax/127, q = roundf(x/d)."""

    qtype = GGMLQuantizationType.Q8_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = blocks32(rows)  # [32, nb]
        d = np.abs(x).max(axis=0) / F32(127)  # [nb]
        with np.errstate(invalid="ignore"):
            qs = (c_int(roundf(x * inv_or_zero(d))) & 0xFF).astype(np.uint8)  # [32, nb]
        return np.concatenate([fp16_bytes(d), qs.T], axis=1).reshape(len(rows), -1)


def _symmetric_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q4_0_ref`` / ``q5_0_ref``: d = max/-nmax, q = MIN(2nmax-1, (int8_t)(x/d + nmax+0.5))."""
    mx, amax = signed_absmax(x)  # [nb]
    d = np.where(amax > 0, mx, F32(0)) / F32(-nmax)  # an all-zero block keeps C's max = +0
    with np.errstate(invalid="ignore"):
        v = x * inv_or_zero(d) + F32(nmax + 0.5)
    q = np.minimum(2 * nmax - 1, c_int(v).astype(np.int8)).astype(np.uint8)  # [32, nb]
    return d, q.astype(np.int64)


def _affine_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_row_q4_1_ref`` / ``q5_1_ref``: d = (max-min)/nmax, q = (int)((x-min)/d + 0.5);
    Q4_1 takes MIN(15, (int8_t)q), Q5_1 plain (uint8_t)q."""
    mn = np.take_along_axis(x, x.argmin(axis=0)[None], axis=0)[0]  # [nb] first occurrence: the C sign of 0
    mx = np.take_along_axis(x, x.argmax(axis=0)[None], axis=0)[0]
    d = (mx - mn) / F32(nmax)
    with np.errstate(invalid="ignore"):
        q = c_int((x - mn) * inv_or_zero(d) + F32(0.5))  # [32, nb]
    q = np.minimum(15, q.astype(np.int8)).astype(np.uint8) if nmax == 15 else q.astype(np.uint8)
    return d, mn, q.astype(np.int64)


@register
class Q4_0(QuantType):
    """18 B / 32: d, qs[16] (q[j] | q[j+16] << 4); value d*(q-8)."""

    qtype = GGMLQuantizationType.Q4_0

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = blocks32(rows)  # [32, nb]
        if imatrix is None:
            d, q = _symmetric_ref(x, 8)
        else:  # quantize_row_q4_0_impl
            d, q = make_qx_quants(x, 8, qw=row_weights(rows, imatrix))
        return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1).reshape(len(rows), -1)


@register
class Q5_0(QuantType):
    """22 B / 32: d, qh[4] (bit 4 of q[j] at bit j), qs[16]; value d*(q-16)."""

    qtype = GGMLQuantizationType.Q5_0

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = blocks32(rows)  # [32, nb]
        if imatrix is None:
            d, q = _symmetric_ref(x, 16)
        else:  # quantize_row_q5_0_impl
            d, q = make_qx_quants(x, 16, qw=row_weights(rows, imatrix))
        return np.concatenate([fp16_bytes(d), pack_qh(q), pack_nibbles(q & 0xF)], axis=1).reshape(len(rows), -1)


def _affine(rows: np.ndarray, imatrix: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = blocks32(rows)  # [32, nb]
    if imatrix is None:
        return _affine_ref(x, nmax)
    # quantize_row_q4_1_impl / q5_1_impl: m = -the_min
    d, the_min, q = make_qkx3_quants(x, row_weights(rows, imatrix), nmax, -0.9, 0.05, 36, False)
    return d, -the_min, q


@register
class Q4_1(QuantType):
    """20 B / 32: d, m, qs[16]; value d*q + m."""

    qtype = GGMLQuantizationType.Q4_1

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        d, m, q = _affine(rows, imatrix, 15)
        return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles(q)], axis=1).reshape(len(rows), -1)


@register
class Q5_1(QuantType):
    """24 B / 32: d, m, qh[4], qs[16]; value d*q + m."""

    qtype = GGMLQuantizationType.Q5_1

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        d, m, q = _affine(rows, imatrix, 31)
        parts = [fp16_bytes(d), fp16_bytes(m), pack_qh(q), pack_nibbles(q & 0xF)]
        return np.concatenate(parts, axis=1).reshape(len(rows), -1)
