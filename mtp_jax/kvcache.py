"""KV cache with per-row lengths.

Each stack of same-shaped layers has one K and one V array ``[L, B, S, K, H]`` (``cfg.cache_dims()`` gives the
per-token (heads, dims) of each; an MLA family caches one latent entry per token and no V); ``lengths[b]`` counts the
valid slots of row b. The T new entries of row b are written at slots ``lengths[b] .. lengths[b]+T-1``
(RoPE position = slot index), and attention reads slots ``< lengths[b]`` plus the new block causally.
Rollback after a rejected draft is therefore just ``lengths = ...``: stale slots past the length are never
read and are overwritten by the next write. The NextN layer keeps a cache of its own with the same scheme.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig
from mtp_jax.linear import compute_dtype
from mtp_jax.params import pytree_dataclass


@pytree_dataclass
class KVCache:
    k: tuple  # per layer stack: [L, B, S, K, H] (None for an empty stack, and for V when cache_dims says so)
    v: tuple
    lengths: Any  # [B] int32

    @property
    def size(self) -> int:
        """S, the number of slots per row."""
        return next(x for x in self.k if x is not None).shape[2]

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return KVCache(self.k, self.v, lengths.astype(jnp.int32))


def _stack(n: int, batch: int, size: int, dims: tuple[int, int] | None, cfg: ModelConfig) -> jax.Array | None:
    if n == 0 or dims is None:
        return None
    return jnp.zeros((n, batch, size, *dims), compute_dtype(cfg.dtype))


def _cache(stacks: tuple[int, ...], batch: int, size: int, cfg: ModelConfig) -> KVCache:
    k_dims, v_dims = cfg.cache_dims()
    return KVCache(
        k=tuple(_stack(n, batch, size, k_dims, cfg) for n in stacks),
        v=tuple(_stack(n, batch, size, v_dims, cfg) for n in stacks),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def init_trunk_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
    """Two stacks, dense lead layers then MoE layers, all rows empty; entries as ``cfg.cache_dims()`` says."""
    return _cache((cfg.num_dense_layers, cfg.num_moe_layers), batch, size, cfg)


def init_nextn_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
    """One stack holding the num_nextn_predict_layers MTP blocks."""
    if not cfg.has_mtp:
        raise ValueError("the model has no NextN layer (num_nextn_predict_layers == 0)")
    return _cache((cfg.num_nextn_predict_layers,), batch, size, cfg)


def write_block(stack: jax.Array, layer: jax.Array | int, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """Scatter new[B, T, K, H] into stack[layer, b, lengths[b] + t] (in place when the stack is donated).

    Entries that would land past the end of the cache are dropped; callers check capacity beforehand.
    """
    B, T = new.shape[:2]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    slots = lengths[:, None] + jnp.arange(T)[None, :]  # [B, T]
    return stack.at[layer, rows, slots].set(new.astype(stack.dtype), mode="drop")
