"""Gemma 4's graph (the description, conventions and llama.cpp references are in families/gemma4.py): sliding and
full attention over one cache per kind of layer, KV-shared layers, the MoE block beside the MLP, per-layer inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import kvcache, kvquant
from mtp_jax.families.gemma4 import KINDS, G4Attention, G4Layer, G4Moe, Gemma4Config, Gemma4Params, stacks
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import at, attend_in_place, attend_kernel, mlp, moe, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype, linear
from mtp_jax.model import output_weight, select_logits, valid_mask

_NEG = -1e30


# ---- forward -------------------------------------------------------------------------------------------------


def rope_pairs(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """NeoX RoPE over the whole head with one frequency per pair (i, i + H/2); x [B, T, n, H], freqs [H/2]."""
    half = x.shape[-1] // 2
    ang = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(freqs)  # [B, T, 1, H/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _unit_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMS norm without a weight (V, the router input: Gemma4RMSNorm(with_scale=False), ggml_rms_norm)."""
    return rms_norm(x, jnp.ones((), jnp.float32), eps)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Scale-1 GQA attention: q [B, T, N, H], k / v [B, S, K, H], visible [B|1, T, S] -> [B, T, N, H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, v.shape[-1])


def attend_cache(q: jax.Array, ks, vs, ci, visible: jax.Array) -> jax.Array:
    """``attend`` over layer ``ci`` of a cache's K / V stacks of any type: a quantized stack is read dequantized;
    against a TurboQuant K the queries are rotated, from a TurboQuant V the output is rotated back (kvquant)."""
    k, v = kvcache.read_layer(ks, ci, q.dtype), kvcache.read_layer(vs, ci, q.dtype)
    out = attend(kvquant.rotate(q) if kvcache.rotated(ks) else q, k, v, visible)
    return kvquant.unrotate(out, q.shape[-1]) if kvcache.rotated(vs) else out


def _attention(x, p: G4Attention, li, positions, cfg: Gemma4Config, swa: bool, mask, kv, lengths,
               collect_stats: bool):
    """One layer's attention. ``kv``: (K stack, V stack, index) of the layer's cache (its source layer's for a
    KV-shared layer), or None without a cache, in which case a KV-shared layer gets ``kv`` as (k, v) arrays of
    its source from this forward. -> (out [B, T, D], kv, (k, v) of this forward or None, stats)."""
    B, T, _ = x.shape
    N, H = p.wq.shape[-2:]
    eps = cfg.rms_norm_eps
    freqs = cfg.rope_freqs(swa)
    flat = lambda w: w.reshape(*w.shape[:-2], -1)  # noqa: E731
    q = linear(x, flat(p.wq), li).reshape(B, T, N, H)
    q = rope_pairs(rms_norm(q, at(p.q_norm, li), eps), positions, freqs)
    fresh = None
    if p.wk is not None:
        K = p.wk.shape[-2]
        k = linear(x, flat(p.wk), li).reshape(B, T, K, H)
        v = k if p.wv is None else linear(x, flat(p.wv), li).reshape(B, T, K, H)
        k = rope_pairs(rms_norm(k, at(p.k_norm, li), eps), positions, freqs)
        v = _unit_norm(v, eps)
        fresh = (k, v)
    window = cfg.sliding_window if swa else None
    if kv is not None and len(kv) == 3:  # a cache: write this layer's entries (if it has K/V), read the layer's
        ks, vs, ci = kv
        if fresh is not None:
            kv = (kvcache.write_block(ks, ci, fresh[0], lengths), kvcache.write_block(vs, ci, fresh[1], lengths), ci)
        if attend_in_place(kv[0], kv[1]):  # CPU: the kernel reads the layer in place (positions = lengths + t)
            K = kv[0].shape[3]
            out = attend_kernel(q.reshape(B, T, K, N // K, H), kv[0], kv[1], ci, lengths, 1.0, window)
            out = out.reshape(B, T, N, H).astype(q.dtype)
        else:
            key_pos, query_pos = jnp.arange(kv[0].shape[2])[None, None, :], positions[:, :, None]
            visible = (key_pos <= query_pos) & (True if window is None else key_pos > query_pos - window)
            out = attend_cache(q, kv[0], kv[1], ci, visible)
    else:  # no cache: this forward's K/V (a KV-shared layer's come from its source layer in ``kv``)
        k_all, v_all = fresh if fresh is not None else kv
        key_pos, query_pos = jnp.arange(T)[None, None, :], jnp.arange(T)[None, :, None]
        visible = (key_pos <= query_pos) & (True if window is None else key_pos > query_pos - window)
        out = attend(q, k_all, v_all, visible)
    out = out.reshape(B, T, N * H)
    y = linear(out, p.wo.reshape(*p.wo.shape[:-3], N * H, -1), li)
    stats = {}
    if collect_stats:
        s_in = sum_squares(x, mask)
        stats = {"attn.wq": s_in, "attn.wo": sum_squares(out, mask)}
        if p.wk is not None:
            stats["attn.wk"] = s_in
            if p.wv is not None:
                stats["attn.wv"] = s_in
    return y, kv, fresh, stats


def _route(x: jax.Array, m: G4Moe, cfg: Gemma4Config, li) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gemma4TextRouter: softmax over experts of proj(rms_norm(x) * scale / sqrt(D)), top-k renormalized, times the
    picked experts' scales (llama.cpp: the router logits gemma4.cpp builds, build_moe_ffn with softmax gating,
    norm_w, and ffn_down_exps.scale). x [N, D] -> (idx [N, k], weights [N, k], the router's input [N, D])."""
    D = x.shape[-1]
    h = _unit_norm(x.astype(jnp.float32), cfg.rms_norm_eps) * at(m.router_scale, li).astype(jnp.float32) * D ** -0.5
    probs = jax.nn.softmax(linear(h, m.experts.router, li), axis=-1)
    w, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    w = w / w.sum(-1, keepdims=True)
    return idx.astype(jnp.int32), w * at(m.expert_scale, li).astype(jnp.float32)[idx], h


def _ffn(x, p: G4Layer, li, cfg: Gemma4Config, mask, collect_stats: bool):
    """The feed-forward part after the attention residual: x [B, T, D] -> the FFN output before the residual."""
    eps = cfg.rms_norm_eps
    f, stats = mlp(rms_norm(x, at(p.ffn_norm, li), eps), p.mlp, mask, collect_stats, prefix="mlp.", li=li,
                   act="gelu")
    if p.moe is not None:
        m = p.moe
        B, T, D = x.shape
        idx, w, h = _route(x.reshape(B * T, D), m, cfg, li)
        e, e_stats = moe(rms_norm(x, at(m.pre_norm, li), eps), m.experts, cfg, mask, collect_stats, li, act="gelu",
                         routing=(idx, w))
        f = rms_norm(f, at(m.post_norm_mlp, li), eps) + rms_norm(e, at(m.post_norm_moe, li), eps)
        if collect_stats:
            e_stats["ffn.router"] = sum_squares(h.reshape(B, T, D), mask)
            stats |= {"moe.experts." + k[len("ffn."):]: v for k, v in e_stats.items()}
    return rms_norm(f, at(p.ffn_post_norm, li), eps), stats


def _per_layer_inputs(params: Gemma4Params, tokens, x, cfg: Gemma4Config) -> jax.Array | None:
    """PLE: (rms_norm(x W / sqrt(D)) + E_ple[t] sqrt(P)) / sqrt(2) -> [B, T, L, P] (gemma4.cpp
    project_per_layer_inputs, HF Gemma4TextModel.project_per_layer_inputs)."""
    Pd = cfg.hidden_size_per_layer_input
    if not Pd:
        return None
    B, T, D = x.shape
    L = cfg.num_hidden_layers
    proj = (linear(x, params.ple_model_proj) * D ** -0.5).reshape(B, T, L, Pd)
    proj = rms_norm(proj, params.ple_proj_norm, cfg.rms_norm_eps)
    tok = params.ple_embed[tokens].astype(x.dtype).reshape(B, T, L, Pd) * jnp.asarray(Pd ** 0.5, x.dtype)
    return (proj + tok) * jnp.asarray(2 ** -0.5, x.dtype)


def block(x, p: G4Layer, li, positions, cfg: Gemma4Config, swa: bool, mask, kv, lengths, ple, collect_stats):
    """One Gemma-4 decoder layer (gemma4.cpp ``graph`` loop body). ``ple`` [B, T, P] this layer's per-layer input."""
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        a, kv, fresh, stats = _attention(rms_norm(x, at(p.attn_norm, li), eps), p.attn, li, positions, cfg, swa,
                                         mask, kv, lengths, collect_stats)
    x = x + rms_norm(a, at(p.attn_post_norm, li), eps)
    with jax.named_scope("ffn"):
        f, f_stats = _ffn(x, p, li, cfg, mask, collect_stats)
    x = x + f
    stats |= f_stats
    if ple is not None:
        g = jax.nn.gelu(linear(x, p.ple_gate, li), approximate=True) * ple
        if collect_stats:
            stats |= {"ple_gate": sum_squares(x, mask), "ple_proj": sum_squares(g, mask)}
        x = x + rms_norm(linear(g, p.ple_proj, li), at(p.ple_norm, li), eps)
    return x * at(p.out_scale, li).astype(x.dtype), kv, fresh, stats


def _where(cfg: Gemma4Config) -> dict[int, tuple[int, int]]:
    """layer -> (stack index in KINDS, index in that stack)."""
    return {b: (s, j) for s, (_, blocks, _) in enumerate(stacks(cfg)) for j, b in enumerate(blocks)}


def cache_slot(cfg: Gemma4Config, layer: int) -> tuple[int, int]:
    """(cache stack: 0 sliding / 1 full, index) of the cache a layer attends with (its KV source's)."""
    src = cfg.kv_source(layer)
    return _where(cfg)[src]


def forward(params: Gemma4Params, tokens, cache: KVCache | None, cfg: Gemma4Config, n_valid=None,
            logits: str = "all", collect_stats: bool = False):
    """model.forward for gemma4 -> (final-normed hidden, logits (soft-capped), cache, stats). The cache has two
    stacks, sliding then full layers with K/V (init_cache); KV-shared layers read their source's entries. Layers run
    unrolled in order (kinds alternate every few layers), each reading its weights out of its kind's stack."""
    B, T = tokens.shape
    n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    mask = valid_mask(T, n_valid)
    lengths = None if cache is None else cache.lengths
    positions = (jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths)[:, None] + jnp.arange(T)[None, :]
    dt = compute_dtype(cfg.dtype)
    x0 = params.embed[tokens].astype(dt) * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    ple = _per_layer_inputs(params, tokens, x0, cfg)
    ks, vs = (None, None) if cache is None else (list(cache.k), list(cache.v))
    where = _where(cfg)
    produced: dict[int, tuple] = {}  # without a cache: each K/V layer's (k, v) for the layers that share it
    parts: dict[str, list] = {}
    x = x0
    for layer in range(cfg.num_hidden_layers):
        s, j = where[layer]
        attr, swa, _ = KINDS[s]
        layers = getattr(params, attr)
        if cache is not None:
            c, ci = where[cfg.kv_source(layer)]  # cache_slot
            kv = (ks[c], vs[c], ci)
        else:
            kv = produced.get(cfg.kv_source(layer))
        with jax.named_scope(f"layer{layer}"):
            x, kv, fresh, st = block(x, layers, j, positions, cfg, swa, mask, kv, lengths,
                                     None if ple is None else ple[:, :, layer], collect_stats)
        if cache is not None:
            ks[c], vs[c] = kv[0], kv[1]
        elif fresh is not None:
            produced[layer] = fresh
        if collect_stats:
            parts.setdefault(attr, []).append(st)
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    out = select_logits(output_weight(params), h, n_valid, logits)
    if out is not None and cfg.final_logit_softcapping:
        c = cfg.final_logit_softcapping
        out = jnp.tanh(out / c) * c
    stats: dict[str, Any] = {}
    if collect_stats:
        stats = {a: jax.tree.map(lambda *xs: jnp.stack(xs), *p) for a, p in parts.items()}
        top = {"lm_head": sum_squares(h, mask)}
        if ple is not None:  # the scaled embedding, as gemma4.cpp's per_layer_model_proj reads it
            top["ple_model_proj"] = sum_squares(x0, mask)
        stats["top"] = top
    new_cache = None if cache is None else KVCache(tuple(ks), tuple(vs), cache.lengths + n_valid)
    return h, out, new_cache, stats


def init_cache(cfg: Gemma4Config, batch: int, size: int, k_type: str | None = None,
               v_type: str | None = None) -> KVCache:
    """Two K / V stacks: the sliding layers that have K/V, then the full ones (each with its kind's heads and dims)."""
    counts = [len(stacks(cfg)[s][1]) for s in (0, 1)]
    parts = [kvcache.stacked_cache((counts[s],), batch, size, cfg, k_type, v_type, dims=cfg.dims(s == 0))
             for s in (0, 1)]
    return KVCache((parts[0].k[0], parts[1].k[0]), (parts[0].v[0], parts[1].v[0]), parts[0].lengths)


def head_forward(*args, **kwargs):
    raise ValueError("Gemma 4 drafts with its assistant model (gemma4_assistant_graph.assistant_forward), not with "
                     "NextN blocks")
