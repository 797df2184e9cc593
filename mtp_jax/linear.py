"""``linear``: the one place a weight matmul happens.

``linear(x, w, layer, experts)`` multiplies activations x [..., K] by one weight matrix taken out of a stack
*in place*: ``w`` is [K, N], [L, K, N] (``layer`` picks one), [E, K, N] (``experts`` picks one per row) or
[L, E, K, N]; ``trans=True`` means the matrix is stored [N, K] (a tied embedding used as the output head).
``heads=True``: w [(L,) E, K, N] holds one matrix per head and x [..., E, K] has the heads on its second-to-last
axis, head e multiplied by w[e] (MLA's per-head ``attn_k_b`` / ``attn_v_b``; an einsum in XLA, the kernel's
expert rows on CPU).

On CPU it runs the native kernel (mtp_jax/kernels/cpu_linear.cc): it reads f32/f16/bf16 weights at memory
speed straight out of the stack (no per-step copy of a layer's or an expert's weights) on all cores, and a
row's result does not depend on how many rows are in the call. Elsewhere, or without the kernel, it is an
XLA einsum on ``w[layer]`` / ``w[experts]``. The CPU path computes in float32 (``compute_dtype``).

``w`` may also be a ``QuantWeight`` (GGUF blocks, mtp_jax/qweight.py): on CPU the kernel reads the blocks in
place and dequantizes each value exactly as gguf-py does next to its FMA (the result equals, bit for bit, the f32
kernel's on the dequantized [N, K] matrix); elsewhere XLA dequantizes the picked rows before an einsum. Quantized
weights are inference-only: differentiating through the kernel raises.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from mtp_jax import kernels
from mtp_jax.qweight import FLOAT_TYPES, QuantWeight, dequantize


def compute_dtype(param_dtype) -> jnp.dtype:
    """Activation and KV-cache dtype: float32 where the CPU kernels run (f16/bf16 arithmetic is emulated
    on CPU; weights stay in their own dtype), the parameters' dtype elsewhere."""
    return jnp.dtype(jnp.float32) if kernels.use_cpu_kernels() else jnp.dtype(param_dtype)


def _ffi(x2: jax.Array, w4: jax.Array, layer: jax.Array, eids: jax.Array, trans: bool, qtype: int) -> jax.Array:
    """The kernel: w4 [L, E, K, N] ([L, E, N, K] when trans) floats, or (qtype: a ggml type id) u8 GGUF rows
    [L, E, N, row_bytes] (trans)."""
    M = x2.shape[0]
    N = w4.shape[2] if trans else w4.shape[3]
    call = jax.ffi.ffi_call(kernels.TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32))
    return call(x2.astype(jnp.float32), w4, layer, eids, trans=trans, qtype=np.int32(qtype))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(x2: jax.Array, w4: jax.Array, layer: jax.Array, eids: jax.Array, trans: bool) -> jax.Array:
    return _ffi(x2, w4, layer, eids, trans, 0)


def _kernel_fwd(x2, w4, layer, eids, trans):
    return _kernel(x2, w4, layer, eids, trans), (x2, w4, layer, eids)


def _kernel_bwd(trans, res, g):  # training (scripts/train_tiny.py) differentiates through XLA ops
    x2, w4, layer, eids = res
    E = w4.shape[1]
    W = w4[layer].astype(jnp.float32)  # [E, K, N] (or [E, N, K])
    W = jnp.swapaxes(W, 1, 2) if trans else W
    onehot = jax.nn.one_hot(eids, E, dtype=jnp.float32)  # [M, E]
    dx = jnp.einsum("mn,ekn,me->mk", g, W, onehot)
    dW = jnp.einsum("me,mk,mn->ekn", onehot, x2.astype(jnp.float32), g)
    dW = jnp.swapaxes(dW, 1, 2) if trans else dW
    dw4 = jnp.zeros(w4.shape, jnp.float32).at[layer].set(dW).astype(w4.dtype)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731  integer inputs
    return dx.astype(x2.dtype), dw4, zero(layer), zero(eids)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qkernel(x2: jax.Array, w4: jax.Array, layer: jax.Array, eids: jax.Array, qtype: int) -> jax.Array:
    """The kernel on one type group of a QuantWeight (trans: GGUF rows, or a float group's [N, K] rows)."""
    return _ffi(x2, w4, layer, eids, True, qtype)


def _qkernel_fwd(x2, w4, layer, eids, qtype):
    return _qkernel(x2, w4, layer, eids, qtype), None


def _qkernel_bwd(qtype, res, g):
    raise TypeError("linear: weights kept quantized (QuantWeight) are inference-only and cannot be differentiated; "
                    "load the model with its weights dequantized (--dequantize, quantized='dequantize') to train")


_qkernel.defvjp(_qkernel_fwd, _qkernel_bwd)


def linear(
    x: jax.Array,  # [..., K]
    w: jax.Array,  # [K, N] | [L, K, N] | [E, K, N] | [L, E, K, N]   ([.., N, K] when trans)
    layer: jax.Array | int | None = None,  # index into L (w has a layer axis iff given)
    experts: jax.Array | None = None,  # [...] expert id of each row (w has an expert axis iff given)
    trans: bool = False,
    heads: bool = False,  # w [(L,) E, K, N] per head, x [..., E, K]: row [..., e, :] uses w[e]
) -> jax.Array:
    """x @ W -> [..., N] in x's dtype."""
    if isinstance(w, QuantWeight):
        return _quant_linear(x, w, layer, experts, trans, heads)
    lead = x.shape[:-1]
    if heads:
        if experts is not None or trans or w.ndim != (layer is not None) + 3 or x.shape[-2] != w.shape[-3]:
            raise ValueError(f"linear: per-head weight of shape {w.shape} does not match x {x.shape} "
                             f"(layer={layer is not None})")
        if not kernels.use_cpu_kernels():
            m = w if layer is None else w[layer]
            return jnp.einsum("...ek,ekn->...en", x, m.astype(x.dtype)).astype(x.dtype)
        experts = jnp.broadcast_to(jnp.arange(w.shape[-3], dtype=jnp.int32), lead)  # the kernel reads each once
    n_lead = (layer is not None) + (experts is not None)
    if w.ndim != n_lead + 2:
        raise ValueError(f"linear: weight of shape {w.shape} does not match layer={layer is not None}, "
                         f"experts={experts is not None}")
    if kernels.use_cpu_kernels():
        L = w.shape[0] if layer is not None else 1
        w4 = w.reshape(L, -1, *w.shape[-2:])  # [L, E, ., .]: adding unit axes is free (a bitcast)
        li = jnp.asarray(0 if layer is None else layer, jnp.int32)
        x2 = x.reshape(-1, x.shape[-1])
        eids = jnp.zeros((x2.shape[0],), jnp.int32) if experts is None else experts.reshape(-1)
        return _kernel(x2, w4, li, eids.astype(jnp.int32), trans).reshape(*lead, -1).astype(x.dtype)
    m = w if layer is None else w[layer]
    if experts is not None:
        m = m[experts]  # [..., K, N] (a gather: copies the picked experts' weights)
        eq = "...k,...nk->...n" if trans else "...k,...kn->...n"
    else:
        eq = "...k,nk->...n" if trans else "...k,kn->...n"
    return jnp.einsum(eq, x, m.astype(x.dtype)).astype(x.dtype)


def _quant_linear(x: jax.Array, w: QuantWeight, layer, experts, trans: bool, heads: bool) -> jax.Array:
    """linear() of a weight in GGUF block format. On CPU the kernel reads the picked layer's (and rows') experts
    in place out of each type group's whole array (a stack that mixes types: a lax.switch over the groups, each
    branch passing its group and the layer's index in it); elsewhere the picked rows are dequantized next to
    the dot, inside the compiled program. Nothing full-precision outlives the call."""
    n_lead = (layer is not None) + (experts is not None or heads)
    if w.n_lead != n_lead or trans != w.table or (heads and experts is not None):
        raise ValueError(f"linear: quantized weight of shape {w.shape} (lead dims {w.n_lead}, table {w.table}) "
                         f"does not match layer={layer is not None}, experts={experts is not None}, "
                         f"heads={heads}, trans={trans}")
    if x.shape[-1] != w.k or (heads and x.shape[-2] != w.shape[w.n_lead - 1]):
        raise ValueError(f"linear: x of shape {x.shape} does not match the quantized weight of shape {w.shape} "
                         f"(heads={heads})")
    if kernels.use_cpu_kernels():
        return _quant_kernel(x, w, layer, experts, heads)
    xf = x.astype(jnp.float32)

    def apply(rows: jax.Array, qtype: str) -> jax.Array:  # rows [(E,) N, row_bytes] of one layer
        if experts is not None:
            return jnp.einsum("...k,...nk->...n", xf, dequantize(rows[experts], qtype))  # the picked experts' rows
        if heads:
            return jnp.einsum("...ek,enk->...en", xf, dequantize(rows, qtype))
        return jnp.einsum("...k,nk->...n", xf, dequantize(rows, qtype))

    y = apply(w.groups[0], w.types[0]) if layer is None else w.layer(layer, lambda a, j, t: apply(a[j], t))
    return y.astype(x.dtype)


def _quant_kernel(x: jax.Array, w: QuantWeight, layer, experts, heads: bool) -> jax.Array:
    """_quant_linear on CPU: the kernel (trans: GGUF rows are [N, K]) on each group's whole array."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if heads:  # head e of each row uses matrix e: the kernel's expert ids
        eids = jnp.broadcast_to(jnp.arange(x.shape[-2], dtype=jnp.int32), lead).reshape(-1)
    elif experts is not None:
        eids = experts.reshape(-1).astype(jnp.int32)
    else:
        eids = jnp.zeros((x2.shape[0],), jnp.int32)

    def group(a: jax.Array, li: jax.Array, t: str) -> jax.Array:  # a type group [(n_g,) (E,) N, row_bytes]
        w4 = a.reshape(a.shape[0] if layer is not None else 1, -1, *a.shape[-2:])  # the kernel's 4-D: a free bitcast
        return _qkernel(x2, w4, li, eids, 0 if t in FLOAT_TYPES else GGMLQuantizationType[t].value)

    if layer is None:
        y = group(w.groups[0], jnp.asarray(0, jnp.int32), w.types[0])
    else:
        y = w.layer(layer, group)  # each group read in place at the layer's index in it
    return y.reshape(*lead, -1).astype(x.dtype)
