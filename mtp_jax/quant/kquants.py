"""K-quants Q2_K..Q6_K (ggml-quants.c), bit-exact with ggml_quantize_chunk.

``quantize_qN_K`` in C runs ``quantize_row_qN_K_ref`` on the whole chunk when the imatrix is NULL and
``quantize_row_qN_K_impl`` row by row otherwise; the two are different algorithms, mirrored here by the
``_ref``/``_impl`` branches of each class. Superblocks are independent, so rows are flattened into
superblocks f32[B, 256] and processed in chunks; the sub-block searches work in the element-major layout
of ``primitives`` (``xt``: f32[n, B*k], element i of sub-block j of superblock b at ``[i, b*k + j]``), the
per-superblock steps on [k, B] arrays (reductions over axis 0 are the fast ones) and the final
requantization (``_requant``) on the superblocks as they are.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax.quant import primitives
from mtp_jax.quant.base import QK_K, QuantType, register
from mtp_jax.quant.primitives import (
    F32,
    GROUP_MAX_EPS,
    _clip,
    dot0,
    element_major,
    fp16_bytes,
    fp16_round,
    make_q3_quants,
    make_qkx_search,
    make_qp_quants,
    make_qx_quants,
    make_qx_search,
    nearest_int,
    nearest_int_inplace,
    positive_max,
    qkx_levels,
    qx_levels,
    seqsum,
    signed_absmax,
)


def _subblocks(xb: np.ndarray, n: int) -> np.ndarray:
    """superblocks f32[B, 256] -> element-major sub-blocks f32[n, B*256/n] (sub-block j of block b at b*k + j)."""
    B = xb.shape[0]
    return np.ascontiguousarray(xb.reshape(B, QK_K // n, n).transpose(2, 0, 1)).reshape(n, -1)


def _per_block(a: np.ndarray, k: int) -> np.ndarray:
    """Per-sub-block values [B*k] -> [k, B] (the k sub-blocks of a superblock on axis 0, element-major)."""
    return np.ascontiguousarray(a.reshape(-1, k).T)


def _impl_weights(xb: np.ndarray, xt: np.ndarray, qw: _Imatrix, factor: float) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])``, sigma2 = factor*sum_x2/QK_K per superblock.

    xb f32[B, 256], its sub-blocks xt f32[n, B*k], qw their imatrix -> f32[n, B*k].
    """
    n = xt.shape[0]
    xe = element_major(xb)  # [256, B]
    sum_x2 = dot0(xe, xe) if xe.shape[1] > 1 else seqsum(xe * xe)  # [B]: sum_x2 += x[l]*x[l]
    sigma2 = F32(factor) * sum_x2 / F32(QK_K)
    w = np.multiply(xt, xt)
    w += np.repeat(sigma2, QK_K // n)
    np.sqrt(w, out=w)
    w *= qw.sub(n)
    return w


def _requant(xb: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int, L) -> np.ndarray:
    """Final pass: ``l = clamp(nearest_int((x + dm)/d), lo, hi) - lo``, skipping sub-blocks with d == 0.

    xb f32[B, 256] with k sub-blocks each; d, dm f32[B*k] (sub-block j of block b at b*k + j, as in ``xt``);
    L u8[n, B*k] the element-major search-stage levels, kept where d == 0 (stale, as in C), or a function
    giving them for some sub-blocks (``L(cols) -> u8[n, len(cols)]``), called only if needed -> u8[B, 256].
    Runs on the superblocks as they are, so the levels come out in element order (the Q6_K profile: the
    u8 transpose from the element-major layout cost more than this whole pass).
    Uses the exact nearest_int: with a huge offset against a tiny range, (x + dm)/d can pass 2^22.
    """
    xs = xb.reshape(d.size, -1)  # [B*k, n]
    q = np.empty_like(xs)
    with np.errstate(divide="ignore", invalid="ignore"):  # d == 0 sub-blocks are replaced below
        if dm is not None:
            np.add(xs, dm[:, None], out=q)
            np.divide(q, d[:, None], out=q)
        else:
            np.divide(xs, d[:, None], out=q)
        l = nearest_int_inplace(q)
    _clip(l, lo, hi, out=l)
    if lo:
        l -= lo
    out = l.astype(np.uint8)
    skip = np.flatnonzero(d == 0)
    if skip.size:
        out[skip] = (L(skip) if callable(L) else L[:, skip]).T
    return out.reshape(xb.shape)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K qs: levels u8[B, 256] (< 4) -> u8[B, 64]; qs[32c + l] holds element 128c + 32k + l at bit 2k."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K scales[12] from 6-bit codes ls, lm int[8, B] (C's byte truncation of wider values) -> u8[B, 12]."""
    ls = ls.astype(np.int32)
    lm = lm.astype(np.int32)
    out = np.concatenate(
        [ls[:4] | ((ls[4:] >> 4) << 6), lm[:4] | ((lm[4:] >> 4) << 6), (ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4)]
    )
    return (out.T & 0xFF).astype(np.uint8)


def _unpack_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: scales u8[B, 12] -> (sc, m) f32[8, B]."""
    q = q.T.astype(np.int32)
    sc = np.concatenate([q[:4] & 63, (q[8:] & 0xF) | ((q[:4] >> 6) << 4)])
    m = np.concatenate([q[4:8] & 63, (q[8:] >> 4) | ((q[4:8] >> 6) << 4)])
    return sc.astype(F32), m.astype(F32)


def _sub_scale(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(y[i].d) * code`` per sub-block: d f32[B], codes f32[k, B] -> f32[B*k] (xt's order)."""
    with np.errstate(invalid="ignore"):  # an inf d (fp16 overflow) times a zero code, as in C
        return (fp16_round(d) * codes).T.reshape(-1)


def _search(xb: np.ndarray, qw: _Imatrix | None, fn, pieces: int = 1) -> tuple[np.ndarray, ...]:
    """Runs ``fn(xb_piece, qw_piece)`` over cache-sized pieces of the superblocks f32[B, 256] (about
    ``pieces * primitives._PIECE`` values each) and joins its outputs along their last (sub-block) axis."""
    step = max(1, pieces * primitives._PIECE // QK_K)
    parts = [fn(xb[s : s + step], None if qw is None else qw[s : s + step]) for s in range(0, xb.shape[0], step)]
    return parts[0] if len(parts) == 1 else tuple(np.concatenate(p, axis=-1) for p in zip(*parts))


class _KQuant(QuantType):
    """Splits rows into chunks of ``chunk`` superblocks (independent in every K-quant); subclasses implement
    ``quantize_blocks``. A chunk of 256 superblocks (64K values, ``primitives._PIECE``) is one search piece,
    so the whole pipeline of a chunk (layout, search, requantization) runs on cache-resident arrays; types
    whose per-superblock steps cost more per call may use larger chunks, searched in pieces (``_search``)."""

    chunk = 256

    @classmethod
    def quantize_rows(cls, rows, imatrix):
        R, N = rows.shape
        nbr = N // QK_K
        xb = rows.reshape(-1, QK_K)  # [R*nbr, 256]
        step = max(1, cls.chunk // nbr) * nbr  # whole rows, so that every full chunk has the same imatrix
        # C: quant_weights + QK_K*i for superblock i of a row
        qw = None if imatrix is None else _Imatrix(np.tile(imatrix.reshape(nbr, QK_K), (step // nbr, 1)))
        out = np.empty((xb.shape[0], cls.type_size()), np.uint8)
        for s in range(0, xb.shape[0], step):
            e = min(s + step, xb.shape[0])
            out[s:e] = cls.quantize_blocks(xb[s:e], None if qw is None else qw[: e - s])
        return out.reshape(R, -1)

    @classmethod
    def quantize_blocks(cls, xb: np.ndarray, qw: _Imatrix | None) -> np.ndarray:
        """xb f32[B, 256], qw the imatrix of these superblocks (or None) -> u8[B, type_size]."""
        raise NotImplementedError


class _Imatrix:
    """The imatrix of a run of superblocks, f32[B, 256], with its element-major sub-block layouts
    (``sub(n)`` = ``_subblocks(raw, n)``) computed once: every row-aligned chunk of a tensor has the same
    imatrix, so the chunks and the search pieces share them."""

    def __init__(self, raw: np.ndarray, subs: dict[int, np.ndarray] | None = None):
        self.raw = raw
        self._subs = {} if subs is None else subs

    def sub(self, n: int) -> np.ndarray:
        """f32[n, B*256/n]."""
        if n not in self._subs:
            self._subs[n] = _subblocks(self.raw, n)
        return self._subs[n]

    def __getitem__(self, sl: slice) -> _Imatrix:
        """Superblocks ``sl`` (a slice with start/stop); the cached layouts are sliced, not recomputed."""
        a, b, _ = sl.indices(len(self.raw))
        if (a, b) == (0, len(self.raw)):
            return self
        return _Imatrix(self.raw[a:b], {n: v[:, a * (QK_K // n) : b * (QK_K // n)] for n, v in self._subs.items()})


# ---------------------------------------------------------------------------------------------- Q4_K / Q5_K


def _search_q45_k(xb: np.ndarray, qw: _Imatrix | None, nmax: int):
    """Sub-block fits of quantize_row_q{4,5}_K_ref / _impl: make_qkx_search's (scales, mins, iscale, lmin,
    degenerate) [B*8] (+ sw with qw)."""
    xt = _subblocks(xb, 32)  # [32, B*8]
    if qw is None:
        av_x = np.sqrt(seqsum(xt * xt) / F32(32))  # [B*8]
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        return make_qkx_search(xt, av_x + np.abs(xt), nmax, rmin, 0.1, nstep, False)
    w = _impl_weights(xb, xt, qw, 2.0)
    return (*make_qkx_search(xt, w, nmax, -0.9, 0.05, 36, False), seqsum(w))


def _stale_qkx(xt: np.ndarray, res: tuple[np.ndarray, ...], nmax: int):
    """The search-stage levels of some sub-blocks (for ``_requant``), from make_qkx_search's results."""
    return lambda cols: qkx_levels(xt[:, cols], res[2][cols], res[3][cols], res[4][cols], nmax)


def _quantize_q45_k(xb: np.ndarray, qw: _Imatrix | None, nmax: int):
    """quantize_row_q{4,5}_K_ref / _impl on f32[B, 256] -> (L u8[B, 256], d f32[B], dmin f32[B], scales u8[B, 12])."""
    B = xb.shape[0]
    res = _search(xb, qw, lambda x, q: _search_q45_k(x, q, nmax), primitives.QKX_PIECES)
    sc = _per_block(res[0], 8)  # [8, B]
    mn = _per_block(res[1], 8)
    if qw is None:
        max_scale = positive_max(sc)  # [B]
        max_min = positive_max(mn)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int(inv_scale * sc) & 0xFF)  # uint8_t ls, then MIN(63, ls)
        lm = np.minimum(63, nearest_int(inv_min * mn) & 0xFF)
        d = max_scale / F32(63)
        dmin = max_min / F32(63)
    else:
        sw8 = _per_block(res[5], 8)  # [8, B]
        # make_qp_quants(8, 63, scales, Ls, sw) and (mins, Lm, sw) as one batch of 2B blocks
        dm, Lsm = make_qp_quants(np.concatenate([sc, mn], axis=1), 63, np.concatenate([sw8, sw8], axis=1))
        d, dmin = dm[:B], dm[B:]
        ls, lm = Lsm[:, :B], Lsm[:, B:]
        if nmax == 31:  # quantize_row_q5_K_impl clamps, the Q4_K one does not
            ls = np.minimum(63, ls)
            lm = np.minimum(63, lm)
    packed = _pack_scale_min_k4(ls, lm)  # [B, 12]
    sc_q, m_q = _unpack_scale_min_k4(packed)
    xt = xb.reshape(-1, 32).T  # [32, B*8], a view: the stale sub-blocks only are gathered from it
    L = _requant(xb, _sub_scale(d, sc_q), _sub_scale(dmin, m_q), 0, nmax, _stale_qkx(xt, res, nmax))
    return L, d, dmin, packed


@register
class Q4_K(_KQuant):
    """quantize_q4_K: no imatrix -> quantize_row_q4_K_ref (make_qkx2_quants(15, -1, 0.1, 20), 6-bit codes
    by max); imatrix -> quantize_row_q4_K_impl (make_qkx3_quants(15, -0.9, 0.05, 36), make_qp_quants(63))."""

    qtype = GGMLQuantizationType.Q4_K
    chunk = 1536  # two make_qkx search pieces (3 * _PIECE values each); per-superblock steps amortized

    @classmethod
    def quantize_blocks(cls, xb, qw):
        L, d, dmin, scales = _quantize_q45_k(xb, qw, 15)
        q = L.reshape(-1, 4, 2, 32)  # [B, chunk c, half, l]: element 64c + 32h + l
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
        return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), scales, qs], axis=-1)


@register
class Q5_K(_KQuant):
    """quantize_q5_K: no imatrix -> quantize_row_q5_K_ref (make_qkx2_quants(31, -0.5, 0.1, 15)); imatrix ->
    quantize_row_q5_K_impl (make_qkx3_quants(31, -0.9, 0.05, 36), make_qp_quants(63), MIN(63, .))."""

    qtype = GGMLQuantizationType.Q5_K
    chunk = 1536  # two make_qkx search pieces (3 * _PIECE values each); per-superblock steps amortized

    @classmethod
    def quantize_blocks(cls, xb, qw):
        L, d, dmin, scales = _quantize_q45_k(xb, qw, 31)
        q = L.reshape(-1, 4, 2, 32)  # [B, chunk c, half h, l]
        qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)[:, :, None]
        qh = np.bitwise_or.reduce(((q >> 4) << shifts).reshape(-1, 8, 32), axis=1)  # bit 2c+h of qh[l]
        return np.concatenate([fp16_bytes(d), fp16_bytes(dmin), scales, qh, qs], axis=-1)


# ---------------------------------------------------------------------------------------------- Q6_K


@register
class Q6_K(_KQuant):
    """quantize_q6_K: make_qx_quants(16, 32, rmse_type 1) per 16 values with weights x^2 (ref, no imatrix)
    or the raw imatrix (quantize_row_q6_K_impl: no sigma^2 term); int8 scales by -128/max_scale.

    Profile (line timings, 4096-column rows, one thread): make_qx_quants' 19 tries were 30% level passes
    (multiply, rint, clamp) and 28% sums (two einsums), its per-try selection on one 4K-sub-block piece 12%
    (mostly call overhead), the requantization with its u8 transpose back to element order 7%. Now the
    selection runs once per chunk, four tries skip the clamp and the requantization works in element
    order: the tries' element passes are ~70% of the time, at NumPy's cost per pass (a piece's four
    64K-value arrays fill L2; longer rows or pieces measured slower).
    """

    qtype = GGMLQuantizationType.Q6_K
    chunk = 1024  # four search pieces: make_qx_search's selection runs once on their 16K sub-blocks

    @classmethod
    def quantize_blocks(cls, xb, qw):
        B = xb.shape[0]
        xt = _subblocks(xb, 16)  # [16, B*16]
        scales, iscales, zero16 = make_qx_search(xt, 32, 1, None if qw is None else qw.sub(16))
        sc = _per_block(scales, 16)  # [16, B]
        max_scale, max_abs = signed_absmax(sc)  # [B]
        zero = max_abs < GROUP_MAX_EPS
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d = F32(1) / iscale
        isc = np.minimum(127, nearest_int(iscale * sc)).astype(np.int8)  # [16, B]
        dd = _sub_scale(d, isc.astype(F32))

        def stale(cols):  # the search's levels, for sub-blocks whose scale code is 0
            return qx_levels(xt[:, cols], iscales[cols], zero16[cols], 32)

        L = _requant(xb, dd, None, -32, 31, stale)  # [B, 256]
        # element 128h + 32k + l, four levels (< 64) per little-endian word: the byte-wise shifts and masks
        # below never carry into a neighbouring byte, and NumPy's uint32 ops are far cheaper than uint8 ones
        q = L.view("<u4").reshape(B, 2, 4, 8)
        lo4, two = np.uint32(0x0F0F0F0F), np.uint32(0x03030303)
        ql = (q[:, :, :2] & lo4) | ((q[:, :, 2:] & lo4) << 4)  # ql[64h + 32k + l] = q[h,k] | q[h,k+2] << 4
        hi = (q >> 4) & two  # the top 2 bits of each level
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        out = np.concatenate(
            [ql.view(np.uint8).reshape(B, 128), qh.view(np.uint8).reshape(B, 64), isc.T.view(np.uint8), fp16_bytes(d)],
            axis=-1,
        )
        out[zero] = 0  # memset(&y[i], 0, sizeof(block_q6_K))
        return out


# ---------------------------------------------------------------------------------------------- Q3_K


def _pack_q3_scales(s6: np.ndarray) -> np.ndarray:
    """Q3_K scales[12] from 6-bit codes s6 int[16, B]: low nibbles in bytes 0..7, top 2 bits in 8..11 -> u8[B, 12]."""
    s6 = s6.astype(np.int32)
    h = s6 >> 4  # bits 2*(j/4) of byte 8 + j%4
    out = np.concatenate(
        [(s6[:8] & 0xF) | ((s6[8:] & 0xF) << 4), h[:4] | (h[4:8] << 2) | (h[8:12] << 4) | (h[12:] << 6)]
    )
    return (out.T & 0xFF).astype(np.uint8)


def _unpack_q3_scales(q: np.ndarray) -> np.ndarray:
    """Q3_K scales u8[B, 12] -> signed scales f32[16, B] (code - 32)."""
    q = q.T.astype(np.int32)
    lo = np.concatenate([q[:8] & 0xF, q[:8] >> 4])
    j = np.arange(16)
    hi = (q[8 + j % 4] >> (2 * (j // 4))[:, None]) & 3
    return ((lo | (hi << 4)) - 32).astype(F32)


def _search_q3_k_impl(xb: np.ndarray, qw: _Imatrix) -> tuple[np.ndarray, ...]:
    """Sub-block fits of quantize_row_q3_K_impl: make_qx_search's (scales, iscale, zero) and sw, f32[B*16]."""
    xt = _subblocks(xb, 16)  # [16, B*16]
    w = _impl_weights(xb, xt, qw, 2.0)
    return (*make_qx_search(xt, 4, 1, w), seqsum(w))


@register
class Q3_K(_KQuant):
    """quantize_q3_K: no imatrix -> quantize_row_q3_K_ref (make_q3_quants(16, 4, rmse), scales by
    -32/max_scale); imatrix -> quantize_row_q3_K_impl (make_qx_quants(16, 4, w), block scales by
    make_qx_quants(16, 32, scales, sw))."""

    qtype = GGMLQuantizationType.Q3_K
    chunk = 1024  # the per-superblock steps (make_qp_quants, scale packing) cost per call: 4 search pieces

    @classmethod
    def quantize_blocks(cls, xb, qw):
        B = xb.shape[0]
        if qw is None:
            scales, stale = _search(xb, qw, lambda x, q: make_q3_quants(_subblocks(x, 16), 4, True))
            sc = _per_block(scales, 16)  # [16, B]
            max_scale, _ = signed_absmax(sc)  # [B]
            nonzero = max_scale != 0
            iscale = F32(-32) / np.where(nonzero, max_scale, F32(1))
            l = nearest_int(iscale * sc).astype(np.int8).astype(np.int32)  # int8_t l
            scale_bytes = _pack_q3_scales(np.clip(l, -32, 31) + 32)
            scale_bytes[~nonzero] = 0
            d = np.where(nonzero, F32(1) / iscale, F32(0))
        else:
            scales, iscales, zero16, sw = _search(xb, qw, _search_q3_k_impl)
            d, Ls = make_qx_quants(_per_block(scales, 16), 32, 1, _per_block(sw, 16))
            scale_bytes = _pack_q3_scales(Ls)
        if qw is not None:  # the search's levels, needed only for sub-blocks whose scale code is 0

            def stale(cols):
                return qx_levels(xb.reshape(-1, 16)[cols].T, iscales[cols], zero16[cols], 4)

        Lb = _requant(xb, _sub_scale(d, _unpack_q3_scales(scale_bytes)), None, -4, 3, stale)  # 0..7
        hmask = np.bitwise_or.reduce((Lb >> 2).reshape(B, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
        return np.concatenate([hmask, _pack_2bit(Lb & 3), scale_bytes, fp16_bytes(d)], axis=-1)


# ---------------------------------------------------------------------------------------------- Q2_K


def _search_q2_k(xb: np.ndarray, qw: _Imatrix | None) -> tuple[np.ndarray, ...]:
    """Sub-block fits of quantize_row_q2_K_ref / _impl: make_qkx_search's results [B*16] (+ sw with qw)."""
    xt = _subblocks(xb, 16)  # [16, B*16]
    if qw is None:
        return make_qkx_search(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    w = _impl_weights(xb, xt, qw, 1.0)
    return (*make_qkx_search(xt, w, 3, -0.9, 0.05, 36, False), seqsum(w))


@register
class Q2_K(_KQuant):
    """quantize_q2_K: no imatrix -> quantize_row_q2_K_ref (make_qkx2_quants(16, 3, |x|, -0.5, 0.1, 15, MAD),
    4-bit codes by max); imatrix -> quantize_row_q2_K_impl (sigma^2 without factor 2,
    make_qkx3_quants(16, 3, -0.9, 0.05, 36), make_qp_quants(16, 15))."""

    qtype = GGMLQuantizationType.Q2_K
    chunk = 1536  # two make_qkx search pieces (3 * _PIECE values each); per-superblock steps amortized

    @classmethod
    def quantize_blocks(cls, xb, qw):
        B = xb.shape[0]
        res = _search(xb, qw, _search_q2_k, primitives.QKX_PIECES)
        sc = _per_block(res[0], 16)  # [16, B]
        mn = _per_block(res[1], 16)
        if qw is None:
            max_scale = positive_max(sc)
            max_min = positive_max(mn)
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(max_scale > 0, nearest_int((F32(15) / max_scale) * sc), 0)
                lm = np.where(max_min > 0, nearest_int((F32(15) / max_min) * mn), 0)
            d = max_scale / F32(15)
            dmin = max_min / F32(15)
        else:
            sw16 = _per_block(res[5], 16)
            # make_qp_quants(16, 15, scales, Ls, sw) and (mins, Lm, sw) as one batch of 2B blocks
            dm, Lsm = make_qp_quants(np.concatenate([sc, mn], axis=1), 15, np.concatenate([sw16, sw16], axis=1))
            d, dmin = dm[:B], dm[B:]
            ls, lm = Lsm[:, :B].astype(np.int32), Lsm[:, B:].astype(np.int32)
        scale_bytes = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # [16, B]
        dd = _sub_scale(d, (scale_bytes & 0xF).astype(F32))
        dm = _sub_scale(dmin, (scale_bytes >> 4).astype(F32))
        Lb = _requant(xb, dd, dm, 0, 3, _stale_qkx(xb.reshape(-1, 16).T, res, 3))
        return np.concatenate([scale_bytes.T, _pack_2bit(Lb), fp16_bytes(d), fp16_bytes(dmin)], axis=-1)
