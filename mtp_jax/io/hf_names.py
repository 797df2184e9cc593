"""The one HF <-> mtp_jax name and layout mapping (transformers ``Glm4MoeForCausalLM`` / GLM-4.5 checkpoints).

HF stores ``nn.Linear`` weights as [out, in]; we store [in, out] with heads split ([D, N, H] etc.).
Routed experts come in two layouts: real GLM-4.5 checkpoints keep one tensor per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``), transformers 5 fuses them (``mlp.experts.gate_up_proj``
[E, 2F, D] with gate first, ``mlp.experts.down_proj`` [E, D, F]). Both are read; ``to_hf`` writes either.
The MTP block is ``model.layers.{num_hidden_layers + i}`` with ``eh_proj``, ``enorm``, ``hnorm``,
``shared_head.norm``, ``shared_head.head``, ``embed_tokens`` beside an ordinary MoE decoder layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mtp_jax.config import ModelConfig
from mtp_jax.params import Layer, Moe, Params

Array = np.ndarray
# (hf suffix, attribute path in a Layer, ours -> hf, hf -> ours)
Entry = tuple[str, tuple[str, ...], Callable[[Array], Array], Callable[[Array], Array]]


def _t(w: Array) -> Array:
    return np.ascontiguousarray(w.T)


def _attention_entries(cfg: ModelConfig) -> list[Entry]:
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e: list[Entry] = [
        ("self_attn.q_proj.weight", ("attn", "wq"), lambda w: _t(w.reshape(D, N * H)), lambda t: t.T.reshape(D, N, H)),
        ("self_attn.k_proj.weight", ("attn", "wk"), lambda w: _t(w.reshape(D, K * H)), lambda t: t.T.reshape(D, K, H)),
        ("self_attn.v_proj.weight", ("attn", "wv"), lambda w: _t(w.reshape(D, K * H)), lambda t: t.T.reshape(D, K, H)),
        ("self_attn.o_proj.weight", ("attn", "wo"), lambda w: _t(w.reshape(N * H, D)), lambda t: t.T.reshape(N, H, D)),
    ]
    if cfg.attention_bias:
        e += [
            ("self_attn.q_proj.bias", ("attn", "bq"), lambda b: b.reshape(-1), lambda t: t.reshape(N, H)),
            ("self_attn.k_proj.bias", ("attn", "bk"), lambda b: b.reshape(-1), lambda t: t.reshape(K, H)),
            ("self_attn.v_proj.bias", ("attn", "bv"), lambda b: b.reshape(-1), lambda t: t.reshape(K, H)),
        ]
    if cfg.use_qk_norm:
        e += [("self_attn.q_norm.weight", ("attn", "q_norm"), np.asarray, np.asarray),
              ("self_attn.k_norm.weight", ("attn", "k_norm"), np.asarray, np.asarray)]
    return e


def _mlp_entries(prefix: str, path: tuple[str, ...]) -> list[Entry]:
    return [(f"{prefix}.{n}_proj.weight", (*path, n), _t, _t) for n in ("gate", "up", "down")]


def layer_entries(cfg: ModelConfig, moe: bool) -> list[Entry]:
    """Every tensor of one decoder layer except the routed experts (see expert_entries)."""
    e = [("input_layernorm.weight", ("attn_norm",), np.asarray, np.asarray),
         ("post_attention_layernorm.weight", ("ffn_norm",), np.asarray, np.asarray)]
    e += _attention_entries(cfg)
    if moe:
        e += [("mlp.gate.weight", ("ffn", "router"), _t, _t),
              ("mlp.gate.e_score_correction_bias", ("ffn", "bias"), np.asarray, np.asarray)]
        if cfg.n_shared_experts:
            e += _mlp_entries("mlp.shared_experts", ("ffn", "shared"))
    else:
        e += _mlp_entries("mlp", ("ffn",))
    return e


NEXTN_ENTRIES: list[Entry] = [
    ("eh_proj.weight", ("eh_proj",), _t, _t),
    ("enorm.weight", ("enorm",), np.asarray, np.asarray),
    ("hnorm.weight", ("hnorm",), np.asarray, np.asarray),
    ("shared_head.norm.weight", ("shared_head_norm",), np.asarray, np.asarray),
    ("shared_head.head.weight", ("shared_head_head",), _t, _t),
    ("embed_tokens.weight", ("embed_tokens",), np.asarray, np.asarray),
]


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _set(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _set(getattr(obj, path[0]), path[1:], value)})


def _np(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), tree)


def _layer_to_hf(layer: Layer, prefix: str, cfg: ModelConfig, fused_experts: bool) -> dict[str, Array]:
    moe = isinstance(layer.ffn, Moe)
    out = {f"{prefix}.{name}": to_hf(_get(layer, path)) for name, path, to_hf, _ in layer_entries(cfg, moe)}
    if moe:
        g, u, d = layer.ffn.gate, layer.ffn.up, layer.ffn.down  # [E, D, F], [E, D, F], [E, F, D]
        if fused_experts:
            out[f"{prefix}.mlp.experts.gate_up_proj"] = np.ascontiguousarray(
                np.concatenate([g, u], axis=2).transpose(0, 2, 1))  # [E, 2F, D]
            out[f"{prefix}.mlp.experts.down_proj"] = np.ascontiguousarray(d.transpose(0, 2, 1))  # [E, D, F]
        else:
            for e in range(g.shape[0]):
                out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = _t(g[e])
                out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = _t(u[e])
                out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = _t(d[e])
    return out


def to_hf(params: Params, cfg: ModelConfig, fused_experts: bool = True, with_mtp: bool = True) -> dict[str, Array]:
    """Our params -> HF state dict (float32 numpy). ``fused_experts``: the transformers 5 layout."""
    p = _np(params)
    sd = {"model.embed_tokens.weight": p.embed, "model.norm.weight": p.final_norm}
    if p.lm_head is not None:
        sd["lm_head.weight"] = _t(p.lm_head)
    i = 0
    for stack in (p.dense_layers, p.moe_layers):
        if stack is None:
            continue
        for j in range(jax.tree.leaves(stack)[0].shape[0]):
            sd |= _layer_to_hf(jax.tree.map(lambda x: x[j], stack), f"model.layers.{i}", cfg, fused_experts)
            i += 1
    if with_mtp and p.nextn is not None:
        for n, nn in enumerate(p.nextn):
            prefix = f"model.layers.{cfg.num_hidden_layers + n}"
            sd |= _layer_to_hf(nn.layer, prefix, cfg, fused_experts)
            for name, path, to_hf_fn, _ in NEXTN_ENTRIES:
                if _get(nn, path) is not None:
                    sd[f"{prefix}.{name}"] = to_hf_fn(_get(nn, path))
    return sd


def _experts_from_hf(sd: Mapping[str, Array], prefix: str, cfg: ModelConfig) -> tuple[Array, Array, Array]:
    F = cfg.moe_intermediate_size
    fused = f"{prefix}.mlp.experts.gate_up_proj"
    if fused in sd:
        gu = np.asarray(sd[fused]).transpose(0, 2, 1)  # [E, D, 2F]
        return gu[..., :F], gu[..., F:], np.asarray(sd[f"{prefix}.mlp.experts.down_proj"]).transpose(0, 2, 1)
    per = [[_t(np.asarray(sd[f"{prefix}.mlp.experts.{e}.{n}_proj.weight"])) for e in range(cfg.n_routed_experts)]
           for n in ("gate", "up", "down")]
    return tuple(np.stack(x) for x in per)


def _layer_from_hf(sd: Mapping[str, Array], template: Layer, prefix: str, cfg: ModelConfig) -> Layer:
    moe = isinstance(template.ffn, Moe)
    layer = template
    for name, path, _, from_hf in layer_entries(cfg, moe):
        key = f"{prefix}.{name}"
        if key not in sd:
            raise KeyError(f"missing tensor {key}")
        layer = _set(layer, path, from_hf(np.asarray(sd[key], dtype=np.float32)))
    if moe:
        g, u, d = _experts_from_hf(sd, prefix, cfg)
        layer = _set(_set(_set(layer, ("ffn", "gate"), g), ("ffn", "up"), u), ("ffn", "down"), d)
    return layer


def from_hf(sd: Mapping[str, Array], cfg: ModelConfig, template: Params, load_mtp: bool = True) -> Params:
    """HF state dict (either expert layout) -> Params shaped like ``template`` (e.g. params.abstract leaves).

    Raises KeyError naming the first missing tensor; the MTP layer is required when cfg has one and load_mtp.
    """
    def stack(layers: list[Layer]):
        return jax.tree.map(lambda *xs: np.stack(xs), *layers) if layers else None

    dense_t = None if template.dense_layers is None else jax.tree.map(lambda x: x[0], template.dense_layers)
    moe_t = None if template.moe_layers is None else jax.tree.map(lambda x: x[0], template.moe_layers)
    nd = cfg.num_dense_layers
    dense = [_layer_from_hf(sd, dense_t, f"model.layers.{i}", cfg) for i in range(nd)]
    moes = [_layer_from_hf(sd, moe_t, f"model.layers.{i}", cfg) for i in range(nd, cfg.num_hidden_layers)]
    lm = None if cfg.tie_word_embeddings else _t(np.asarray(sd["lm_head.weight"], np.float32))
    nextn = None
    if load_mtp and cfg.has_mtp:
        nextn = []
        for n, nt in enumerate(template.nextn):
            prefix = f"model.layers.{cfg.num_hidden_layers + n}"
            nn = dataclasses.replace(nt, layer=_layer_from_hf(sd, nt.layer, prefix, cfg),
                                     shared_head_norm=None, shared_head_head=None, embed_tokens=None)
            for name, path, _, from_hf_fn in NEXTN_ENTRIES:
                key = f"{prefix}.{name}"
                if key in sd:
                    nn = _set(nn, path, from_hf_fn(np.asarray(sd[key], np.float32)))
                elif path[0] in ("eh_proj", "enorm", "hnorm"):
                    raise KeyError(f"missing MTP tensor {key}")
            nextn.append(nn)
        nextn = tuple(nextn)
    return Params(
        embed=np.asarray(sd["model.embed_tokens.weight"], np.float32),
        dense_layers=stack(dense), moe_layers=stack(moes),
        final_norm=np.asarray(sd["model.norm.weight"], np.float32),
        lm_head=lm, nextn=nextn,
    )

