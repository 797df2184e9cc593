"""IQ4_NL (18 B / 32) and IQ4_XS (136 B / 256): 4-bit indices into the non-linear ``kvalues_iq4nl``.

Both mirror ``quantize_row_iq4_nl_impl`` (ggml-quants.c) with ntry = 7, the file path
(``quantize_iq4_nl`` / ``quantize_iq4_xs``). Weights are qw*sqrt(sigma2 + x^2) with an imatrix and x^2
without; sigma2 = 2*sum(x^2)/super_block_size. The KV-cache writer ``quantize_row_iq4_nl_ref`` (ntry = -1)
is a different path and not reproduced here.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.legacy import blocks32, inv_or_zero, pack_nibbles
from mtp_jax.quant.primitives import (
    F32,
    GROUP_MAX_EPS,
    element_major,
    fp16_bytes,
    nearest_int,
    seqsum,
    signed_absmax,
)
from mtp_jax.quant.primitives import best_index_int8 as best_index_int8_c

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
KV = KVALUES_IQ4NL.astype(F32)
NTRY = 7


# The decision points (midpoints of the integer kvalues) are multiples of 1/2 and C's float32 differences
# are exact near them, so the index is constant on each [k/2, (k+1)/2): a table on floor(2v) reproduces
# the C search for every float32 (checked exhaustively over |v| < 130), several times faster.
_BEST_INDEX_LUT = best_index_int8_c(KVALUES_IQ4NL, np.arange(-256, 257, dtype=F32) / F32(2))


def best_index_int8(v: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, v)``: f32[...] -> int[...], the nearest value, an exact tie
    going up; NaN gives 15 as in C."""
    k = np.fmax(np.fmin(np.floor(v * F32(2)), F32(256)), F32(-256))  # fmin first: NaN -> 256
    return _BEST_INDEX_LUT[k.astype(np.int64) + 256]


def _block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-32 scale search of ``quantize_row_iq4_nl_impl``: f32[32, nb] -> f32[nb] (0 for |max| < eps)."""
    mx, amax = signed_absmax(x)  # [nb]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    def sums(id_):  # [nb] -> sumqx, sumq2
        q = KV[best_index_int8(id_ * x)]  # [32, nb]
        wq = w * q
        return seqsum(wq * x), seqsum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sumqx, sumq2 = sums(F32(1) / (-mx / KV[0]))
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = sums(F32(itry + KV[0]) / mx)
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(take, sumqx / sumq2, d)
            best = np.where(take, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _subblocks(rows: np.ndarray, imatrix: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> x, w f32[32, nb] (element-major 32-value sub-blocks, ``size``/32 per superblock, in order).
    w = qw*sqrt(sigma2 + x^2), sigma2 = 2*sum(x^2)/size per superblock; x^2 without imatrix."""
    x = blocks32(rows)  # [32, nb]
    if imatrix is None:
        return x, x * x
    xs = element_major(np.asarray(rows, dtype=F32).reshape(-1, size))  # [size, ns]
    sigma2 = np.repeat(seqsum(xs * xs) * F32(2.0 / size), size // 32)  # [nb]
    qw = blocks32(np.broadcast_to(np.asarray(imatrix, F32), np.shape(rows)))  # per column, all rows
    return x, qw * np.sqrt(sigma2 + x * x)


@register
class IQ4_NL(QuantType):
    """18 B / 32: d, qs[16] (L[j] | L[j+16] << 4); value d*kv[L]."""

    qtype = GGMLQuantizationType.IQ4_NL

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x, w = _subblocks(rows, imatrix, 32)  # [32, nb]
        d = _block_scales(x, w)  # [nb]
        L = best_index_int8(inv_or_zero(d) * x)  # unrounded d; 0 -> index 8
        return np.concatenate([fp16_bytes(d), pack_nibbles(L)], axis=1).reshape(len(rows), -1)


@register
class IQ4_XS(QuantType):
    """136 B / 256: d, scales_h (u16, 2 high bits per sub-block), scales_l[4] (nibbles), qs[128];
    value d*(ls-32)*kv[L]."""

    qtype = GGMLQuantizationType.IQ4_XS

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x, w = _subblocks(rows, imatrix, QK_K)  # [32, nb], nb = 8*ns
        scales = _block_scales(x, w).reshape(-1, 8)  # [ns, 8]
        ns = scales.shape[0]
        mx, amax = signed_absmax(scales.T)  # [ns]
        d = -np.where(amax > 0, mx, F32(0)) / F32(32)  # all-zero -> -0.0 (bytes 00 80)
        l = np.clip(nearest_int(inv_or_zero(d)[:, None] * scales), -32, 31)  # [ns, 8]
        dl = d[:, None] * l.astype(F32)  # the fp32 d, not its fp16 rounding
        L = best_index_int8(inv_or_zero(dl.reshape(-1)) * x)  # [32, nb]
        ls = (l + 32).astype(np.uint32)
        scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint32)), axis=1)
        scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)  # [ns, 4]
        parts = [
            fp16_bytes(d),
            scales_h.astype("<u2").view(np.uint8).reshape(ns, 2),
            scales_l.astype(np.uint8),
            pack_nibbles(L).reshape(ns, 128),
        ]
        return np.concatenate(parts, axis=1).reshape(len(rows), -1)
