"""The trunk forward: one function for prefill (T tokens), verify (K+1) and decode (1).

``forward(params, tokens[B, T], cache, cfg, n_valid=None, logits="all", collect_stats=False)
-> (hidden, logits, cache, stats)``. ``hidden`` is the final-normed hidden state (what the lm_head reads and
what the NextN head takes as h_p, llama.cpp ``t_h_nextn``). The layer stacks run under ``lax.scan`` with the
KV cache in the carry, updated in place by a scatter of the T new entries per row (see kvcache.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import Stats, decoder_block, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype, linear
from mtp_jax.params import Params
from mtp_jax.qweight import is_quant


def run_stack(
    x: jax.Array,  # [B, T, D]
    layers,  # Layer stacked on a leading axis
    positions: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    k_stack: jax.Array | None,  # [L, B, S, K, H]
    v_stack: jax.Array | None,
    lengths: jax.Array,
    collect_stats: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, Stats]:
    """lax.scan over the layer index; each layer's weights are read out of the stacks in place (``linear``),
    never sliced into per-layer copies. Stats come out stacked per layer ([L, ...])."""
    n = jax.tree.leaves(layers, is_leaf=is_quant)[0].shape[0]  # a QuantWeight's shape is its logical one

    def body(carry, i):
        h, ks, vs = carry
        kv = None if ks is None else (ks, vs, i)
        h, kv, stats = decoder_block(h, layers, positions, cfg, mask, kv, lengths, collect_stats, i)
        if kv is not None:
            ks, vs, _ = kv
        return (h, ks, vs), stats

    (x, k_stack, v_stack), stats = jax.lax.scan(body, (x, k_stack, v_stack), jnp.arange(n))
    return x, k_stack, v_stack, stats


def output_weight(params: Params) -> tuple[jax.Array, bool]:
    """(weight, trans): the lm_head [D, V], or the tied embedding [V, D] read transposed."""
    return (params.embed, True) if params.lm_head is None else (params.lm_head, False)


def project_logits(w: tuple[jax.Array, bool], h: jax.Array) -> jax.Array:
    """h [..., D] @ lm_head -> float32 logits [..., V]. ``w`` as output_weight gives it."""
    return linear(h.astype(jnp.float32), w[0], trans=w[1])


def select_logits(w: tuple[jax.Array, bool], h: jax.Array, n_valid: jax.Array, logits: str) -> jax.Array | None:
    """``logits`` "all" [B, T, V] | "last" [B, 1, V] at each row's last valid token | "none" (None), through the
    output weight ``w`` (as output_weight gives it) from the normed hidden h [B, T, D]."""
    if logits == "all":
        return project_logits(w, h)
    if logits == "last":
        return project_logits(w, take_last(h, n_valid))
    if logits != "none":
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    return None


def valid_mask(T: int, n_valid: jax.Array) -> jax.Array:
    """[B, T]: token t of row b is real (not right padding)."""
    return jnp.arange(T)[None, :] < n_valid[:, None]


def take_last(x: jax.Array, n_valid: jax.Array) -> jax.Array:
    """x [B, T, ...] -> x[b, n_valid[b] - 1] as [B, 1, ...]."""
    idx = jnp.maximum(n_valid - 1, 0).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.take_along_axis(x, idx, axis=1)


def forward(params: Params, tokens: jax.Array, cache: KVCache | None, cfg: ModelConfig,
            n_valid: jax.Array | None = None, logits: str = "all", collect_stats: bool = False):
    """The trunk forward of cfg's family (``decoder_forward`` for GLM-4.5 and DeepSeek-V3); signature and results
    as decoder_forward's. ``hidden`` is what the family's heads take as h (llama.cpp ``t_h_nextn``)."""
    from mtp_jax import families

    return families.of(cfg).forward(params, tokens, cache, cfg, n_valid, logits, collect_stats)


def decoder_forward(
    params: Params,
    tokens: jax.Array,  # [B, T] int32, right-padded rows
    cache: KVCache | None,
    cfg: ModelConfig,
    n_valid: jax.Array | None = None,  # [B] real tokens per row (default T)
    logits: str = "all",  # "all" [B, T, V] | "last" [B, 1, V] at each row's last real token | "none"
    collect_stats: bool = False,
) -> tuple[jax.Array, jax.Array | None, KVCache | None, dict[str, Stats]]:
    """Trunk forward. With a cache, row b's tokens sit at positions lengths[b] + t and the cache comes back
    with lengths + n_valid; without one, positions are 0..T-1 (training, reference checks)."""
    B, T = tokens.shape
    n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    mask = valid_mask(T, n_valid)
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = lengths[:, None] + jnp.arange(T)[None, :]
    x = params.embed[tokens].astype(compute_dtype(cfg.dtype))  # [B, T, D]
    ks, vs = (None, None) if cache is None else (list(cache.k), list(cache.v))
    stats: dict[str, Stats] = {}
    for s, (name, layers) in enumerate((("dense_layers", params.dense_layers), ("moe_layers", params.moe_layers))):
        if layers is None:
            continue
        with jax.named_scope(name):
            x, k, v, st = run_stack(x, layers, positions, mask, cfg, None if ks is None else ks[s],
                                    None if vs is None else vs[s], lengths, collect_stats)
        if ks is not None:
            ks[s], vs[s] = k, v
        if collect_stats:
            stats[name] = st
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    out = select_logits(output_weight(params), h, n_valid, logits)
    if collect_stats:
        stats["top"] = {"lm_head": sum_squares(h, mask)}
    new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs), lengths + n_valid)
    return h, out, new_cache, stats


forward_jit = jax.jit(forward, static_argnames=("cfg", "logits", "collect_stats"), donate_argnames=("cache",))


# ---- host-side input checks (concrete values only) ----------------------------------------------------


def check_tokens(tokens, cfg: ModelConfig, what: str = "token ids") -> np.ndarray:
    """Raise ValueError for ids outside [0, vocab_size); returns the ids as int32."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"{what} out of vocabulary [0, {cfg.vocab_size}): {bad[:8].tolist()}")
    return arr.astype(np.int32)


def pad_prompts(prompts, cfg: ModelConfig, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """List of token-id sequences -> (tokens [B, T] right-padded with 0, lengths [B]). Empty prompts are an error."""
    prompts = [check_tokens(p, cfg, f"prompt {i} token ids") for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"prompt {i} is empty (every row needs at least one token)")
    lens = np.array([p.size for p in prompts], np.int32)
    T = int(pad_to or lens.max())
    if T < lens.max():
        raise ValueError(f"pad_to={T} is shorter than the longest prompt ({lens.max()})")
    out = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        out[i, : p.size] = p
    return out, lens

