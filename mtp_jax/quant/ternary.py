"""TQ1_0, TQ2_0 (ternary, BitNet b1.58 / TriLM) and MXFP4: ggml ignores the imatrix for all three.

Mirrors ``quantize_row_tq1_0_ref``, ``quantize_row_tq2_0_ref`` and ``quantize_row_mxfp4_ref`` in
ggml-quants.c (block structs in ggml-common.h).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.legacy import c_int, inv_or_zero, roundf
from mtp_jax.quant.primitives import fp16_bytes

KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def _trits(x: np.ndarray, id_: np.ndarray) -> np.ndarray:
    """``lroundf(x*id) + 1`` in {0, 1, 2}. A non-finite product (id = inf for a subnormal amax) makes
    glibc's lroundf return LONG_MIN, whose low 32 bits plus 1 give 1."""
    with np.errstate(invalid="ignore"):
        v = x * id_[:, None]  # [nb, 256]
    return np.where(np.isfinite(v), roundf(v), np.float32(0)).astype(np.int32) + 1


def _ternary_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.abs(x).max(axis=1)  # [nb]  amax = MAX(amax, fabsf(v))
    return d, inv_or_zero(d)


@register
class TQ1_0(QuantType):
    """54 B / 256: qs[48] (5 trits per byte), qh[4] (4 trits per byte), d. ``quantize_row_tq1_0_ref``."""

    qtype = GGMLQuantizationType.TQ1_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, QK_K)  # [nb, 256]
        d, id_ = _ternary_scale(x)
        t = _trits(x, id_)  # [nb, 256]
        # qs[0:32]: x[m + 32n], n = 0..4; qs[32:48]: x[160 + m + 16n]; qh[0:4]: x[240 + j + 4m], m = 0..3
        groups = (
            t[:, :160].reshape(-1, 5, 32),  # [nb, 5, 32]
            t[:, 160:240].reshape(-1, 5, 16),  # [nb, 5, 16]
            np.pad(t[:, 240:].reshape(-1, 4, 4), ((0, 0), (0, 1), (0, 0))),  # [nb, 5, 4], 5th trit 0
        )
        packed = []
        for g in groups:  # most significant trit first: q = q*3 + xi; qh gets a trailing q *= 3 (a 0 trit)
            q = np.zeros(g[:, 0].shape, dtype=np.int32)
            for n in range(5):
                q = q * 3 + g[:, n]
            packed.append(((q * 256 + 242) // 243).astype(np.uint8))  # ceiling division by 3^5
        return np.concatenate([*packed, fp16_bytes(d)], axis=1).reshape(len(rows), -1)


@register
class TQ2_0(QuantType):
    """66 B / 256: qs[64] (2 bits per trit), d. ``quantize_row_tq2_0_ref``."""

    qtype = GGMLQuantizationType.TQ2_0
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, QK_K)  # [nb, 256]
        d, id_ = _ternary_scale(x)
        t = (_trits(x, id_) & 3).reshape(-1, 2, 4, 32)  # [nb, chunk, n, m]: x[128*chunk + 32n + m]
        qs = (t[:, :, 0] | t[:, :, 1] << 2 | t[:, :, 2] << 4 | t[:, :, 3] << 6).astype(np.uint8)  # [nb, 2, 32]
        return np.concatenate([qs.reshape(-1, 64), fp16_bytes(d)], axis=1).reshape(len(rows), -1)


def _e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """``ggml_e8m0_to_fp32_half``: 2^(e - 128), built from the float bits."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


@register
class MXFP4(QuantType):
    """17 B / 32: e (E8M0 shared exponent), qs[16] (E2M1 nibbles). ``quantize_row_mxfp4_ref``."""

    qtype = GGMLQuantizationType.MXFP4
    imatrix = "ignored"

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, 32)  # [nb, 32]
        amax = np.abs(x).max(axis=1)  # [nb]
        # floorf(log2f(amax)): log2 rounded once to f32, as glibc's log2f (which rounds up to k just below 2^k, k >= 4)
        with np.errstate(divide="ignore"):
            lg = np.log2(amax.astype(np.float64)).astype(np.float32)
        ef = np.floor(lg) - np.float32(2) + np.float32(127)
        e = np.where(amax > 0, c_int(ef) & 0xFF, 0).astype(np.uint8)  # (uint8_t) of the float
        d = _e8m0_to_fp32_half(e)  # [nb]
        # best_index_mxfp4: the first index with the smallest |kv*d - x|
        q = np.zeros(x.shape, dtype=np.uint8)  # [nb, 32]
        best = np.abs(KVALUES_MXFP4[0] * d[:, None] - x)
        with np.errstate(over="ignore"):  # kv*d overflows for the wrapped e of a subnormal amax, as in C
            for i in range(1, 16):
                err = np.abs(KVALUES_MXFP4[i] * d[:, None] - x)
                take = err < best
                q = np.where(take, np.uint8(i), q)
                best = np.where(take, err, best)
        qs = q[:, :16] | (q[:, 16:] << 4)
        return np.concatenate([e[:, None], qs], axis=1).reshape(len(rows), -1)
