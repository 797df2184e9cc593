"""KV cache with per-row lengths.

Each stack of same-shaped layers has one K and one V array ``[L, B, S, K, H]`` (``cfg.cache_dims()`` gives the
per-token (heads, dims) of each; an MLA family caches one latent entry per token and no V); ``lengths[b]`` counts the
valid slots of row b. The T new entries of row b are written at slots ``lengths[b] .. lengths[b]+T-1``
(RoPE position = slot index), and attention reads slots ``< lengths[b]`` plus the new block causally.
Rollback after a rejected draft is therefore just ``lengths = ...``: stale slots past the length are never
read and are overwritten by the next write. The NextN layer keeps a cache of its own with the same scheme.

A stack's type (``kvquant.TYPES``, K and V separately) is f32 / f16 / bf16 (a plain array) or a block type
(a ``QuantStack``: each entry quantized along its last axis when written, dequantized right before attention),
so writes stay per token and rollback stays free whatever the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax import kvquant
from mtp_jax.config import ModelConfig
from mtp_jax.linear import compute_dtype
from mtp_jax.pytree import pytree_dataclass


@partial(jax.tree_util.register_dataclass, data_fields=["q", "d"], meta_fields=["kind", "dim"])
@dataclass(frozen=True)
class QuantStack:
    """A layer stack [L, B, S, K, H] in a block type, entries quantized along H (kvquant.quantize): both arrays are
    [L, B, S, K, .] so that sharding.CACHE_AXES and indexing by layer and slot apply to them as to a plain stack."""

    q: Any  # [L, B, S, K, blocks * q bytes] int8 (q8_0) / uint8
    d: Any  # [L, B, S, K, blocks] float16: ggml's block scale (q8_0, q4_0) or the group norm (turbo)
    kind: str
    dim: int  # H (turbo stores it zero-padded to a multiple of 128)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.d.shape[:4], self.dim)


@pytree_dataclass
class KVCache:
    k: tuple  # per layer stack: [L, B, S, K, H] (None for an empty stack, and for V when cache_dims says so)
    v: tuple
    lengths: Any  # [B] int32

    @property
    def size(self) -> int:
        """S, the number of positions a row can hold: the largest stack's slots (a sliding-window layer's stack
        may be a smaller ring, see write_block)."""
        return max(x.shape[2] for x in self.k if x is not None)

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return KVCache(self.k, self.v, lengths.astype(jnp.int32))


Stack = Any  # jax.Array [L, B, S, K, H] or QuantStack


def _stack(n: int, batch: int, size: int, dims: tuple[int, int] | None, kind: str | None,
           cfg: ModelConfig) -> Stack | None:
    if n == 0 or dims is None:
        return None
    heads, dim = dims
    if kind in kvquant.BLOCKS:
        values, qbytes = kvquant.BLOCKS[kind]
        blocks = kvquant.stored_dim(kind, dim) // values
        lead = (n, batch, size, heads)
        return QuantStack(jnp.zeros((*lead, blocks * qbytes), kvquant.q_dtype(kind)),
                          jnp.zeros((*lead, blocks), jnp.float16), kind, dim)
    dtype = compute_dtype(cfg.dtype) if kind is None else kvquant.FLOATS[kind]
    return jnp.zeros((n, batch, size, heads, dim), dtype)


def stacked_cache(stacks: tuple[int, ...], batch: int, size: int, cfg: ModelConfig, k_type: str | None = None,
                  v_type: str | None = None, dims: tuple[int, int] | None = None) -> KVCache:
    """One K and one V stack per entry of ``stacks`` (its layer count; 0 gives None), entries as cache_dims says
    (``dims``: (heads, dim) of both K and V instead, for a family whose layer kinds differ in them)."""
    kvquant.check_type(k_type, "K cache type")
    kvquant.check_type(v_type, "V cache type")
    k_dims, v_dims = cfg.cache_dims() if dims is None else (dims, dims)
    if v_dims is None and v_type not in (None, k_type):
        raise ValueError(f"{cfg.name} caches one latent entry per token, read as K and V (MLA): the V cache type "
                         f"({v_type}) must be unset or equal the K cache type ({k_type})")
    return KVCache(
        k=tuple(_stack(n, batch, size, k_dims, k_type, cfg) for n in stacks),
        v=tuple(_stack(n, batch, size, v_dims, v_type, cfg) for n in stacks),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def init_trunk_cache(cfg: ModelConfig, batch: int, size: int, k_type: str | None = None,
                     v_type: str | None = None) -> KVCache:
    """The trunk cache of cfg's family (``decoder_cache`` unless the family has its own), ``size`` slots per row."""
    from mtp_jax import families

    return (families.of(cfg).init_cache or decoder_cache)(cfg, batch, size, k_type, v_type)


def decoder_cache(cfg: ModelConfig, batch: int, size: int, k_type: str | None = None,
                  v_type: str | None = None) -> KVCache:
    """Two stacks, dense lead layers then MoE layers, all rows empty; entries as ``cfg.cache_dims()`` says, of
    the given types (kvquant.TYPES; None = the compute dtype)."""
    return stacked_cache((cfg.num_dense_layers, cfg.num_moe_layers), batch, size, cfg, k_type, v_type)


def init_nextn_cache(cfg: ModelConfig, batch: int, size: int, k_type: str | None = None,
                     v_type: str | None = None) -> KVCache:
    """One stack holding the num_nextn_predict_layers MTP blocks."""
    if not cfg.has_mtp:
        raise ValueError("the model has no NextN layer (num_nextn_predict_layers == 0)")
    return stacked_cache((cfg.num_nextn_predict_layers,), batch, size, cfg, k_type, v_type)


def write_block(stack: Stack, layer: jax.Array | int, new: jax.Array, lengths: jax.Array, ring: bool = False) -> Stack:
    """Scatter new[B, T, K, H] into stack[layer, b, lengths[b] + t] (in place when the stack is donated),
    quantized first for a QuantStack.

    Entries that would land past the end of the cache are dropped; callers check capacity beforehand. ``ring``
    (a sliding-window layer): position p goes to slot p mod S, so S >= window + T - 1 slots hold every entry a
    query of this block or a later one can see, rollback by lengths included (``ring_positions``).
    """
    B, T = new.shape[:2]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    slots = lengths[:, None] + jnp.arange(T)[None, :]  # [B, T]
    if ring:
        slots = slots % stack.shape[2]
    if isinstance(stack, QuantStack):
        pad = kvquant.stored_dim(stack.kind, stack.dim) - stack.dim
        q, d = kvquant.quantize(stack.kind, jnp.pad(new, [(0, 0)] * 3 + [(0, pad)]))
        return QuantStack(stack.q.at[layer, rows, slots].set(q, mode="drop"),
                          stack.d.at[layer, rows, slots].set(d, mode="drop"), stack.kind, stack.dim)
    return stack.at[layer, rows, slots].set(new.astype(stack.dtype), mode="drop")


def ring_positions(S: int, last: jax.Array) -> jax.Array:
    """[B, S] the position each slot of a ring holds once positions up to last[b] are written: the largest
    p <= last with p = slot mod S (negative: never written). For S > last this is the slot index itself, so a
    full-size stack reads the same. Slots written by rejected drafts past a rollback map to a position at least S
    below the newest one, out of every window when S >= window + T - 1."""
    return last[:, None] - ((last[:, None] - jnp.arange(S)[None, :]) % S)


def read_layer(stack: Stack, layer: jax.Array | int, dtype) -> jax.Array:
    """stack[layer] as [B, S, K, H'] in dtype: a QuantStack dequantized (turbo: rotated, H' = H padded to 128s,
    see ``rotated``)."""
    if isinstance(stack, QuantStack):
        return kvquant.dequantize(stack.kind, stack.q[layer], stack.d[layer]).astype(dtype)
    return stack[layer].astype(dtype)


def rotated(stack: Stack) -> bool:
    """Whether read_layer gives entries in TurboQuant's rotated domain (queries rotate, outputs rotate back)."""
    return isinstance(stack, QuantStack) and stack.kind in kvquant.TURBO
