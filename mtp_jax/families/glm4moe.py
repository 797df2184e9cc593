"""GLM-4.5 / GLM-4.5-Air (HF ``Glm4MoeForCausalLM``, GGUF arch ``glm4moe``): GQA with partial NeoX RoPE, optional
attention bias and qk-norm, dense lead layers, sigmoid-routed MoE with a shared expert, one NextN block.

GGUF conventions, checked against the llama.cpp tree of llama-cpp-python 0.3.36:

* names: gguf-py's ``TENSOR_NAMES`` for ``MODEL_ARCH.GLM4_MOE`` (src/llama-arch.cpp). HF's
  ``post_attention_layernorm`` is ``blk.N.post_attention_norm`` (ATTN_POST_NORM: GLM4_MOE has no FFN_NORM),
  ``e_score_correction_bias`` is ``blk.N.exp_probs_b.bias``;
* layout: routed experts are stacked [E, out, in] (conversion/glm.py ``Glm4MoeModel.modify_tensors``), and
  Q/K are not permuted for this arch (NeoX RoPE; the comment above modify_tensors says so);
* the NextN block is ``blk.{n_layer}``: an ordinary MoE block plus ``nextn.{eh_proj, enorm, hnorm,
  shared_head_norm, shared_head_head, embed_tokens}`` (the last three optional; src/models/glm4-moe.cpp
  ``load_arch_tensors``); ``block_count`` counts it and ``nextn_predict_layers`` says how many there are.

HF: real GLM-4.5 checkpoints keep one tensor per routed expert, transformers 5 fuses them (io/hf.py reads
both); the MTP block is ``model.layers.{num_hidden_layers + i}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
from gguf import Keys

from mtp_jax import families
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io.gguf_model import Metadata, rotary_factor, write_common_metadata
from mtp_jax.io.table import Spec, T
from mtp_jax.io.validate import REQUIRED

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM4_MOE]  # "glm4moe"


@dataclass(frozen=True, kw_only=True)
class Glm4MoeConfig(ModelConfig):
    family = ARCH


# ---- HF config.json ------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> Glm4MoeConfig:
    """From the keys of an HF GLM-4.5 ``config.json`` (model_type glm4_moe)."""
    rope = hf.get("rope_parameters") or {}
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    n_heads = hf["num_attention_heads"]
    return Glm4MoeConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        n_routed_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_shared_experts=hf.get("n_shared_experts", 1),
        first_k_dense_replace=hf.get("first_k_dense_replace", 1),
        n_group=hf.get("n_group", 1),
        topk_group=hf.get("topk_group", 1),
        norm_topk_prob=hf.get("norm_topk_prob", True),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        attention_bias=hf.get("attention_bias", False),
        use_qk_norm=hf.get("use_qk_norm", False),
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        dtype=dtype,
    )


def config_to_hf(cfg: Glm4MoeConfig) -> dict[str, Any]:
    """The HF config.json keys (transformers Glm4MoeConfig)."""
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts, "first_k_dense_replace": cfg.first_k_dense_replace,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "rms_norm_eps": cfg.rms_norm_eps, "attention_bias": cfg.attention_bias,
        "use_qk_norm": cfg.use_qk_norm, "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if cfg.eos_token_ids else None,
    }


# ---- GGUF metadata -------------------------------------------------------------------------------------------


def config_from_gguf(meta: Metadata, dtype: str = "float32") -> Glm4MoeConfig:
    """llama-model.cpp load_hparams + glm4-moe.cpp load_arch_hparams; every key range-checked before use."""
    L, A = Keys.LLM, Keys.Attention
    get = meta.get
    gating = get(L.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SIGMOID))
    if gating != gguf.ExpertGatingFuncType.SIGMOID:
        raise meta.error(f"expert_gating_func {gating} is not supported (GLM-4.5 uses sigmoid = 2)")
    scaling = get(Keys.Rope.SCALING_TYPE, "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and get(Keys.Rope.SCALING_FACTOR, 1.0) != 1.0):
        raise meta.error(f"rope scaling {scaling!r} is not supported")
    common = meta.common(dtype)
    D, n_head = common["hidden_size"], get(A.HEAD_COUNT, REQUIRED, 1)
    head_dim = get(A.KEY_LENGTH, D // n_head, 1)
    if get(A.VALUE_LENGTH, head_dim) != head_dim:
        raise meta.error("key_length and value_length differ; glm4moe needs them equal")
    return meta.build(
        Glm4MoeConfig, **common, head_dim=head_dim,
        partial_rotary_factor=rotary_factor(get(Keys.Rope.DIMENSION_COUNT, head_dim, 2, head_dim), head_dim),
        attention_bias="blk.0.attn_q.bias" in meta.tensors, use_qk_norm="blk.0.attn_q_norm.weight" in meta.tensors,
    )


def write_gguf_metadata(w: gguf.GGUFWriter, cfg: Glm4MoeConfig, ftype: gguf.LlamaFileType) -> None:
    """The keys llama.cpp reads for glm4moe, in the order Glm4MoeModel.set_gguf_parameters writes them."""
    write_common_metadata(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- the tensor table ----------------------------------------------------------------------------------------


def top_specs(cfg: ModelConfig) -> list[Spec]:
    """Outside the blocks (the embedding first; see table.plan)."""
    return [Spec(T.TOKEN_EMBD, ("embed",), table=True, hf="model.embed_tokens.weight"),
            Spec(T.OUTPUT_NORM, ("final_norm",), hf="model.norm.weight"),
            Spec(T.OUTPUT, ("lm_head",), 1, hf="lm_head.weight")]


def ffn_specs(cfg: ModelConfig, moe: bool) -> list[Spec]:
    """A dense SwiGLU MLP, or the routed experts (stacked [E, out, in]), router, bias and shared expert."""
    if not moe:
        return [Spec(T.FFN_GATE, ("ffn", "gate"), 1, hf="mlp.gate_proj.weight"),
                Spec(T.FFN_UP, ("ffn", "up"), 1, hf="mlp.up_proj.weight"),
                Spec(T.FFN_DOWN, ("ffn", "down"), 1, hf="mlp.down_proj.weight")]
    s = [Spec(T.FFN_GATE_INP, ("ffn", "router"), 1, hf="mlp.gate.weight"),
         Spec(T.FFN_EXP_PROBS_B, ("ffn", "bias"), suffix="bias", hf="mlp.gate.e_score_correction_bias"),
         Spec(T.FFN_GATE_EXP, ("ffn", "gate"), 1, 1, hf="mlp.experts.{e}.gate_proj.weight"),
         Spec(T.FFN_UP_EXP, ("ffn", "up"), 1, 1, hf="mlp.experts.{e}.up_proj.weight"),
         Spec(T.FFN_DOWN_EXP, ("ffn", "down"), 1, 1, hf="mlp.experts.{e}.down_proj.weight")]
    if cfg.n_shared_experts:
        s += [Spec(T.FFN_GATE_SHEXP, ("ffn", "shared", "gate"), 1, hf="mlp.shared_experts.gate_proj.weight"),
              Spec(T.FFN_UP_SHEXP, ("ffn", "shared", "up"), 1, hf="mlp.shared_experts.up_proj.weight"),
              Spec(T.FFN_DOWN_SHEXP, ("ffn", "shared", "down"), 1, hf="mlp.shared_experts.down_proj.weight")]
    return s


def layer_specs(cfg: ModelConfig, moe: bool) -> list[Spec]:
    """The tensors of one decoder block (in HF's order of a layer's tensors)."""
    s = [Spec(T.ATTN_NORM, ("attn_norm",), hf="input_layernorm.weight"),
         Spec(T.ATTN_POST_NORM, ("ffn_norm",), hf="post_attention_layernorm.weight"),
         Spec(T.ATTN_Q, ("attn", "wq"), 1, hf="self_attn.q_proj.weight"),
         Spec(T.ATTN_K, ("attn", "wk"), 1, hf="self_attn.k_proj.weight"),
         Spec(T.ATTN_V, ("attn", "wv"), 1, hf="self_attn.v_proj.weight"),
         Spec(T.ATTN_OUT, ("attn", "wo"), 2, hf="self_attn.o_proj.weight")]
    if cfg.attention_bias:
        s += [Spec(T.ATTN_Q, ("attn", "bq"), suffix="bias", hf="self_attn.q_proj.bias"),
              Spec(T.ATTN_K, ("attn", "bk"), suffix="bias", hf="self_attn.k_proj.bias"),
              Spec(T.ATTN_V, ("attn", "bv"), suffix="bias", hf="self_attn.v_proj.bias")]
    if cfg.use_qk_norm:
        s += [Spec(T.ATTN_Q_NORM, ("attn", "q_norm"), hf="self_attn.q_norm.weight"),
              Spec(T.ATTN_K_NORM, ("attn", "k_norm"), hf="self_attn.k_norm.weight")]
    return s + ffn_specs(cfg, moe)


def nextn_specs(cfg: ModelConfig) -> list[Spec]:
    """A NextN block's own tensors (llama.cpp glm4-moe.cpp load_arch_tensors; HF model.layers.{N}.*).
    shared_head_norm, shared_head_head and embed_tokens are optional (the trunk's are used without them)."""
    return [Spec(T.NEXTN_EH_PROJ, ("eh_proj",), 1, hf="eh_proj.weight"),
            Spec(T.NEXTN_ENORM, ("enorm",), hf="enorm.weight"),
            Spec(T.NEXTN_HNORM, ("hnorm",), hf="hnorm.weight"),
            Spec(T.NEXTN_SHARED_HEAD_NORM, ("shared_head_norm",), hf="shared_head.norm.weight"),
            Spec(T.NEXTN_SHARED_HEAD_HEAD, ("shared_head_head",), 1, hf="shared_head.head.weight"),
            Spec(T.NEXTN_EMBED_TOKENS, ("embed_tokens",), table=True, hf="embed_tokens.weight")]


def abstract(cfg: ModelConfig) -> P.Params:
    return P.decoder(cfg, P.gqa_attention)


FAMILY = families.register(families.Family(
    arch=ARCH, hf_model_types=("glm4_moe",), hf_architecture="Glm4MoeForCausalLM", config=Glm4MoeConfig,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, config_from_gguf=config_from_gguf,
    write_gguf_metadata=write_gguf_metadata, top_specs=top_specs, layer_specs=layer_specs, nextn_specs=nextn_specs,
    abstract=abstract, forward=families.Lazy("mtp_jax.model", "decoder_forward"),
    head_forward=families.Lazy("mtp_jax.mtp", "nextn_forward"),
    drafter=families.Lazy("mtp_jax.drafter", "RecursiveHead"), tiny="glm4moe-tiny",
))
