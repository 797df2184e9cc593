"""KV-cache types, by llama.cpp's ``-ctk/-ctv`` names: f32, f16, bf16, q8_0, q4_0, turbo2, turbo3, turbo4.

Pure functions on the last axis of an array (one head of one token): ``quantize(kind, x)`` -> (q, d),
``dequantize(kind, q, d)`` -> x, ``bytes_per_value``, ``stored_dim``; the TurboQuant rotation ``rotate`` /
``unrotate``. ``kvcache.QuantStack`` keeps a quantized stack as these two arrays, q [..., blocks * qbytes] and
d [..., blocks] float16; a block's bytes in its reference layout are d's two bytes followed by its q bytes.

q8_0 and q4_0 are ggml's blocks (ggml-common.h) written exactly as ``quantize_row_q8_0_ref`` /
``quantize_row_q4_0_ref`` write them (ggml-quants.c: the file quantizer; llama.cpp's CPU cache write uses it for
q4_0, while its x86 q8_0 write rounds 127/amax-scaled halves to even and can differ at ties), f32 arithmetic in C's
order, read back as ``dequantize_row_*``:

* q8_0, 34 B / 32 values: d = amax / 127 (stored f16), q_j = roundf(x_j * (1/d)) (half away from zero), int8;
  x = q * d.
* q4_0, 18 B / 32 values: m = the value of largest magnitude (the first such), d = m / -8, q_j = min(15,
  trunc(x_j * (1/d) + 8.5)); byte j holds q_j in its low and q_{j+16} in its high nibble; x = (q - 8) * d.

turbo2 / turbo3 / turbo4 follow TurboQuant as TheTom/llama-cpp-turboquant defines it at commit 69d8e4be
(../shared/notes/mtp-engines.md (f)): ggml/src/ggml-turbo-quant.c ``quantize_row_turbo{2,3,4}_0_ref``
(TURBO4_USE_4BIT, the default), ggml/src/ggml-common.h ``block_turbo*_0``, src/llama-kv-cache.cpp (padding) and
src/llama-graph.cpp (rotations). Per group of 128 values (a head zero-padded to a multiple of 128):
n = ||x||, y = D(s2)·(H/√128)·D(s1)·(x/n) with H the unnormalized Walsh-Hadamard butterfly and s1, s2 the fork's
fixed ±1 tables; each y_j becomes the index of the nearest centroid (the fork's midpoint thresholds; a value equal
to a threshold goes up); stored norm = n / ||c[idx]|| (f16). A value reads back as c[idx] * norm, still rotated.
Bytes per 128 values: norm, then

* turbo2 (34 B): 32 B of 2-bit indices, value j at bits 2(j%4) of byte j/4;
* turbo3 (50 B): 32 B of the low 2 bits (as turbo2), then 16 B of the high bits, value j at bit j%8 of byte j/8;
* turbo4 (66 B): 64 B of 4-bit indices, value j in the low nibble of byte j/2 when j is even. The fork's block is
  68 B: a reserved f16 ``rnorm`` (always 0 in 4-bit mode) sits between the norm and the nibbles; we do not store it.

The norms are summed left to right as the C loops do, and divided as C divides (``_sqrt``): on 20000 groups each
(random magnitudes over 5 decades, zero-padded heads, outlier channels, zeros) our blocks were byte-identical to the
fork's ``quantize_row_turbo*_0_ref`` compiled with gcc -O2 (x86-64, no FMA contraction). Byte-exactness (q8_0 and
q4_0 against libggml in tests/test_kvquant.py) holds under XLA:CPU, which does not fuse a * b + c; a backend that
does may round a rare value differently.

Where we differ from the fork: the head is always padded to 128s (no 64-value groups); no ``innerq`` scaling, no
layer-adaptive types. The 4-bit centroids are the fork's table at that commit (±0.006938 … ±0.173926 on every
backend, and so in its published PPL / KLD figures), not the N(0,1) Lloyd-Max / √128 table (±0.011353 …
±0.241556) that ../shared/notes/gguf-quantization-spec.md §8 lists for other branches: its outer centroid clips
rotated coordinates beyond ~2σ, so a Gaussian vector's relative MSE is 0.018 instead of Lloyd-Max's 0.0092
(turbo2 0.119, turbo3 0.034).

Attention (layers.py) rotates the queries and rotates the outputs back, as the fork's graph does
(GGML_OP_TURBO_WHT): O(T·H·log H) per step instead of unrotating all S cached entries, and the same scores since
the rotation is orthonormal. For MLA it attends over the whole rotated latent and unrotates before keeping the first
kv_lora_rank values (the fork takes V as the first rotated values, exact only when kv_lora_rank is a multiple of
128).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

FLOATS = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
# block type -> (values per block, q bytes per block besides the f16 scale)
BLOCKS = {"q8_0": (32, 32), "q4_0": (32, 16), "turbo2": (128, 32), "turbo3": (128, 48), "turbo4": (128, 64)}
TYPES = (*FLOATS, *BLOCKS)
TURBO = ("turbo2", "turbo3", "turbo4")
GROUP = 128  # TurboQuant's rotation group

# the fork's WHT sign tables (ggml-turbo-quant.c turbo_cpu_s1 / turbo_cpu_s2, "seed 42"; the CUDA/Metal ones match)
_S1 = np.array([int(c) * 2 - 1 for c in (
    "01100101001111111010100111011000" "01101101011001011110000010111101"
    "00100010001000111001110011011010" "01101010111101011011000001101101")], np.float32)
_S2 = np.array([int(c) * 2 - 1 for c in (
    "11110110100010001100101010010111" "11000100000011101011100100000011"
    "10100001010100110101101000010010" "10111001010110010101101010000010")], np.float32)
_INV_SQRT = np.float32(0.08838834764831845)  # 1/sqrt(128) as the fork writes it

# centroids (rotated domain) and the fork's nearest-centroid thresholds, as written in ggml-turbo-quant.c
_CENTROIDS = {
    "turbo2": [-0.133462, -0.039994, 0.039994, 0.133462],
    "turbo3": [-0.190685, -0.117832, -0.065717, -0.021460, 0.021460, 0.065717, 0.117832, 0.190685],
    "turbo4": [-0.173926, -0.117195, -0.089527, -0.068756, -0.051262, -0.035597, -0.020989, -0.006938,
               0.006938, 0.020989, 0.035597, 0.051262, 0.068756, 0.089527, 0.117195, 0.173926],
}
_THRESHOLDS = {
    "turbo2": [-0.086728, 0.0, 0.086728],
    "turbo3": [-0.154259, -0.091775, -0.043589, 0.0, 0.043589, 0.091775, 0.154259],
    "turbo4": [-0.145560, -0.103361, -0.079142, -0.060009, -0.043430, -0.028293, -0.013963, 0.0,
               0.013963, 0.028293, 0.043430, 0.060009, 0.079142, 0.103361, 0.145560],
}


@dataclass(frozen=True)
class KVTypes:
    """Cache types of the trunk (k, v) and the MTP head / drafter (k_draft, v_draft); None = the compute dtype
    (``linear.compute_dtype``: float32 on CPU). An MLA cache (one latent per token) has no V of its own: its v
    type must be None or equal k."""

    k: str | None = None
    v: str | None = None
    k_draft: str | None = None
    v_draft: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_type(getattr(self, f.name), f"KVTypes.{f.name}")


def check_type(kind: str | None, what: str) -> None:
    """ValueError naming ``what`` (a field or a flag) unless kind is None or one of TYPES."""
    if kind is not None and kind not in TYPES:
        raise ValueError(f"{what}: unknown KV cache type {kind!r} (allowed: {', '.join(TYPES)})")


def stored_dim(kind: str, dim: int) -> int:
    """Values stored per entry of ``dim``: dim itself, or padded to a multiple of 128 (turbo). ValueError when a
    block type does not divide dim (llama.cpp requires it too)."""
    if kind in TURBO:
        return -(-dim // GROUP) * GROUP
    if kind in BLOCKS and dim % BLOCKS[kind][0]:
        raise ValueError(f"KV cache type {kind} stores blocks of {BLOCKS[kind][0]} values: a cache entry of {dim} "
                         f"values (head dim) is not a multiple")
    return dim


def bytes_per_value(kind: str) -> float:
    """Device bytes per cached value (of the stored, padded dim)."""
    if kind in FLOATS:
        return jnp.dtype(FLOATS[kind]).itemsize
    n, qbytes = BLOCKS[kind]
    return (2 + qbytes) / n


def q_dtype(kind: str):
    return jnp.int8 if kind == "q8_0" else jnp.uint8


def _roundf(y: jnp.ndarray) -> jnp.ndarray:
    """C roundf: to nearest, halves away from zero (jnp.round rounds halves to even)."""
    t = jnp.trunc(y)
    return t + jnp.where(jnp.abs(y - t) >= 0.5, jnp.sign(y), 0.0)


def _pack(idx: jnp.ndarray, bits: int) -> jnp.ndarray:
    """[..., n] small ints -> [..., n * bits / 8] uint8, value j at bits ``bits * (j % per)`` of byte j / per."""
    per = 8 // bits
    v = idx.astype(jnp.uint8).reshape(*idx.shape[:-1], -1, per)
    return jnp.sum(v << (bits * jnp.arange(per, dtype=jnp.uint8)), axis=-1, dtype=jnp.uint8)


def _unpack(b: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Inverse of _pack: [..., m] uint8 -> [..., m * 8 / bits] int32."""
    per = 8 // bits
    v = (b[..., None] >> (bits * jnp.arange(per, dtype=jnp.uint8))) & ((1 << bits) - 1)
    return v.reshape(*b.shape[:-1], -1).astype(jnp.int32)


def _butterfly(x: jnp.ndarray) -> jnp.ndarray:
    """The unnormalized fast Walsh-Hadamard transform of [..., 128], stage by stage as the fork's loop (pairs j,
    j + h within blocks of 2h: a + b, a - b)."""
    lead = x.shape[:-1]
    h = 1
    while h < GROUP:
        p = x.reshape(*lead, GROUP // (2 * h), 2, h)
        x = jnp.stack([p[..., 0, :] + p[..., 1, :], p[..., 0, :] - p[..., 1, :]], axis=-2).reshape(*lead, GROUP)
        h *= 2
    return x


def _sum_in_order(x: jnp.ndarray) -> jnp.ndarray:
    """Sum over the last axis left to right, as the fork's C loops do (XLA does not reassociate float adds)."""
    acc = x[..., 0]
    for j in range(1, x.shape[-1]):
        acc = acc + x[..., j]
    return acc


def _sqrt(x: jnp.ndarray) -> jnp.ndarray:
    """sqrt behind a barrier: XLA rewrites a / sqrt(b) as a * rsqrt(b), which rounds twice (C divides once)."""
    return jax.lax.optimization_barrier(jnp.sqrt(x))


def _groups(x: jnp.ndarray) -> jnp.ndarray:
    return x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)


def wht(x: jnp.ndarray) -> jnp.ndarray:
    """y = D(s2)·(H/√128)·D(s1)·x per group of 128 along the last axis (a multiple of 128). Orthonormal."""
    return (_butterfly(_groups(x) * _S1) * (_INV_SQRT * _S2)).reshape(x.shape)


def wht_inverse(y: jnp.ndarray) -> jnp.ndarray:
    """x = D(s1)·(H/√128)·D(s2)·y: the inverse (and transpose) of wht."""
    return (_butterfly(_groups(y) * _S2) * (_INV_SQRT * _S1)).reshape(y.shape)


def rotate(x: jnp.ndarray) -> jnp.ndarray:
    """[..., H] -> [..., stored_dim] zero-padded and rotated: a query against a turbo cache."""
    pad = -x.shape[-1] % GROUP
    return wht(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]))


def unrotate(y: jnp.ndarray, dim: int) -> jnp.ndarray:
    """[..., padded] rotated -> [..., dim]: an attention output over a turbo V cache."""
    return wht_inverse(y)[..., :dim]


def quantize(kind: str, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x [..., n] (n = stored_dim; computed in float32) -> (q [..., n / block * qbytes], d [..., n / block] f16)."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, BLOCKS[kind][0])  # [..., nb, block]
    lead = x.shape[:-1]
    if kind == "q8_0":
        d = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 127
        q = _roundf(xb * jnp.where(d != 0, 1 / d, 0.0)).astype(jnp.int8)
        return q.reshape(*lead, -1), d[..., 0].astype(jnp.float16)
    if kind == "q4_0":
        ax = jnp.abs(xb)
        m = jnp.take_along_axis(xb, jnp.argmax(ax, axis=-1, keepdims=True), axis=-1)
        d = jnp.where(jnp.max(ax, axis=-1, keepdims=True) == 0, 0.0, m) / -8  # all-zero block: C's max stays +0
        q = jnp.minimum(15, jnp.trunc(xb * jnp.where(d != 0, 1 / d, 0.0) + 8.5)).astype(jnp.uint8)
        return (q[..., :16] | (q[..., 16:] << 4)).reshape(*lead, -1), d[..., 0].astype(jnp.float16)
    norm = _sqrt(_sum_in_order(xb * xb))  # [..., G]
    y = _butterfly(xb * jnp.where(norm > 1e-10, 1 / norm, 0.0)[..., None] * _S1) * (_INV_SQRT * _S2)
    idx = jnp.sum(y[..., None] >= jnp.asarray(_THRESHOLDS[kind], jnp.float32), axis=-1)  # [..., G, 128]
    c = jnp.asarray(_CENTROIDS[kind], jnp.float32)[idx]
    norm = (norm / _sqrt(_sum_in_order(c * c))).astype(jnp.float16)  # ||c|| >= √128 · 0.006938: no 0 check
    if kind == "turbo2":
        q = _pack(idx, 2)
    elif kind == "turbo3":
        q = jnp.concatenate([_pack(idx & 3, 2), _pack(idx >> 2, 1)], axis=-1)
    else:
        q = _pack(idx, 4)
    return q.reshape(*lead, -1), norm


def dequantize(kind: str, q: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:
    """(q, d) as quantize returns them -> [..., n] float32 (turbo: still rotated)."""
    qbytes = BLOCKS[kind][1]
    lead = q.shape[:-1]
    qb = q.reshape(*lead, -1, qbytes)  # [..., nb, qbytes]
    if kind == "q8_0":
        v = qb.astype(jnp.float32)
    elif kind == "q4_0":
        v = (jnp.concatenate([qb & 15, qb >> 4], axis=-1).astype(jnp.int32) - 8).astype(jnp.float32)
    else:
        if kind == "turbo3":
            idx = _unpack(qb[..., :32], 2) | (_unpack(qb[..., 32:], 1) << 2)
        else:
            idx = _unpack(qb, 2 if kind == "turbo2" else 4)
        v = jnp.asarray(_CENTROIDS[kind], jnp.float32)[idx]
    return (v * d.astype(jnp.float32)[..., None]).reshape(*lead, -1)
