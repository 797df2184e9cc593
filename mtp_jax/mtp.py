"""The NextN (MTP) head forward, with llama.cpp's semantics.

Reference: llama.cpp (tree in llama-cpp-python 0.3.36) src/models/glm4-moe.cpp ``graph_mtp`` and
common/speculative.cpp ``common_speculative_impl_draft_mtp``:

* input = eh_proj(concat(enorm(embed(t)), hnorm(h))), embedding half first (``ggml_concat(e_norm, h_norm)``);
  ``embed`` is ``nextn.embed_tokens`` when present, else the trunk's ``token_embd``;
* then one full MoE decoder block with its own KV cache, RoPE at the token's position;
* then ``shared_head_norm`` (else the trunk's ``output_norm``) -> ``h_nextn``, and ``shared_head_head``
  (else the trunk's ``output``) -> draft logits.
* Pairing (``process()``): the MTP entry at position j is (h_{j-1}, t_j), where h is the trunk's final-normed
  hidden; position 0 pairs with a zero h (``pending_h`` starts as zeros). Drafting (``draft()``): entry
  (h_{L-1}, t_L) at position L gives d_1; each next draft feeds (h_nextn of the previous step, d_i) at the
  next position, reusing the one head (GLM, Qwen3.5; Step-3.5 chains one head per step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import Stats, decoder_block, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype, linear
from mtp_jax.model import output_weight, select_logits, valid_mask
from mtp_jax.params import Params


def shift_hidden(h: jax.Array, h_before: jax.Array | None = None) -> jax.Array:
    """Pair each token with the trunk hidden one position earlier: h [B, T, D] -> [B, T, D] where out[:, 0] is
    ``h_before`` [B, D] (zeros at the start of a sequence, as llama.cpp's pending_h)."""
    first = jnp.zeros_like(h[:, :1]) if h_before is None else h_before[:, None].astype(h.dtype)
    return jnp.concatenate([first, h[:, :-1]], axis=1)


def nextn_forward(
    params: Params,
    h: jax.Array,  # [B, T, D] hidden paired with each token (see shift_hidden / drafting)
    tokens: jax.Array,  # [B, T]
    cache: KVCache | None,  # the NextN cache (kvcache.init_nextn_cache)
    cfg: ModelConfig,
    head: int = 0,  # which NextN block (Step-3.5 chains several; GLM has one)
    n_valid: jax.Array | None = None,
    logits: str = "all",
    collect_stats: bool = False,
    block=None,  # the family's decoder block, decoder_block's signature with the layer unstacked (li None)
    chain_prenorm: bool = False,  # hand the next step the block's output before shared_head_norm (Step-3.5)
) -> tuple[jax.Array, jax.Array | None, KVCache | None, Stats]:
    """-> (h_nextn [B, T, D] hidden fed to the next draft step: normed (GLM, DeepSeek) or the pre-norm block
    output with ``chain_prenorm``; logits; cache; stats)."""
    if params.nextn is None:
        raise ValueError("the model has no NextN layer")
    nn = params.nextn[head]
    B, T = tokens.shape
    n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    mask = valid_mask(T, n_valid)
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = lengths[:, None] + jnp.arange(T)[None, :]
    embed = params.embed if nn.embed_tokens is None else nn.embed_tokens
    e = rms_norm(embed[tokens].astype(compute_dtype(cfg.dtype)), nn.enorm, cfg.rms_norm_eps)
    hn = rms_norm(h.astype(e.dtype), nn.hnorm, cfg.rms_norm_eps)
    eh = jnp.concatenate([e, hn], axis=-1)  # [B, T, 2D]
    x = linear(eh, nn.eh_proj)
    kv = None if cache is None else (cache.k[0], cache.v[0], head)
    x, kv, stats = (block or decoder_block)(x, nn.layer, positions, cfg, mask, kv, lengths, collect_stats)
    norm_w = params.final_norm if nn.shared_head_norm is None else nn.shared_head_norm
    out_h = rms_norm(x, norm_w, cfg.rms_norm_eps)
    w_head = output_weight(params) if nn.shared_head_head is None else (nn.shared_head_head, False)
    out = select_logits(w_head, out_h, n_valid, logits)
    if collect_stats:
        stats = stats | {"eh_proj": sum_squares(eh, mask), "shared_head_head": sum_squares(out_h, mask)}
    new_cache = None
    if cache is not None:
        new_cache = KVCache((kv[0],), (kv[1],), lengths + n_valid)
    return (x if chain_prenorm else out_h), out, new_cache, stats
