"""Step-3.5's graph (the description, conventions and llama.cpp references are in families/step35.py): its
blocks run in block order as lax.scans over runs of one kind, sliding layers on ring caches, chained MTP heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax import kvcache, mtp
from mtp_jax import params as P
from mtp_jax.families.step35 import KINDS, SWA, Step35Config, Step35Params, stacks
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import at, attention, mlp, moe, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype
from mtp_jax.model import output_weight, select_logits, valid_mask


# ---- forward -------------------------------------------------------------------------------------------------


def block(x, p: P.Layer, positions, cfg: Step35Config, mask, kv, lengths, collect_stats: bool, li, bid, swa: bool):
    """One Step-3.5 decoder block (step35.cpp ``graph`` loop body): gated attention of the layer's kind, then the
    dense MLP or the MoE + shared expert, clamped by the block's limits. ``bid``: the block id (may be traced)."""
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        a, kv, stats = attention(rms_norm(x, at(p.attn_norm, li), eps), p.attn, positions, cfg, mask, kv, lengths,
                                 collect_stats, li, **cfg.attention_kw(swa))
    x = x + a
    lim = jnp.asarray(cfg.swiglu_limits, jnp.float32)[bid]
    lim_sh = jnp.asarray(cfg.swiglu_limits_shared, jnp.float32)[bid]
    with jax.named_scope("ffn"):
        hn = rms_norm(x, at(p.ffn_norm, li), eps)
        if isinstance(p.ffn, P.Moe):
            f, f_stats = moe(hn, p.ffn, cfg, mask, collect_stats, li, limit=lim, shared_limit=lim_sh)
        else:
            f, f_stats = mlp(hn, p.ffn, mask, collect_stats, li=li, limit=lim_sh)
    return x + f, kv, stats | f_stats


def _runs(cfg: Step35Config) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """Maximal runs of consecutive trunk blocks of one kind: (stack index, first, stop index in the stack, blocks)."""
    where = {b: (s, j) for s, (_, blocks, _) in enumerate(stacks(cfg)) for j, b in enumerate(blocks)}
    runs: list[tuple[int, int, int, tuple[int, ...]]] = []
    for b in range(cfg.num_hidden_layers):
        s, j = where[b]
        if runs and runs[-1][0] == s and runs[-1][2] == j:
            s0, j0, _, bids = runs[-1]
            runs[-1] = (s0, j0, j + 1, (*bids, b))
        else:
            runs.append((s, j, j + 1, (b,)))
    return runs


SWA_CHUNK = 256  # as llama.cpp's n_ubatch: a sliding layer's ring holds window + SWA_CHUNK - 1 entries (init_cache)


def _chunk(cache: KVCache | None, cfg: Step35Config) -> int | None:
    """The most tokens one forward may write into the cache's rings (window + T - 1 <= ring slots), None without."""
    if cache is None:
        return None
    rings = [x.shape[2] for x in cache.k if x is not None and x.shape[2] < cache.size]
    return min(rings) - cfg.sliding_window + 1 if rings else None


def _head_logits(params: Step35Params, x, n_valid, logits: str, cfg: Step35Config, normed: bool = False):
    """The final norm (unless ``normed``) and the output head -> (normed h, logits or None)."""
    h = x if normed else rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return h, select_logits(output_weight(params), h, n_valid, logits)


def _chunked(params: Step35Params, tokens, cache: KVCache, cfg: Step35Config, n_valid, logits: str, C: int):
    """A forward over more tokens than the sliding layers' rings take at once, as a scan over pieces of C."""
    B, T = tokens.shape
    n = -(-T // C)
    toks = jnp.pad(tokens, ((0, 0), (0, n * C - T)))

    def body(cache, c):
        piece = jax.lax.dynamic_slice_in_dim(toks, c * C, C, axis=1)
        x, _, cache, _ = forward(params, piece, cache, cfg, jnp.clip(n_valid - c * C, 0, C), logits="none")
        return cache, x

    cache, xs = jax.lax.scan(body, cache, jnp.arange(n))  # xs [n, B, C, D] (the hidden forward hands the heads)
    x = xs.transpose(1, 0, 2, 3).reshape(B, n * C, -1)[:, :T]
    return x, _head_logits(params, x, n_valid, logits, cfg, normed=cfg.mtp_hidden == "postnorm")[1], cache, {}


def forward(params: Step35Params, tokens, cache: KVCache | None, cfg: Step35Config, n_valid=None,
            logits: str = "all", collect_stats: bool = False):
    """model.forward for step35. The layers run in block order as lax.scans over runs of one kind; ``hidden`` is
    the residual stream before the final norm (llama.cpp's t_h_nextn for this arch). With ring caches on the
    sliding layers, more tokens than they take at once run in chunks."""
    B, T = tokens.shape
    n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    chunk = _chunk(cache, cfg)
    if chunk is not None and T > chunk:
        if collect_stats:
            raise ValueError("statistics are collected without a cache (imatrix), not through ring caches")
        return _chunked(params, tokens, cache, cfg, n_valid, logits, chunk)
    mask = valid_mask(T, n_valid)
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = lengths[:, None] + jnp.arange(T)[None, :]
    x = params.embed[tokens].astype(compute_dtype(cfg.dtype))  # [B, T, D]
    sts = stacks(cfg)
    ks, vs = (None, None) if cache is None else (list(cache.k), list(cache.v))
    parts: dict[str, list] = {}
    for s, j0, j1, bids in _runs(cfg):
        attr = sts[s][0]
        layers, swa = getattr(params, attr), KINDS[s][1] == SWA

        def body(carry, xs, layers=layers, swa=swa):
            h, k, v = carry
            j, bid = xs
            kv = None if k is None else (k, v, j)
            h, kv, st = block(h, layers, positions, cfg, mask, kv, lengths, collect_stats, j, bid, swa)
            if kv is not None:
                k, v, _ = kv
            return (h, k, v), st

        with jax.named_scope(attr):
            carry = (x, None if ks is None else ks[s], None if vs is None else vs[s])
            (x, k, v), st = jax.lax.scan(body, carry, (jnp.arange(j0, j1), jnp.asarray(bids)))
        if ks is not None:
            ks[s], vs[s] = k, v
        if collect_stats:
            parts.setdefault(attr, []).append(st)
    h, out = _head_logits(params, x, n_valid, logits, cfg)
    hidden = x if cfg.mtp_hidden == "prenorm" else h
    stats: dict[str, Any] = {}
    if collect_stats:
        stats = {a: jax.tree.map(lambda *xs: jnp.concatenate(xs), *p) for a, p in parts.items()}
        stats["top"] = {"lm_head": sum_squares(h, mask)}
    new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs), lengths + n_valid)
    return hidden, out, new_cache, stats


def head_forward(params: Step35Params, h, tokens, cache: KVCache | None, cfg: Step35Config, head: int = 0,
                 n_valid=None, logits: str = "all", collect_stats: bool = False):
    """MTP head ``head`` (block n_layer + head: step35.cpp graph_mtp) -> (its pre-norm output, the hidden the next
    head takes; logits; cache; stats)."""
    bid = cfg.num_hidden_layers + head
    swa = cfg.is_swa(bid)

    def run(x, layer, positions, cfg_, mask, kv, lengths, collect):
        return block(x, layer, positions, cfg_, mask, kv, lengths, collect, None, bid, swa)

    return mtp.nextn_forward(params, h, tokens, cache, cfg, head, n_valid, logits, collect_stats, block=run,
                             chain_prenorm=cfg.mtp_hidden == "prenorm")


def init_cache(cfg: Step35Config, batch: int, size: int, k_type: str | None = None,
               v_type: str | None = None) -> KVCache:
    """One K and V stack per kind of layer (stacks' order). The sliding layers' stacks are rings of
    sliding_window + SWA_CHUNK - 1 slots (kvcache.write_block) when that is smaller than ``size`` and the model has
    full-attention layers (they hold the positions: KVCache.size counts theirs)."""
    n = [len(b) for _, b, _ in stacks(cfg)]
    swa = [KINDS[i][1] == SWA for i in range(len(KINDS))]
    ring = min(size, cfg.sliding_window + SWA_CHUNK - 1)
    if ring == size or all(swa[i] or not n[i] for i in range(len(n))):
        return kvcache.stacked_cache(tuple(n), batch, size, cfg, k_type, v_type)
    full = kvcache.stacked_cache(tuple(0 if s else c for c, s in zip(n, swa)), batch, size, cfg, k_type, v_type)
    rings = kvcache.stacked_cache(tuple(c if s else 0 for c, s in zip(n, swa)), batch, ring, cfg, k_type, v_type)
    pick = lambda a, b: tuple(y if s else x for x, y, s in zip(a, b, swa))  # noqa: E731
    return KVCache(pick(full.k, rings.k), pick(full.v, rings.v), full.lengths)
