"""Small pure functions: rms_norm, RoPE (partial NeoX; interleaved pairs with YaRN), GQA and MLA attention, SwiGLU
MLP, MoE (sigmoid or softmax router), decoder block.

Statistics (``collect_stats``): each projection that llama.cpp would quantize reports, for its input x,
``{"sum2": sum over valid tokens of x**2 per input column, "count": number of valid tokens}``, keyed by the
weight's leaf path inside its layer (``attn.wq``, ``ffn.down``; the family's tensor table names them). Routed
experts report per-expert sums and counts over the tokens routed to them only. ``mask`` [B, T] marks the valid
(non-padding) tokens.

Weights are read through ``linear`` straight out of their layer stack: every function takes ``li``, the
layer's index into the stacked leaves (None for an unstacked layer such as the NextN block), and ``at`` picks
a small per-layer leaf (norm, bias) by it.

Shapes: B batch, T new tokens, S cache slots, D hidden, N q heads, K kv heads, G = N/K, H head_dim,
F ffn, E experts, k experts per token; MLA: Q q-LoRA rank, C latent (kv_lora_rank), Hn / R / Hv nope / rope /
value head dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import kernels, kvquant
from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import QuantStack, read_layer, ring_positions, rotated, write_block
from mtp_jax.linear import linear
from mtp_jax.params import Attention, Layer, MlaAttention, Mlp, Moe
from mtp_jax.qweight import layer_dense

Stats = dict[str, dict[str, jax.Array]]
KV = tuple  # K stack, V stack [L, B, S, K, H] (arrays or kvcache.QuantStack), this layer's index
_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


def at(a: jax.Array | None, li: jax.Array | int | None) -> jax.Array | None:
    """A per-layer leaf of a stack (or the leaf itself when unstacked)."""
    return a if a is None or li is None else a[li]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF Glm4MoeRMSNorm / ggml_rms_norm: x / sqrt(mean(x^2) + eps) * w, computed in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Partial NeoX-style RoPE on the first rotary_dim dims of each head (HF apply_rotary_pos_emb with
    rotate_half; llama.cpp LLAMA_ROPE_TYPE_NEOX with n_rot = rotary_dim). x [B, T, n, H], positions [B, T]."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))  # [half]
    ang = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, half]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def rope_interleaved(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """RoPE on adjacent pairs (x[2i], x[2i+1]) of the whole last axis, in place: llama.cpp LLAMA_ROPE_TYPE_NORM, as
    deepseek2 uses it (llama_model_rope_type); HF apply_rotary_pos_emb_interleave computes the same rotation but
    writes the pairs de-interleaved, a permutation shared by q and k that leaves q.k unchanged.
    x [B, T, n, R], positions [B, T], freqs [R/2] (deepseek2.yarn_freqs)."""
    ang = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(freqs)  # [B, T, 1, R/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape).astype(x.dtype)


def sum_squares(x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """x [B, T, C], mask [B, T] -> sum of x^2 over valid tokens per column, and the token count."""
    m = mask.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    return {"sum2": jnp.einsum("btc,bt->c", xf * xf, m), "count": m.sum()}


def attention(
    x: jax.Array,  # [B, T, D] (already normed)
    p: Attention,
    positions: jax.Array,  # [B, T]
    cfg: ModelConfig,
    mask: jax.Array,  # [B, T] valid tokens
    kv: KV | None = None,  # (k_stack, v_stack [L, B, S, K, H], layer index in the stacks)
    lengths: jax.Array | None = None,  # [B] valid slots of the cache
    collect_stats: bool = False,
    li: jax.Array | int | None = None,
    rope_dims: int | None = None,  # rotated dims per head (default cfg.rotary_dim)
    theta: float | None = None,  # RoPE base (default cfg.rope_theta)
    window: int | None = None,  # sliding window: query p sees keys p - window < j <= p (None: all)
) -> tuple[jax.Array, KV | None, Stats]:
    """GQA attention with optional bias, qk-norm, sliding window and head-wise output gate (Step-3.5:
    o_h *= sigmoid(x W_g)_h before the output projection) -> (out [B, T, D], updated kv, stats). Head counts come
    from the weights' shapes, so layers of one model may differ in them.

    With a cache, the T new entries of row b are written first at slots lengths[b] + t (kvcache.write_block),
    then query t attends to slots < lengths[b] + t + 1: the cache is written, then read, so XLA updates it in
    place (reading the old stack beside a write to it made XLA copy the whole stack every layer). On CPU a float,
    q8_0 or q4_0 stack is read in place by the kernel (``attend_kernel``; a sliding layer's ring too): XLA copied
    the layer's slice into a transposed layout for its dots and ran ~10 more small ops. Otherwise a quantized stack
    is read dequantized; against a TurboQuant K the queries are rotated, from a TurboQuant V the output is rotated
    back (kvquant)."""
    B, T, _ = x.shape
    (N, H), K = p.wq.shape[-2:], p.wk.shape[-2]
    G = N // K
    rope_dims = cfg.rotary_dim if rope_dims is None else rope_dims
    theta = cfg.rope_theta if theta is None else theta
    flat = lambda w: w.reshape(*w.shape[:-2], -1)  # noqa: E731  [.., D, n, H] -> [.., D, n*H] (free)
    with jax.named_scope("qkv"):
        q = linear(x, flat(p.wq), li).reshape(B, T, N, H)
        k = linear(x, flat(p.wk), li).reshape(B, T, K, H)
        v = linear(x, flat(p.wv), li).reshape(B, T, K, H)
        if p.bq is not None:
            q, k, v = q + at(p.bq, li), k + at(p.bk, li), v + at(p.bv, li)
        if p.q_norm is not None:
            q, k = rms_norm(q, at(p.q_norm, li), cfg.rms_norm_eps), rms_norm(k, at(p.k_norm, li), cfg.rms_norm_eps)
        q = rope(q, positions, rope_dims, theta)
        k = rope(k, positions, rope_dims, theta)
    with jax.named_scope("scores"):
        q = q.reshape(B, T, K, G, H)
        scale = H**-0.5
        if kv is not None:
            ks, vs, ci = kv
            ring = window is not None  # a sliding-window layer's stack may be a ring (kvcache.write_block)
            ks, vs = write_block(ks, ci, k, lengths, ring), write_block(vs, ci, v, lengths, ring)
            kv = (ks, vs, ci)
            if attend_in_place(ks, vs):
                out = attend_kernel(q, ks, vs, ci, lengths, scale, window, ring).astype(q.dtype)
                return _attention_out(x, out.reshape(B, T, N, H), p, li, mask, collect_stats, kv)
            k, v = read_layer(ks, ci, q.dtype), read_layer(vs, ci, q.dtype)  # [B, S, K, H] (turbo: rotated, padded)
            if rotated(ks):
                q = kvquant.rotate(q)
            S = k.shape[1]
            key_pos = (ring_positions(S, lengths + T - 1)[:, None, :] if ring
                       else jnp.arange(S)[None, None, :])  # [B|1, 1, S] (a full stack: slot = position)
            query_pos = (lengths[:, None] + jnp.arange(T)[None, :])[:, :, None]  # [B, T, 1]
        else:
            key_pos, query_pos = jnp.arange(T)[None, None, :], jnp.arange(T)[None, :, None]
        visible = (key_pos <= query_pos) & (key_pos >= 0)  # [B|1, T(query), S|T(key)] causal
        if window is not None:
            visible &= key_pos > query_pos - window
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible[:, None, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        if kv is not None and rotated(kv[1]):
            out = kvquant.unrotate(out, H)
    return _attention_out(x, out.reshape(B, T, N, H), p, li, mask, collect_stats, kv)


_KERNEL_KINDS = {"q8_0": 1, "q4_0": 2}  # AttKind in cpu_linear.cc; 0: a float stack


def _kernel_side(stack) -> bool:
    if isinstance(stack, QuantStack):  # ggml blocks along H (TurboQuant's rotated, padded groups: XLA's path)
        return stack.kind in _KERNEL_KINDS
    return stack.dtype in (jnp.float32, jnp.float16, jnp.bfloat16)


def attend_in_place(ks, vs) -> bool:
    """Whether the CPU kernel attends over these stacks: each a float stack or q8_0 / q4_0 blocks (TurboQuant
    stacks are dequantized by XLA)."""
    return kernels.use_cpu_kernels() and _kernel_side(ks) and _kernel_side(vs)


def _kernel_args(stack) -> tuple:
    """(entries, scales, kind) as the kernel takes a side: a float stack has no scales (a 1-value stand-in)."""
    if isinstance(stack, QuantStack):
        return stack.q, stack.d, _KERNEL_KINDS[stack.kind]
    return stack, jnp.zeros((1,), jnp.float16), 0


def attend_kernel(q: jax.Array, ks: jax.Array, vs: jax.Array, ci, lengths: jax.Array, scale: float,
                  window: int | None = None, ring: bool = False) -> jax.Array:
    """The kernel (mtp_jax/kernels/cpu_linear.cc, AttendImpl): q [B, T, K, G, H] attends over layer ci of the stacks
    [L, B, S, K, H] (float, or a q8_0 / q4_0 QuantStack dequantized entry by entry as kvquant.dequantize does) read
    in place, query t of row b at p = lengths[b] + t to the positions p - window < j <= p, position j in slot j
    (``ring``: slot j mod S, kvcache.write_block) -> f32 [B, T, K, G, H]."""
    (kq, kd, k_kind), (vq, vd, v_kind) = _kernel_args(ks), _kernel_args(vs)
    call = jax.ffi.ffi_call(kernels.ATTEND, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), kq, vq, kd, vd, jnp.asarray(ci, jnp.int32).reshape(1),
                lengths.astype(jnp.int32), scale=np.float32(scale), window=np.int32(window or 0), ring=bool(ring),
                k_kind=np.int32(k_kind), v_kind=np.int32(v_kind))


def _attention_out(x, out, p: Attention, li, mask, collect_stats: bool, kv) -> tuple[jax.Array, KV | None, Stats]:
    """The head-wise gate, the output projection and the statistics of ``attention``: out [B, T, N, H]."""
    B, T, N, H = out.shape
    if p.wg is not None:  # head-wise gate (llama.cpp step35.cpp: attn_gate, sigmoid, broadcast over head_dim)
        out = out * jax.nn.sigmoid(linear(x, p.wg, li)).astype(out.dtype)[..., None]
    out = out.reshape(B, T, N * H)
    y = linear(out, p.wo.reshape(*p.wo.shape[:-3], N * H, -1), li)
    stats: Stats = {}
    if collect_stats:
        s_in = sum_squares(x, mask)
        stats = {"attn.wq": s_in, "attn.wk": s_in, "attn.wv": s_in, "attn.wo": sum_squares(out, mask)}
        if p.wg is not None:
            stats["attn.wg"] = s_in
    return y, kv, stats


def _heads_sum_squares(x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """x [B, T, n, C] (the input of each head's matrix of a per-head weight) -> sum2 [n * C] (head-major) and the
    token count: llama-imatrix's entry for a 3-D MUL_MAT weight (collect_imatrix: values of matrix i2 at
    i2 * ne0, one count for the dense tensor)."""
    m = mask.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    return {"sum2": jnp.einsum("btnc,bt->nc", xf * xf, m).reshape(-1), "count": m.sum()}


def mla_attention(
    x: jax.Array,  # [B, T, D] (already normed)
    p: MlaAttention,
    positions: jax.Array,  # [B, T]
    cfg: ModelConfig,  # a DeepSeek-style config (families/deepseek2.py)
    mask: jax.Array,  # [B, T] valid tokens
    kv: KV | None = None,  # (latent stack [L, B, S, 1, C + R], None, layer index)
    lengths: jax.Array | None = None,  # [B]
    collect_stats: bool = False,
    li: jax.Array | int | None = None,
) -> tuple[jax.Array, KV | None, Stats]:
    """MLA, absorbed, over the latent cache -> (out [B, T, D], updated kv, stats). llama.cpp src/models/deepseek2.cpp
    ``graph`` (is_mla branch) and ``graph_mtp``:

    q = wq_b(rms(wq_a x)) (or wq x) split per head into q_nope [Hn] | q_pe [R]; wkv_a x = c [C] | k_pe [R], c normed;
    RoPE (interleaved pairs, YaRN) on q_pe and k_pe; a token's cache entry is concat(c, k_pe), one per token
    (cfg.cache_dims()); query = concat(q_nope @ wk_b[h], q_pe); scores over the entries scaled by cfg.attn_scale;
    the attended latent goes through wv_b[h], then wo. The new entries are written before attending, as in
    ``attention``, so XLA updates the cache in place. A TurboQuant latent is attended to rotated: the queries
    rotate, and the attended latent rotates back before its first C values are kept."""
    B, T, _ = x.shape
    N, C = cfg.num_attention_heads, cfg.kv_lora_rank
    Hn, R, Hv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    eps = cfg.rms_norm_eps
    flat = lambda w: w.reshape(*w.shape[:-2], -1)  # noqa: E731  [.., Q, N, H] -> [.., Q, N*H] (free)
    freqs = cfg.rope_freqs()
    stats: Stats = {}
    with jax.named_scope("q"):
        if p.wq_a is not None:
            qa = rms_norm(linear(x, p.wq_a, li), at(p.q_a_norm, li), eps)  # [B, T, Q]
            q = linear(qa, flat(p.wq_b), li)
            if collect_stats:
                stats = {"attn.wq_a": sum_squares(x, mask), "attn.wq_b": sum_squares(qa, mask)}
        else:
            q = linear(x, flat(p.wq), li)
            if collect_stats:
                stats = {"attn.wq": sum_squares(x, mask)}
        q = q.reshape(B, T, N, Hn + R)
        q_nope, q_pe = q[..., :Hn], rope_interleaved(q[..., Hn:], positions, freqs)
        q_abs = linear(q_nope, p.wk_b, li, heads=True)  # [B, T, N, C]
        query = jnp.concatenate([q_abs, q_pe], axis=-1)  # [B, T, N, C + R]
    with jax.named_scope("latent"):
        ckv = linear(x, p.wkv_a, li)  # [B, T, C + R]
        c = rms_norm(ckv[..., :C], at(p.kv_a_norm, li), eps)
        k_pe = rope_interleaved(ckv[..., None, C:], positions, freqs)  # [B, T, 1, R]
        entry = jnp.concatenate([c[:, :, None], k_pe], axis=-1)  # [B, T, 1, C + R]
    with jax.named_scope("scores"):
        if kv is not None:
            ks, vs, ci = kv
            ks = write_block(ks, ci, entry, lengths)
            kv = (ks, vs, ci)
            lat = read_layer(ks, ci, query.dtype)[:, :, 0]  # [B, S, C + R] (turbo: rotated, padded)
            if rotated(ks):
                query = kvquant.rotate(query)
            S = lat.shape[1]
            visible = jnp.arange(S)[None, None, :] < (lengths[:, None] + jnp.arange(T)[None, :] + 1)[:, :, None]
        else:
            lat = entry[:, :, 0]
            visible = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]  # [1, T(query), T(key)] causal
        scores = jnp.einsum("btnc,bsc->bnts", query, lat.astype(query.dtype),
                            preferred_element_type=jnp.float32) * cfg.attn_scale
        scores = jnp.where(visible[:, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
        if kv is not None and rotated(kv[0]):
            o_lat = kvquant.unrotate(jnp.einsum("bnts,bsc->btnc", probs, lat), C)  # [B, T, N, C]
        else:
            o_lat = jnp.einsum("bnts,bsc->btnc", probs, lat[..., :C].astype(query.dtype))  # [B, T, N, C]
    o = linear(o_lat, p.wv_b, li, heads=True).reshape(B, T, N * Hv)
    y = linear(o, p.wo.reshape(*p.wo.shape[:-3], N * Hv, -1), li)
    if collect_stats:
        stats |= {"attn.wkv_a": sum_squares(x, mask), "attn.wk_b": _heads_sum_squares(q_nope, mask),
                  "attn.wv_b": _heads_sum_squares(o_lat, mask), "attn.wo": sum_squares(o, mask)}
    return y, kv, stats


def swiglu(g: jax.Array, u: jax.Array, limit: jax.Array | float | None = None, act: str = "silu") -> jax.Array:
    """silu(g) * u, or with a clamp limit L > 0: min(silu(g), L) * clip(u, -L, L) (HF Step3p7MLP, llama.cpp
    llama-graph.cpp build_ffn / build_moe_ffn with swiglu_clamp_*; L <= 1e-6 means no clamp, as there).
    ``act="gelu"``: GeGLU, gelu(g) * u with the tanh approximation (HF gelu_pytorch_tanh, ggml_geglu: Gemma)."""
    a = jax.nn.gelu(g, approximate=True) if act == "gelu" else jax.nn.silu(g)
    if limit is None:
        return a * u
    lim = jnp.where(limit > 1e-6, limit, jnp.inf).astype(a.dtype)
    return jnp.minimum(a, lim) * jnp.clip(u, -lim, lim)


def mlp(x: jax.Array, p: Mlp, mask: jax.Array, collect_stats: bool = False, prefix: str = "ffn.",
        li: jax.Array | int | None = None, limit: jax.Array | float | None = None,
        act: str = "silu") -> tuple[jax.Array, Stats]:
    """SwiGLU: down(silu(x @ gate) * (x @ up)), clamped when ``limit`` is given (``swiglu``; ``act="gelu"``:
    GeGLU). x [B, T, D]."""
    h = swiglu(linear(x, p.gate, li), linear(x, p.up, li), limit, act)
    y = linear(h, p.down, li)
    stats: Stats = {}
    if collect_stats:
        s_in = sum_squares(x, mask)
        stats = {f"{prefix}gate": s_in, f"{prefix}up": s_in, f"{prefix}down": sum_squares(h, mask)}
    return y, stats


def route(x: jax.Array, p: Moe, cfg: ModelConfig, li: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
    """GLM-4.5 / DeepSeek-V3 router (HF Glm4MoeTopkRouter / DeepseekV3TopkRouter, llama.cpp llama-graph.cpp
    build_moe_ffn with exp_probs_b and n_expert_groups).

    Sigmoid scores (softmax over all experts when the config's ``scoring_func`` says so: DeepSeek-V2, GGUF
    expert_gating_func 1); the correction bias is added for *selection* only; experts are picked among the
    topk_group best groups (a group's score = sum of its top-2 biased scores); the weights are the
    unbiased scores of the picked experts, normalized if norm_topk_prob, times routed_scaling_factor.
    x [N, D] -> (idx [N, k] int32, weights [N, k] float32).
    """
    N = x.shape[0]
    E, k, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    logits = linear(x.astype(jnp.float32), p.router, li)
    softmax = getattr(cfg, "scoring_func", "sigmoid") == "softmax"
    scores = jax.nn.softmax(logits, axis=-1) if softmax else jax.nn.sigmoid(logits)  # [N, E]
    choice = scores + at(p.bias, li).astype(jnp.float32)
    if G > 1 and cfg.topk_group < G:
        grouped = choice.reshape(N, G, E // G)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [N, topk_group]
        keep = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, E // G, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)  # [N, k]
    w = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * cfg.routed_scaling_factor


def _experts_by_row(x: jax.Array, idx: jax.Array, p: Moe, li, limit=None, act="silu") -> tuple[jax.Array, jax.Array]:
    """Each (token, expert) pair is a row of ``linear`` with its expert id: the CPU kernel reads each distinct
    expert once per call, in place; XLA gathers the picked experts' weights (worth it for few tokens only).
    x [N, D] -> (out [N, k, D], h [N, k, F])."""
    N, k = idx.shape
    rows = jnp.repeat(x, k, axis=0)  # [N*k, D] row n*k + j pairs token n with its j-th expert
    e = idx.reshape(-1)
    h = swiglu(linear(rows, p.gate, li, e), linear(rows, p.up, li, e), limit, act)  # [N*k, F]
    return linear(h, p.down, li, e).reshape(N, k, -1), h.reshape(N, k, -1)


def _experts_ragged(x: jax.Array, idx: jax.Array, p: Moe, li, limit=None, act="silu") -> tuple[jax.Array, jax.Array]:
    """XLA: sort the (token, expert) pairs by expert and run grouped matmuls (prefill / verify: many tokens)."""
    N, k = idx.shape
    gate, up, down = (layer_dense(w, li, x.dtype) for w in (p.gate, p.up, p.down))  # [E, ...] of this layer
    flat = idx.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]  # [N*k, D]
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    h = swiglu(jax.lax.ragged_dot(xs, gate, sizes), jax.lax.ragged_dot(xs, up, sizes), limit, act)  # [N*k, F]
    y = jax.lax.ragged_dot(h, down, sizes)  # [N*k, D]
    inv = jnp.argsort(order)
    return y[inv].reshape(N, k, -1), h[inv].reshape(N, k, -1)


def moe(x: jax.Array, p: Moe, cfg: ModelConfig, mask: jax.Array, collect_stats: bool = False,
        li: jax.Array | int | None = None, limit=None, shared_limit=None, act: str = "silu",
        routing: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, Stats]:
    """Routed experts (weighted sum) + shared expert, their SwiGLUs clamped by ``limit`` / ``shared_limit`` when
    given (``act="gelu"``: GeGLU experts). x [B, T, D]. ``routing``: the (idx [B*T, k], weights) of a family's own
    router (``route`` otherwise)."""
    B, T, D = x.shape
    xf = x.reshape(B * T, D)
    idx, w = route(xf, p, cfg, li) if routing is None else routing
    # without the kernel, gathering copies one expert's weights per (token, expert) pair; past E/2 pairs that
    # traffic (a copy written and read) exceeds reading every expert once, so XLA's grouped matmuls win
    n_pairs = B * T * cfg.num_experts_per_tok
    few = kernels.use_cpu_kernels() or 2 * n_pairs <= cfg.n_routed_experts
    experts = _experts_by_row if few else _experts_ragged
    out, h = experts(xf, idx, p, li, limit, act)
    y = jnp.einsum("nkd,nk->nd", out, w.astype(out.dtype)).reshape(B, T, D)
    stats: Stats = {}
    if p.shared is not None:
        y_sh, stats = mlp(x, p.shared, mask, collect_stats, prefix="ffn.shared.", li=li, limit=shared_limit)
        y = y + y_sh
    if collect_stats:
        m = mask.reshape(B * T).astype(jnp.float32)
        onehot = jax.nn.one_hot(idx, cfg.n_routed_experts, dtype=jnp.float32) * m[:, None, None]  # [N, k, E]
        x2 = jnp.square(xf.astype(jnp.float32))
        routed_in = {"sum2": jnp.einsum("nke,nd->ed", onehot, x2), "count": onehot.sum((0, 1))}
        h2 = jnp.square(h.astype(jnp.float32))
        stats |= {
            "ffn.router": sum_squares(x, mask),
            "ffn.gate": routed_in,
            "ffn.up": routed_in,
            "ffn.down": {"sum2": jnp.einsum("nke,nkf->ef", onehot, h2), "count": routed_in["count"]},
        }
    return y, stats


def decoder_block(
    x: jax.Array,  # [B, T, D]
    p: Layer,
    positions: jax.Array,
    cfg: ModelConfig,
    mask: jax.Array,
    kv: KV | None,
    lengths: jax.Array | None,
    collect_stats: bool = False,
    li: jax.Array | int | None = None,  # index into stacked leaves of p (None: p is one layer)
) -> tuple[jax.Array, KV | None, Stats]:
    """Pre-norm block: x + attn(norm(x)); then + ffn(norm(.)) with a dense MLP or the MoE. The attention is GQA
    or MLA, as the layer's parameters say."""
    attend = mla_attention if isinstance(p.attn, MlaAttention) else attention
    with jax.named_scope("attention"):
        a, kv, stats = attend(rms_norm(x, at(p.attn_norm, li), cfg.rms_norm_eps), p.attn, positions, cfg, mask,
                                 kv, lengths, collect_stats, li)
    x = x + a
    with jax.named_scope("ffn"):
        hn = rms_norm(x, at(p.ffn_norm, li), cfg.rms_norm_eps)
        if isinstance(p.ffn, Moe):
            f, f_stats = moe(hn, p.ffn, cfg, mask, collect_stats, li)
        else:
            f, f_stats = mlp(hn, p.ffn, mask, collect_stats, li=li)
    return x + f, kv, stats | f_stats
