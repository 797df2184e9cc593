"""IQ4_NL (18 B / 32) and IQ4_XS (136 B / 256): 4-bit indices into the non-linear ``kvalues_iq4nl``.

Both mirror ``quantize_row_iq4_nl_impl`` (ggml-quants.c) with ntry = 7, the file path
(``quantize_iq4_nl`` / ``quantize_iq4_xs``). Weights are qw*sqrt(sigma2 + x^2) with an imatrix and x^2
without; sigma2 = 2*sum(x^2)/super_block_size. The KV-cache writer ``quantize_row_iq4_nl_ref`` (ntry = -1)
is a different path and not reproduced here.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.legacy import blocks32, inv_or_zero, pack_nibbles
from mtp_jax.quant.primitives import (
    F32,
    GROUP_MAX_EPS,
    _blend,
    _select_bits,
    dot0,
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
_BEST_INDEX_LUT = best_index_int8_c(KVALUES_IQ4NL, np.arange(-256, 257, dtype=F32) / F32(2)).astype(np.uint8)
_VALUE_LUT = KV[_BEST_INDEX_LUT]  # kvalues[best_index_int8(v)] by floor(2v) + 256: all the search needs
_PIECE_BLOCKS = 2048  # 32-value blocks per search piece: 64K values, so the temporaries stay in L2
_CHUNK_VALUES = 1 << 18  # values per call of a type's pipeline: its full-size temporaries (~20 bytes per value)
# stay ~5 MiB, not ~20 MiB for a quantizer process's 1M-value piece (tracemalloc peak), at the same speed


def _lut_slots(t: np.ndarray, k: np.ndarray, clamp: bool) -> np.ndarray:
    """k = floor(t) + 256 as int32, the table slot of v = t/2 (t is overwritten).

    ``clamp`` first limits t to [-256, 256] (NaN -> 256, i.e. index 15 as in C), which keeps the float ->
    int cast defined for any input; without it t must be finite and |t| < 2^31 - 256, and slots outside
    [0, 512] are left for ``np.take(..., mode="clip")`` to map to the end entries.
    """
    if clamp:
        np.fmin(t, F32(256), out=t)
        np.fmax(t, F32(-256), out=t)
    np.floor(t, out=t)
    np.copyto(k, t, casting="unsafe")
    k += 256
    return k


def best_index_int8(v: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, v)``: f32[...] -> u8[...], the nearest value, an exact tie
    going up; NaN gives 15 as in C."""
    t = np.multiply(v, F32(2), dtype=F32)
    return _BEST_INDEX_LUT[_lut_slots(t, np.empty(t.shape, np.int32), True)]


def _block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-32 scale search of ``quantize_row_iq4_nl_impl``: f32[32, nb] -> f32[nb] (0 for |max| < eps).

    Runs on column pieces of about 64K values so that the 15 tries stream through the CPU cache rather
    than memory; the pieces are balanced so that each has the two or more blocks ``dot0`` needs.
    """
    nb = x.shape[1]
    if nb == 1:  # a lone block is searched twice
        return _block_scales(np.repeat(x, 2, axis=1), np.repeat(w, 2, axis=1))[:1]
    n = -(-nb // _PIECE_BLOCKS)
    bounds = [nb * i // n for i in range(n + 1)]
    d = np.empty(nb, F32)
    for s, e in pairwise(bounds):
        d[s:e] = _search_piece(np.ascontiguousarray(x[:, s:e]), np.ascontiguousarray(w[:, s:e]))
    return d


def _search_piece(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The scale search on one piece: x, w f32[32, B] C-contiguous, B >= 2 -> f32[B].

    Each try needs only q = kv[best_index(id*x)], looked up by floor(2*id*x) with 2*id*x computed as
    (2*id)*x (the same float: scaling by two is exact), and the sums (w*q)*x, (w*q)*q in C order (dot0).
    Finite x keep |2*id*x| < 270, so only pieces with inf / NaN need the clamp; the per-block selections
    are branch-free (``_blend``). The temporaries are reused in place.
    """
    mx, amax = signed_absmax(x)  # [B]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    clamp = not np.isfinite(x).all()
    t = np.empty_like(x)  # 2*id*x, [32, B]
    k = np.empty(x.shape, np.int32)  # its table slot
    q = np.empty_like(x)  # kv[index]
    sums = np.empty((2, x.shape[1]), F32)  # sumqx, sumq2

    def search_sums(id_):  # [B] -> sums
        np.multiply(x, id_ * F32(2), out=t)
        np.take(_VALUE_LUT, _lut_slots(t, k, clamp), mode="clip", out=q)
        dot0(w, q, x, out=sums[0])
        dot0(w, q, q, out=sums[1])
        return sums

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sumqx, sumq2 = search_sums(F32(1) / (-mx / KV[0]))
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        state = np.stack([d * sumqx, d])  # best, d
        new = np.empty_like(state)
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = search_sums(F32(itry + KV[0]) / mx)
            take = (sumq2 > 0) & (sumqx * sumqx > state[0] * sumq2)
            np.divide(sumqx, sumq2, out=new[1])
            np.multiply(new[1], sumqx, out=new[0])
            state = _blend(_select_bits(take), new, state)
    return np.where(zero, F32(0), state[1])


def _in_chunks(quantize_rows, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """quantize_rows on whole rows, at most _CHUNK_VALUES values a call (blocks are independent)."""
    step = max(1, _CHUNK_VALUES // rows.shape[1])
    if rows.shape[0] <= step:
        return quantize_rows(rows, imatrix)
    return np.concatenate([quantize_rows(rows[s:s + step], imatrix) for s in range(0, rows.shape[0], step)])


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
        return _in_chunks(cls._quantize_chunk, rows, imatrix)

    @staticmethod
    def _quantize_chunk(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
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
        return _in_chunks(cls._quantize_chunk, rows, imatrix)

    @staticmethod
    def _quantize_chunk(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
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
