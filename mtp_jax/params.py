"""Weight pytrees with logical axis names, abstract shapes, random init and parameter counts.

Every leaf is described once by an ``ArrayInfo`` (shape, logical axes, initializer); ``abstract`` builds the
tree of infos (``sharding`` maps their logical axes to mesh axes), ``init`` draws random weights. Only ``init`` and
``shape_dtype`` import jax: the trees and their description load without it (mtp_jax.pytree).
Layers of one kind are stacked on a leading ``layers`` axis and run with ``lax.scan``: the dense lead
layers and the MoE layers are two stacks; the NextN layer has its own (unstacked) params.

Axis letters used in shape comments: V vocab, D hidden, N query heads, K kv heads, H head_dim,
F ffn, E experts, L layers; MLA: Q q_lora_rank, C kv_lora_rank, Hn / R / Hv the nope / rope / value head dims.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from mtp_jax import pytree
from mtp_jax.config import ModelConfig
from mtp_jax.pytree import pytree_dataclass


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str = "normal"  # "normal" (std 0.02), "ones", "zeros", "permutation" (int32 ids 0..n-1 shuffled)


@pytree_dataclass
class Attention:
    wq: Any  # [D, N, H]
    wk: Any  # [D, K, H]
    wv: Any  # [D, K, H]
    wo: Any  # [N, H, D]
    bq: Any = None  # [N, H]   (attention_bias)
    bk: Any = None  # [K, H]
    bv: Any = None  # [K, H]
    q_norm: Any = None  # [H]  (use_qk_norm)
    k_norm: Any = None  # [H]
    wg: Any = None  # [D, N]  head-wise output gate (Step-3.5 g_proj)


@pytree_dataclass
class MlaAttention:
    """Multi-head latent attention (DeepSeek-V2/V3) in the absorbed layout llama.cpp runs (src/models/deepseek2.cpp):
    HF's kv_b_proj is split per head into wk_b (applied to the query) and wv_b (applied to the attention output)."""

    wkv_a: Any  # [D, C + R]     the latent c (C) and the shared rope key (R) of a token
    kv_a_norm: Any  # [C]
    wk_b: Any  # [N, Hn, C]      per head: q_nope -> the latent space
    wv_b: Any  # [N, C, Hv]      per head: attended latent -> value
    wo: Any  # [N, Hv, D]
    wq: Any = None  # [D, N, Hn + R]  without q-LoRA
    wq_a: Any = None  # [D, Q]        q-LoRA
    q_a_norm: Any = None  # [Q]
    wq_b: Any = None  # [Q, N, Hn + R]


@pytree_dataclass
class Mlp:
    gate: Any  # [D, F]
    up: Any  # [D, F]
    down: Any  # [F, D]


@pytree_dataclass
class Moe:
    router: Any  # [D, E]      (HF mlp.gate.weight, GGUF ffn_gate_inp)
    bias: Any  # [E]           (e_score_correction_bias, GGUF exp_probs_b): used for selection only
    gate: Any  # [E, D, F]
    up: Any  # [E, D, F]
    down: Any  # [E, F, D]
    shared: Any = None  # Mlp with F = moe_intermediate_size * n_shared_experts


@pytree_dataclass
class Layer:
    attn_norm: Any  # [D]
    attn: Attention
    ffn_norm: Any  # [D]     (HF post_attention_layernorm)
    ffn: Any  # Mlp (dense lead layers) or Moe


@pytree_dataclass
class NextN:
    """One MTP block: llama.cpp graph_mtp (src/models/glm4-moe.cpp) / HF model.layers.{num_hidden_layers}."""

    enorm: Any  # [D]
    hnorm: Any  # [D]
    eh_proj: Any  # [2D, D]  input = concat(enorm(embed), hnorm(h)), embedding half first
    layer: Layer  # a full MoE decoder block with its own KV cache
    shared_head_norm: Any = None  # [D]     falls back to the trunk's final norm
    shared_head_head: Any = None  # [D, V]  falls back to the trunk's lm_head
    embed_tokens: Any = None  # [V, D]      falls back to the trunk's embedding


@pytree_dataclass
class Params:
    embed: Any  # [V, D]
    dense_layers: Any  # Layer stacked [L_dense, ...] or None
    moe_layers: Any  # Layer stacked [L_moe, ...] or None
    final_norm: Any  # [D]
    lm_head: Any = None  # [D, V]; None when tie_word_embeddings
    nextn: Any = None  # tuple[NextN, ...] (num_nextn_predict_layers of them) or None


# ---- abstract description ----------------------------------------------------------------------------


def gqa_attention(cfg: ModelConfig) -> Attention:
    """GQA attention leaves (with bias and qk-norm when the config has them)."""
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = cfg.attention_bias
    return Attention(
        wq=ArrayInfo((D, N, H), ("embed", "q_heads", "head_dim")),
        wk=ArrayInfo((D, K, H), ("embed", "kv_heads", "head_dim")),
        wv=ArrayInfo((D, K, H), ("embed", "kv_heads", "head_dim")),
        wo=ArrayInfo((N, H, D), ("q_heads", "head_dim", "embed")),
        bq=ArrayInfo((N, H), ("q_heads", "head_dim"), "normal") if bias else None,
        bk=ArrayInfo((K, H), ("kv_heads", "head_dim"), "normal") if bias else None,
        bv=ArrayInfo((K, H), ("kv_heads", "head_dim"), "normal") if bias else None,
        q_norm=ArrayInfo((H,), ("head_dim",), "ones") if cfg.use_qk_norm else None,
        k_norm=ArrayInfo((H,), ("head_dim",), "ones") if cfg.use_qk_norm else None,
    )


def mla_attention(cfg: ModelConfig) -> MlaAttention:
    """MLA leaves (q-LoRA when cfg.q_lora_rank is set); cfg is a DeepSeek-style config (families/deepseek2.py)."""
    D, N, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    Hn, R, Hv, Q = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    lora = Q is not None
    return MlaAttention(
        wkv_a=ArrayInfo((D, C + R), ("embed", None)),
        kv_a_norm=ArrayInfo((C,), ("norm",), "ones"),
        wk_b=ArrayInfo((N, Hn, C), ("q_heads", "head_dim", None)),
        wv_b=ArrayInfo((N, C, Hv), ("q_heads", None, "head_dim")),
        wo=ArrayInfo((N, Hv, D), ("q_heads", "head_dim", "embed")),
        wq=None if lora else ArrayInfo((D, N, Hn + R), ("embed", "q_heads", "head_dim")),
        wq_a=ArrayInfo((D, Q), ("embed", None)) if lora else None,
        q_a_norm=ArrayInfo((Q,), ("norm",), "ones") if lora else None,
        wq_b=ArrayInfo((Q, N, Hn + R), (None, "q_heads", "head_dim")) if lora else None,
    )


def mlp(D: int, F: int) -> Mlp:
    return Mlp(
        gate=ArrayInfo((D, F), ("embed", "mlp")),
        up=ArrayInfo((D, F), ("embed", "mlp")),
        down=ArrayInfo((F, D), ("mlp", "embed")),
    )


def moe(cfg: ModelConfig) -> Moe:
    D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    return Moe(
        router=ArrayInfo((D, E), ("embed", None)),
        bias=ArrayInfo((E,), (None,), "zeros"),
        gate=ArrayInfo((E, D, F), ("experts", "embed", "moe_mlp")),
        up=ArrayInfo((E, D, F), ("experts", "embed", "moe_mlp")),
        down=ArrayInfo((E, F, D), ("experts", "moe_mlp", "embed")),
        shared=mlp(D, F * cfg.n_shared_experts) if cfg.n_shared_experts else None,
    )


def stack(tree: Any, n: int) -> Any:
    return pytree.map_with_path(lambda _, i: ArrayInfo((n, *i.shape), ("layers", *i.axes), i.init), tree)


def decoder(cfg: ModelConfig, attention: Callable[[ModelConfig], Any]) -> Params:
    """Dense lead layers, MoE layers and NextN blocks (GLM-4.5, DeepSeek-V3), with ``attention(cfg)`` leaves."""
    V, D = cfg.vocab_size, cfg.hidden_size

    def layer(moe_ffn: bool) -> Layer:
        return Layer(attn_norm=ArrayInfo((D,), ("norm",), "ones"), attn=attention(cfg),
                     ffn_norm=ArrayInfo((D,), ("norm",), "ones"),
                     ffn=moe(cfg) if moe_ffn else mlp(D, cfg.intermediate_size))

    nextn = None
    if cfg.has_mtp:
        nextn = tuple(
            NextN(
                enorm=ArrayInfo((D,), ("norm",), "ones"),
                hnorm=ArrayInfo((D,), ("norm",), "ones"),
                eh_proj=ArrayInfo((2 * D, D), (None, "embed")),
                layer=layer(True),
                shared_head_norm=ArrayInfo((D,), ("norm",), "ones"),
            )
            for _ in range(cfg.num_nextn_predict_layers)
        )
    return Params(
        embed=ArrayInfo((V, D), ("vocab", "embed")),
        dense_layers=stack(layer(False), cfg.num_dense_layers) if cfg.num_dense_layers else None,
        moe_layers=stack(layer(True), cfg.num_moe_layers) if cfg.num_moe_layers else None,
        final_norm=ArrayInfo((D,), ("norm",), "ones"),
        lm_head=None if cfg.tie_word_embeddings else ArrayInfo((D, V), ("embed", "vocab")),
        nextn=nextn,
    )


def abstract(cfg: ModelConfig) -> Params:
    """The Params tree with an ArrayInfo at every leaf (no allocation), as the config's family lays it out."""
    from mtp_jax import families

    return families.of(cfg).abstract(cfg)


def shape_dtype(cfg: ModelConfig) -> Params:
    """jax.ShapeDtypeStruct leaves: what jax.eval_shape(init, ...) gives, without tracing."""
    import jax
    import jax.numpy as jnp

    pytree.register_with_jax()
    dt = jnp.dtype(cfg.dtype)
    return pytree.map_with_path(lambda _, i: jax.ShapeDtypeStruct(i.shape, dt), abstract(cfg))


def init(key: Any, cfg: ModelConfig, std: float = 0.02) -> Params:
    """Random weights: normal(std) matrices and biases, unit norms, zero router bias (``key``: a jax PRNG key)."""
    import jax
    import jax.numpy as jnp

    pytree.register_with_jax()
    tree = abstract(cfg)
    keys = iter(jax.random.split(key, len(pytree.leaves_with_path(tree))))
    dt = jnp.dtype(cfg.dtype)
    makers: dict[str, Callable] = {
        "normal": lambda k, s: (std * jax.random.normal(k, s, jnp.float32)).astype(dt),
        "ones": lambda k, s: jnp.ones(s, dt),
        "zeros": lambda k, s: jnp.zeros(s, dt),
        "permutation": lambda k, s: jax.random.permutation(k, s[0]).astype(jnp.int32),  # token ids (an ordering)
    }
    return pytree.map_with_path(lambda _, i: makers[i.init](next(keys), i.shape), tree)


# ---- parameter counts --------------------------------------------------------------------------------


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for _, x in pytree.leaves_with_path(tree))


def _moes(tree: Any) -> list[Moe]:
    """The routed-expert blocks anywhere in a tree (a layer's ``ffn``, Gemma 4's ``moe.experts``)."""
    is_moe = lambda x: isinstance(x, Moe)  # noqa: E731
    return [x for _, x in pytree.leaves_with_path(tree, is_moe) if is_moe(x)]


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameter counts from the abstract tree (nothing is allocated).

    Active = what one token reads: embedding row excluded, all dense weights, the router, the shared
    expert and num_experts_per_tok routed experts per MoE layer, and the lm_head.
    """
    p = abstract(cfg)
    trunk = dataclasses.replace(p, nextn=None)
    total = _count(trunk)
    from mtp_jax.io.table import stacks

    moe = _moes([getattr(p, attr) for attr, _, is_moe in stacks(cfg) if is_moe and getattr(p, attr) is not None])
    routed = _count([[m.gate, m.up, m.down] for m in moe])
    inactive_frac = 1 - cfg.num_experts_per_tok / max(cfg.n_routed_experts, 1)
    from mtp_jax import families

    lookups = [getattr(p, s.path[0]) for s in families.of(cfg).top_specs(cfg) if s.table and len(s.path) == 1]
    active = total - _count([t for t in lookups if t is not None]) - round(routed * inactive_frac)  # a row each
    if cfg.tie_word_embeddings:
        active += _count(p.embed)  # the tied head is read in full
    out = {"total": total, "active_per_token": active}
    if p.nextn is not None:
        nn = p.nextn
        nn_total = _count(nn)
        nn_routed = sum(_count([m.gate, m.up, m.down]) for m in _moes(nn))  # a head may have none (Step-3.5)
        out["nextn_total"] = nn_total
        out["nextn_active_per_token"] = nn_total - round(nn_routed * inactive_frac)
    return out


def routed_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of all routed experts (every expert, not the active ones): {"trunk": ..., "nextn": ...}.
    With ``param_counts`` it gives the weights a step over T tokens reads when each token picks its own
    experts (benchmarks/decode.py's verify floor)."""
    p = abstract(cfg)
    routed = lambda t: sum(_count([m.gate, m.up, m.down]) for m in _moes(t))  # noqa: E731
    return {"trunk": routed(dataclasses.replace(p, nextn=None)), "nextn": routed(p.nextn) if p.nextn else 0}
