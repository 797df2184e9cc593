"""Weights kept in their GGUF block format on the device, dequantized inside the compiled program.

A ``QuantWeight`` is a pytree leaf-like node that stands where a float weight array would: it has the logical
``shape`` of that array in our layout ([*lead, ins..., outs...], or a table [rows, D]), supports the free
reshapes the layers apply (merging or splitting input dims among themselves and output dims among themselves)
and indexing of a table's rows (``embed[tokens]``), and ``linear`` multiplies by it (mtp_jax/linear.py).

Storage is the GGUF tensor as it sits in the file: ``[*lead, N, row_bytes]`` with rows = the outputs and
ggml blocks along the inputs (a table: rows = its rows). A stack of layers whose tensors have different types
(llama-quantize's Q4_K_M gives some layers' ``attn_v`` / ``ffn_down`` Q6_K and the others Q4_K) keeps one
array per type (``groups``) and a static map layer -> (group, index); ``linear`` picks the group with
``lax.switch`` on the scanned layer index. A group of a float type (F32/F16/BF16) holds the float matrix in
GGUF layout.

The dequantizers below are gguf-py's (gguf/quants.py ``dequantize_blocks``) written in jnp with the same
operations in the same order, so a weight dequantized in the graph equals the host's dequantization bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mtp_jax import pytree
from mtp_jax.io import table, tree
from mtp_jax.quant import policy

pytree.register_with_jax()  # (mtp_jax.pytree) the graph and the readers get it through this module

QK_K = 256
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_U8 = jnp.uint8


def _f16(b: jax.Array) -> jax.Array:
    """u8 [n, 2] (little endian) -> f32 [n, 1]."""
    u = b[:, 0].astype(jnp.uint16) | (b[:, 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u, jnp.float16).astype(jnp.float32)[:, None]


def _u32(b: jax.Array) -> jax.Array:
    """u8 [n, 4] -> u32 [n, 1]."""
    u = b.astype(jnp.uint32)
    return (u[:, 0] | (u[:, 1] << 8) | (u[:, 2] << 16) | (u[:, 3] << 24))[:, None]


def _shifts(*s: int, shape: tuple[int, ...], dtype=np.uint8) -> jax.Array:
    return jnp.asarray(np.array(s, dtype=dtype).reshape(shape))


def _nibbles(qs: jax.Array, half: int) -> jax.Array:
    """u8 [n, m*half] -> [n, m, 2, half]: low nibbles then high nibbles of each run of ``half`` bytes."""
    n = qs.shape[0]
    return (qs.reshape(n, -1, 1, half) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & _U8(0x0F)


def _q8_0(b):
    d, x = _f16(b[:, :2]), jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return x * d


def _q4_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs = _nibbles(b[:, 2:], 16).reshape(n, -1).astype(jnp.int8) - jnp.int8(8)
    return d * qs.astype(jnp.float32)


def _q4_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qs = _nibbles(b[:, 4:], 16).reshape(n, -1).astype(jnp.float32)
    return (d * qs) + m


def _q5(b, off: int):
    """Q5_0 / Q5_1 quants (u8 [n, 32]) from qh at b[off:off+4] and qs after it."""
    n = b.shape[0]
    qh = (_u32(b[:, off: off + 4]) >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & jnp.uint32(1)
    ql = _nibbles(b[:, off + 4:], 16).reshape(n, -1)
    return ql | (qh.astype(_U8) << _U8(4))


def _q5_0(b):
    d = _f16(b[:, :2])
    return d * (_q5(b, 2).astype(jnp.int8) - jnp.int8(16)).astype(jnp.float32)


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _q5(b, 4).astype(jnp.float32)) + m


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & _U8(0xF)).astype(jnp.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> _U8(4)).astype(jnp.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & _U8(3)
    q = q.reshape(n, 16, 16).astype(jnp.float32)
    return (dl * q - ml).reshape(n, -1)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    ls = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, shape=(1, 2, 1))).reshape(n, 16)
    hs = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, shape=(1, 4, 1))).reshape(n, 16)
    sc = (ls & _U8(0x0F)) | ((hs & _U8(0x03)) << _U8(4))
    sc = (sc.astype(jnp.int8) - jnp.int8(32)).astype(jnp.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))).reshape(n, 16, 16) & _U8(3)
    qh = (hmask.reshape(n, -1, 1, 32) >> _shifts(*range(8), shape=(1, 1, 8, 1))).reshape(n, 16, 16) & _U8(1)
    qh = qh ^ _U8(1)
    q = (ql.astype(jnp.int8) - (qh << _U8(2)).astype(jnp.int8)).astype(jnp.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales):
    """Q4_K / Q5_K 6-bit scales and mins: u8 [n, 12] -> ([n, 8], [n, 8])."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = jnp.concatenate([d & _U8(0x3F), (m_d & _U8(0x0F)) | ((d >> _U8(2)) & _U8(0x30))], axis=-1)
    mn = jnp.concatenate([m & _U8(0x3F), (m_d >> _U8(4)) | ((m >> _U8(2)) & _U8(0x30))], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (d * sc.astype(jnp.float32)).reshape(n, -1, 1)
    dm = (dmin * m.astype(jnp.float32)).reshape(n, -1, 1)
    qs = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).astype(jnp.float32)
    return (d * qs - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    d = (d * sc.astype(jnp.float32)).reshape(n, -1, 1)
    dm = (dmin * m.astype(jnp.float32)).reshape(n, -1, 1)
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts(*range(8), shape=(1, 1, 8, 1))) & _U8(1)).reshape(n, -1, 32)
    q = (ql | (qh << _U8(4))).astype(jnp.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    sc = jax.lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)
    d = (d * sc).reshape(n, 16, 1)
    ql = _nibbles(ql, 64).reshape(n, -1, 32)
    qh = ((qh.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & _U8(3)).reshape(n, -1, 32)
    q = (ql | (qh << _U8(4))).astype(jnp.int8) - jnp.int8(32)
    return (d * q.reshape(n, 16, -1).astype(jnp.float32)).reshape(n, QK_K)


_KVALUES = np.array((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), np.float32)


def _iq4_nl(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = jnp.asarray(_KVALUES)[_nibbles(b[:, 2:], 16).reshape(n, -1)]
    return d * q


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    sh = b[:, 2].astype(jnp.uint16) | (b[:, 3].astype(jnp.uint16) << 8)
    sl = (b[:, 4:8].reshape(n, -1, 1) >> _shifts(0, 4, shape=(1, 1, 2))).reshape(n, -1) & _U8(0x0F)
    sh = (sh[:, None] >> jnp.arange(0, 16, 2, dtype=jnp.uint16)[None, :]).astype(_U8) & _U8(0x03)
    sc = (sl | (sh << _U8(4))).astype(jnp.int8) - jnp.int8(32)
    dl = (d * sc.astype(jnp.float32)).reshape(n, -1, 1)
    q = jnp.asarray(_KVALUES)[_nibbles(b[:, 8:], 16).reshape(n, -1, 32)]
    return (dl * q).reshape(n, -1)


def _tq2_0(b):
    n = b.shape[0]
    qs, d = b[:, :64], _f16(b[:, 64:66])
    q = ((qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & _U8(3)).reshape(n, -1)
    return d * (q.astype(jnp.int8) - jnp.int8(1)).astype(jnp.float32)


DEQUANTIZERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "TQ2_0": _tq2_0,
}
SUPPORTED = (*FLOAT_TYPES, *DEQUANTIZERS)


def block(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]


def dequantize(data: jax.Array, qtype: str) -> jax.Array:
    """GGUF rows u8 [..., row_bytes] (or a float array for F32/F16/BF16) -> f32 [..., K]."""
    if qtype in FLOAT_TYPES:
        return data.astype(jnp.float32)
    bs, ts = block(qtype)
    lead, rb = data.shape[:-1], data.shape[-1]
    out = DEQUANTIZERS[qtype](data.reshape(-1, ts))
    return out.reshape(*lead, rb // ts * bs)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QuantWeight:
    """One weight in GGUF layout (see the module docstring). ``groups[g]``: [n_g, *lead[1:], N, row_bytes]
    when the leaf is a stack split by type (``layer_map`` gives each layer's (group, index)), else
    [*lead, N, row_bytes] with one group. ``n_in``: input dims after the lead dims (None: a table)."""

    groups: tuple[Any, ...]
    types: tuple[str, ...]
    shape: tuple[int, ...]
    n_lead: int
    n_in: int | None
    layer_map: tuple[tuple[int, int], ...] | None = None

    def tree_flatten(self):
        return self.groups, (self.types, self.shape, self.n_lead, self.n_in, self.layer_map)

    @classmethod
    def tree_unflatten(cls, aux, groups):
        return cls(tuple(groups), *aux)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(g.shape)) * jnp.dtype(g.dtype).itemsize for g in self.groups)

    @property
    def table(self) -> bool:
        return self.n_in is None

    @property
    def k(self) -> int:
        """Inputs per row of the matrix (the row length in values)."""
        return self.shape[-1] if self.table else math.prod(self.shape[self.n_lead: self.n_lead + self.n_in])

    def reshape(self, *shape) -> "QuantWeight":
        """Merge or split input dims among themselves and output dims among themselves (free: the bytes are
        [N, K] rows either way); lead dims stay."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.shape) // known if d == -1 else d for d in shape)
        lead = self.shape[: self.n_lead]
        if self.table or shape[: self.n_lead] != lead or math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"QuantWeight: cannot reshape {self.shape} to {shape}")
        rest, acc = shape[self.n_lead:], 1
        for j, d in enumerate(rest):
            if acc == self.k:
                return QuantWeight(self.groups, self.types, shape, self.n_lead, j, self.layer_map)
            acc *= d
        if acc == self.k:
            return QuantWeight(self.groups, self.types, shape, self.n_lead, len(rest), self.layer_map)
        raise ValueError(f"QuantWeight: reshape {self.shape} to {shape} mixes input and output dims")

    def __getitem__(self, rows: jax.Array) -> jax.Array:
        """A table's rows (an embedding lookup), dequantized: rows [...] -> f32 [..., D]."""
        if not self.table or len(self.groups) != 1:
            raise TypeError("QuantWeight: only a table's rows can be indexed")
        return dequantize(self.groups[0][rows], self.types[0])

    def dequantized(self) -> jax.Array:
        """The whole weight as f32 in its logical shape (tests and host-side use; the layers never call it)."""
        if self.layer_map is None:
            mats = [dequantize(self.groups[0], self.types[0])]
        else:
            mats = [dequantize(self.groups[g][i], self.types[g]) for g, i in self.layer_map]
        m = jnp.stack(mats) if self.layer_map is not None else mats[0]  # [*lead, N, K]
        if self.table:
            return m
        lead = self.shape[: self.n_lead]
        ins, outs = self.shape[self.n_lead: self.n_lead + self.n_in], self.shape[self.n_lead + self.n_in:]
        m = jnp.swapaxes(m, -1, -2)  # [*lead, K, N]
        return m.reshape(*lead, *ins, *outs)

    def layer(self, li: jax.Array | int, fn: Callable[[jax.Array, jax.Array, str], jax.Array]) -> jax.Array:
        """fn(group, index, type) for layer li of a stacked weight: the whole array of the layer's type group
        (GGUF layout [n_g, *lead[1:], N, row_bytes]) and the layer's index in it, so a caller may read it in
        place. One direct call, or a lax.switch over the groups when the stack mixes types."""
        li = jnp.asarray(li, jnp.int32)
        if self.layer_map is None:
            return fn(self.groups[0], li, self.types[0])
        group = jnp.asarray(np.array([g for g, _ in self.layer_map], np.int32))[li]
        index = jnp.asarray(np.array([i for _, i in self.layer_map], np.int32))[li]
        branches = [lambda j, g=g: fn(self.groups[g], j, self.types[g]) for g in range(len(self.groups))]
        return jax.lax.switch(group, branches, index)


def layer_dense(w: Any, li: jax.Array | int | None, dtype=jnp.float32) -> jax.Array:
    """Layer li of a stacked weight in its logical layout without the layer axis (li None: an unstacked weight,
    such as the NextN block's, whole): a quantized one's blocks dequantized in the graph to ``dtype`` (e.g. for
    XLA's grouped matmuls); a float leaf is just indexed."""
    if not is_quant(w):
        return w if li is None else w[li]
    if li is None and not w.table:
        return w.dequantized().astype(dtype)
    if w.table or w.n_lead < 1:
        raise ValueError(f"layer_dense: a stacked matrix is needed, got a quantized weight of shape {w.shape}")
    m = w.layer(li, lambda a, j, t: dequantize(a[j], t))  # [*lead[1:], N, K]
    lead = w.shape[1: w.n_lead]
    ins, outs = w.shape[w.n_lead: w.n_lead + w.n_in], w.shape[w.n_lead + w.n_in:]
    return jnp.swapaxes(m, -1, -2).reshape(*lead, *ins, *outs).astype(dtype)


def is_quant(x: Any) -> bool:
    return isinstance(x, QuantWeight)


def rows_shape(shape: tuple[int, ...], n_lead: int, n_in: int | None, qtype: str) -> tuple[int, ...]:
    """[*lead, N, row_bytes]: the GGUF rows in ``qtype`` of a weight of logical ``shape`` (QuantWeight's n_lead,
    n_in; n_in None: a table [rows, D])."""
    k = shape[-1] if n_in is None else math.prod(shape[n_lead: n_lead + n_in])
    bs, ts = block(qtype)
    return (*shape[:n_lead], math.prod(shape[n_lead:]) // k, k // bs * ts)


def pure_types(cfg: Any, template: Any, qtype: str) -> dict[tuple, tuple[str, int, int | None]]:
    """leaf path -> (ggml type, n_lead, n_in) of every weight matrix and table that ``llama-quantize --pure`` to
    ``qtype`` gives a block type: mtp_jax.quant.policy's choice, its row-size fallbacks included (Q4_K rows of
    1408 values become Q5_0; a leaf that falls back to F16 stays float). ``template``: the model's ArrayInfo tree
    (io.tree.template). Every tensor of a stack gets the same type (same row size, same name rule)."""
    slots = [s for s in table.plan(cfg, template) if s.spec.n_in is not None or s.spec.table]
    descs = []
    for s in slots:
        shape = tree.get(template, s.leaf).shape[s.index is not None:]  # one tensor's
        descs.append(policy.TensorDesc(s.name, tuple(reversed(s.spec.gguf_shape(shape))), GGMLQuantizationType.F32))
    model = policy.ModelInfo(cfg.family, cfg.num_hidden_layers + cfg.num_nextn_predict_layers,
                             cfg.num_nextn_predict_layers)
    log = logging.getLogger(policy.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # no line per fallback tensor (llama-quantize's log); the caller reports types
    try:
        plans = policy.plan_tensors(model, descs, policy.QuantOptions(policy.FTYPES[qtype], pure=True))
    finally:
        log.setLevel(level)
    types = {p.name: p.type.name for p in plans}
    return {s.leaf: (types[s.name], (s.index is not None) + s.spec.batch, s.spec.n_in) for s in slots
            if types[s.name] in DEQUANTIZERS}


def quantize_weight(x: Any, qtype: str, n_lead: int, n_in: int | None) -> QuantWeight:
    """A float weight in our layout -> a QuantWeight of its GGUF rows in ``qtype``, quantized on the host by
    mtp_jax.quant (ggml's bytes, as llama-quantize writes them)."""
    from mtp_jax.quant import registry  # noqa: PLC0415

    x = np.asarray(x, np.float32)
    return QuantWeight((jnp.asarray(registry.quantize(gguf_rows(x, n_lead, n_in), qtype)),), (qtype,), x.shape,
                       n_lead, n_in)


def gguf_rows(x: Any, n_lead: int, n_in: int | None) -> Any:
    """A weight in our layout (numpy or jax) -> its GGUF rows [*lead, N, K]; a table ([rows, D]) as it is."""
    if n_in is None:
        return x
    lead = x.shape[:n_lead]
    return x.reshape(*lead, math.prod(x.shape[n_lead: n_lead + n_in]), -1).swapaxes(-1, -2)


def float_rows(cfg: Any, params: Any) -> Any:
    """``params`` with the float matrices llama-quantize would quantize (policy.name_allows_quantization on every
    tensor of the leaf) as QuantWeights of their float type in GGUF's [N, K] rows: the layout the CPU kernel
    reads fastest at a few rows of x (mtp_jax/kernels/cpu_linear.cc, kFewRows), as read_gguf(float_rows=True)
    loads a GGUF's. Tables, norms, routers and QuantWeights stay as they are."""
    template = tree.template_of(cfg, params)
    slots: dict = {}
    for s in table.plan(cfg, template):
        slots.setdefault(s.leaf, []).append(s)
    names = {jnp.dtype(t): name for name, t in FLOAT_TYPES.items()}

    def one(path):
        x, ss = tree.get(params, path), slots.get(path, [])
        if (not ss or ss[0].spec.n_in is None or is_quant(x) or getattr(x, "dtype", None) not in names
                or not all(policy.name_allows_quantization(cfg.family, s.name) for s in ss)):
            return x
        n_lead, n_in = (ss[0].index is not None) + ss[0].spec.batch, ss[0].spec.n_in
        return QuantWeight((jnp.asarray(gguf_rows(x, n_lead, n_in)),), (names[x.dtype],), x.shape, n_lead, n_in)

    return tree.build(template, [one(path) for path in tree.leaf_paths(template)])


def quantize_params(cfg: Any, params: Any, qtype: str) -> Any:
    """``params`` with the weights ``pure_types`` picks quantized in memory: what writing a GGUF, quantizing it
    with llama-quantize --pure ``qtype`` and reading it back with quantized="keep" gives."""
    template = tree.template_of(cfg, params)
    kept = pure_types(cfg, template, qtype)

    def one(path):
        x = tree.get(params, path)
        return quantize_weight(x, *kept[path]) if path in kept else x

    return tree.build(template, [one(p) for p in tree.leaf_paths(template)])


def float_arrays(tree: Any) -> Any:
    """The pytree with every QuantWeight of float types only (a GGUF's float matrices kept as [N, K] rows for the
    CPU kernel) turned back into an array of its logical layout and its own float dtype; block types stay."""
    def one(x):
        if not is_quant(x) or not all(t in FLOAT_TYPES for t in x.types):
            return x
        return x.dequantized().astype(jnp.result_type(*(g.dtype for g in x.groups)))

    return jax.tree.map(one, tree, is_leaf=is_quant)


class HostLayout:
    """Host buffers a QuantWeight is loaded into: one per type group, filled tensor by tensor (``slot``) and then
    put on the device (``build``). ``types``: the ggml type of each tensor in stack order (one for an unstacked
    leaf); ``gguf_shape``: one tensor's numpy shape [*batch, out, in] (a table [rows, D]); ``n_lead`` and
    ``n_in`` as QuantWeight has them. ``allocate`` False: only the layout (``shapes``, ``where``), for a reader
    that fills each device's shard of the groups itself (io/gguf.py, read_gguf's ``mesh``)."""

    def __init__(self, types: list[str], gguf_shape: tuple[int, ...], stacked: bool, n_lead: int,
                 n_in: int | None, allocate: bool = True):
        self.stacked, self.types, self.n_lead, self.n_in = stacked, tuple(dict.fromkeys(types)), n_lead, n_in
        self.where = []  # tensor -> (group, index in group)
        counts = dict.fromkeys(self.types, 0)
        for t in types:
            self.where.append((self.types.index(t), counts[t]))
            counts[t] += 1
        self.shapes = []  # (shape, dtype) of each group
        for t in self.types:
            if t in FLOAT_TYPES:
                shape, dt = gguf_shape, np.dtype(FLOAT_TYPES[t])
            else:
                bs, ts = block(t)
                shape, dt = (*gguf_shape[:-1], gguf_shape[-1] // bs * ts), np.dtype(np.uint8)
            self.shapes.append((((counts[t],) if stacked else ()) + shape, dt))
        self.bufs = [np.empty(shape, dt) for shape, dt in self.shapes] if allocate else []

    def slot(self, index: int | None) -> np.ndarray:
        """The buffer one tensor's bytes (or floats) go into."""
        g, j = self.where[index or 0]
        return self.bufs[g][j] if self.stacked else self.bufs[g]

    def build(self, shape: tuple[int, ...], put=jax.device_put) -> QuantWeight:
        """The device QuantWeight of logical ``shape`` (the float leaf's)."""
        return self.weight(tuple(put(b) for b in self.bufs), shape)

    def weight(self, groups: tuple[Any, ...], shape: tuple[int, ...]) -> QuantWeight:
        """The QuantWeight of logical ``shape`` with these group arrays (or ShapeDtypeStructs)."""
        layer_map = tuple(self.where) if len(self.types) > 1 else None
        return QuantWeight(groups, self.types, tuple(shape), self.n_lead, self.n_in, layer_map)
