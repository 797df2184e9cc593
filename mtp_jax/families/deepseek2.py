"""DeepSeek-V3 / R1 (HF ``DeepseekV3ForCausalLM``, model_type ``deepseek_v3``; GGUF arch ``deepseek2`` with
``nextn_predict_layers``): multi-head latent attention (MLA) with q-LoRA over a latent cache, YaRN with mscale,
interleaved-pair RoPE on the rope dims, dense lead layers, sigmoid (or softmax) routed MoE with correction bias,
group-limited top-k, routed scaling and shared experts, one NextN block.

Conventions, checked against the llama.cpp tree of llama-cpp-python 0.3.36 (src/models/deepseek2.cpp,
conversion/deepseek.py, llama-model.cpp, llama-context.cpp) and transformers 5.24 (models/deepseek_v3):

* MLA runs absorbed, as llama.cpp's deepseek2 ``graph`` (is_mla) and ``graph_mtp`` do: HF's ``kv_b_proj`` is cut
  per head into ``attn_k_b`` (transposed) and ``attn_v_b`` (``DeepseekV2Model.modify_tensors``); a token's cache
  entry is the normed latent (kv_lora_rank) and its roped key (qk_rope_head_dim), one entry for all heads
  (``build_attn_inp_k``: no V cache; GGUF head_count_kv 1, key_length C + R, value_length C);
* RoPE: LLAMA_ROPE_TYPE_NORM (adjacent pairs) on the rope dims; HF's ``rope_interleave`` (default True) is the
  same rotation. Q/K are not permuted by the converter;
* YaRN: llama.cpp ignores the beta keys for deepseek2 (ggml's defaults 32 / 1 are used), assumes mscale ==
  mscale_all_dim (llama-context.cpp [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]) and stores 0.1 * mscale_all_dim as
  ``rope.scaling.yarn_log_multiplier``. With mscale == mscale_all_dim > 0 both peers rotate with unit magnitude
  and scale the scores by mscale(factor, mscale_all_dim)^2 / sqrt(qk_nope + qk_rope) (deepseek2.cpp ``kq_scale``;
  HF ``yarn_apply_mscale``); the config accepts exactly the settings where they agree;
* names: gguf-py's ``TENSOR_NAMES``; HF's post_attention_layernorm is ``ffn_norm`` here (deepseek2 has FFN_NORM);
  the MoE and NextN tensors are named as GLM-4.5's (glm4moe.ffn_specs / nextn_specs); the NextN block is
  ``blk.{n_layer}`` (HF ``model.layers.{num_hidden_layers}``) and llama.cpp's graph_mtp needs q-LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from gguf import Keys

from mtp_jax import families
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.families import glm4moe
from mtp_jax.io.gguf_model import Metadata, f32, write_common_metadata
from mtp_jax.io.table import Part, Spec, T
from mtp_jax.io.validate import REQUIRED

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]  # "deepseek2"
GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
BETA_FAST, BETA_SLOW = 32.0, 1.0  # ggml's YaRN defaults: llama.cpp's deepseek2 reads no beta keys


@dataclass(frozen=True, kw_only=True)
class DeepseekV3Config(ModelConfig):
    """ModelConfig plus MLA sizes, YaRN and the scoring function. The GQA-shaped shared fields are derived: one
    latent "KV head" (num_key_value_heads 1, as llama.cpp's converter writes it), head_dim = qk_rope_head_dim and
    partial_rotary_factor 1 (HF DeepseekV3Config's head_dim is the rope dim)."""

    family = ARCH

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: no q-LoRA (a plain wq)
    num_key_value_heads: int = 1
    head_dim: int = 0  # set to qk_rope_head_dim
    partial_rotary_factor: float = 1.0
    rope_scaling: str = "none"  # "none" | "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = BETA_FAST
    rope_beta_slow: float = BETA_SLOW
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2): GGUF expert_gating_func
    name: str = "deepseek2"

    def __post_init__(self):
        object.__setattr__(self, "head_dim", self.qk_rope_head_dim)  # derived, whatever was given
        super().__post_init__()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_scale(self) -> float:
        """Softmax scale of the scores: mscale^2 / sqrt(qk_head_dim) (deepseek2.cpp kq_scale, HF yarn_apply_mscale)."""
        m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) if self.rope_scaling == "yarn" else 1.0
        return m * m / math.sqrt(self.qk_head_dim)

    def rope_freqs(self) -> np.ndarray:
        """[qk_rope_head_dim / 2] rotation frequencies (yarn_freqs)."""
        if self.rope_scaling != "yarn":
            return yarn_freqs(self.qk_rope_head_dim, self.rope_theta)
        return yarn_freqs(self.qk_rope_head_dim, self.rope_theta, self.rope_factor,
                          self.rope_original_max_position_embeddings, self.rope_beta_fast, self.rope_beta_slow)

    def cache_dims(self) -> tuple[tuple[int, int], None]:
        """One latent entry per token (normed latent and roped key), no V cache."""
        return (1, self.kv_lora_rank + self.qk_rope_head_dim), None

    def validate(self) -> None:
        super().validate()
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DeepseekV3Config.{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or None (no q-LoRA), got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        derived = {"num_key_value_heads": 1, "head_dim": self.qk_rope_head_dim, "partial_rotary_factor": 1.0,
                   "attention_bias": False, "use_qk_norm": False}
        for name, want in derived.items():
            if getattr(self, name) != want:
                raise ValueError(f"DeepseekV3Config.{name} is {getattr(self, name)}; MLA needs {want}")
        if self.scoring_func not in GATING:
            raise ValueError(f"scoring_func must be one of {sorted(GATING)}, got {self.scoring_func!r}")
        if self.rope_scaling not in ("none", "yarn"):
            raise ValueError(f"rope_scaling must be 'none' or 'yarn', got {self.rope_scaling!r}")
        if self.rope_scaling == "yarn":
            if not self.rope_factor >= 1.0 or self.rope_original_max_position_embeddings <= 0:
                raise ValueError(f"YaRN needs rope_factor >= 1 and a positive original context, got "
                                 f"{self.rope_factor} and {self.rope_original_max_position_embeddings}")
            if (self.rope_beta_fast, self.rope_beta_slow) != (BETA_FAST, BETA_SLOW):
                raise ValueError(f"YaRN beta_fast / beta_slow {self.rope_beta_fast} / {self.rope_beta_slow}: "
                                 f"llama.cpp's deepseek2 always uses {BETA_FAST} / {BETA_SLOW}")
            if not self.rope_mscale == self.rope_mscale_all_dim > 0:
                raise ValueError(f"YaRN mscale {self.rope_mscale} and mscale_all_dim {self.rope_mscale_all_dim}: "
                                 f"transformers and llama.cpp agree only when they are equal and positive")


# ---- YaRN (host constants) --------------------------------------------------------------------------------


def yarn_freqs(dim: int, theta: float, factor: float = 1.0, orig_ctx: int = 4096, beta_fast: float = BETA_FAST,
               beta_slow: float = BETA_SLOW) -> np.ndarray:
    """Rotation frequency of each of the dim/2 pairs: theta^(-2i/dim), and with YaRN (factor > 1) blended towards
    theta^(-2i/dim) / factor by the ramp between the correction dims. llama.cpp: ggml.c ggml_rope_yarn_corr_dims
    (floor / ceil, clamped to [0, dim-1]) and ggml-cpu/ops.cpp rope_yarn / rope_yarn_ramp with ext_factor 1;
    HF: modeling_rope_utils._compute_yarn_parameters (truncate=True). A constant, computed on the host."""
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factor == 1.0:
        return inv.astype(np.float32)

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), dim - 1)
    extrap = 1 - np.clip((np.arange(dim // 2) - low) / max(high - low, 0.001), 0, 1)  # 1: keep the original
    return (inv / factor * (1 - extrap) + inv * extrap).astype(np.float32)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction 1 + 0.1 * mscale * ln(factor) (1 for factor <= 1): HF yarn_get_mscale."""
    return 1.0 if factor <= 1 else 1.0 + 0.1 * mscale * math.log(factor)


# ---- HF config.json ------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> DeepseekV3Config:
    """From an HF ``config.json`` (model_type deepseek_v3; DeepSeek's own rope_scaling or transformers 5's
    rope_parameters); a missing key takes transformers' DeepseekV3Config default."""
    rope = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope type {kind!r} is not supported (default or yarn)")
    if not hf.get("rope_interleave", True):
        raise ValueError("rope_interleave false is not supported (llama.cpp's deepseek2 rotates adjacent pairs)")
    n_heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads {n_heads}")
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    yarn = kind == "yarn"
    n_routed = hf["n_routed_experts"]
    factor = rope.get("factor")
    orig = rope.get("original_max_position_embeddings", 4096)
    if yarn and factor is None:  # HF's fallback (modeling_rope_utils._compute_yarn_parameters)
        factor = hf.get("max_position_embeddings", 4096) / orig
    return DeepseekV3Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=n_heads, intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_routed_experts=n_routed,
        num_experts_per_tok=hf["num_experts_per_tok"], n_shared_experts=hf.get("n_shared_experts", 1),
        first_k_dense_replace=hf.get("first_k_dense_replace", 3), n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 4096), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos, dtype=dtype,
        q_lora_rank=hf.get("q_lora_rank", 1536), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        rope_scaling="yarn" if yarn else "none", rope_factor=float(factor) if yarn else 1.0,
        rope_original_max_position_embeddings=orig if yarn else 4096,
        rope_beta_fast=float(rope.get("beta_fast") or BETA_FAST) if yarn else BETA_FAST,
        rope_beta_slow=float(rope.get("beta_slow") or BETA_SLOW) if yarn else BETA_SLOW,
        rope_mscale=float(rope.get("mscale", 1.0)) if yarn else 1.0,
        rope_mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)) if yarn else 1.0,
        scoring_func=hf.get("scoring_func", "sigmoid"),
    )


def config_to_hf(cfg: DeepseekV3Config) -> dict[str, Any]:
    """The HF config.json keys (transformers DeepseekV3Config; scoring_func as DeepSeek's own config.json has it,
    which transformers ignores: its router is sigmoid only)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
                "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow, "mscale": cfg.rope_mscale,
                "mscale_all_dim": cfg.rope_mscale_all_dim}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts, "first_k_dense_replace": cfg.first_k_dense_replace,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor, "scoring_func": cfg.scoring_func,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "rope_parameters": rope, "rope_interleave": True,
        "rms_norm_eps": cfg.rms_norm_eps, "attention_bias": False,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if cfg.eos_token_ids else None,
    }


# ---- GGUF metadata -------------------------------------------------------------------------------------------


def config_from_gguf(meta: Metadata, dtype: str = "float32") -> DeepseekV3Config:
    """llama-model.cpp load_hparams + deepseek2.cpp load_arch_hparams (and llama-context.cpp's YaRN setup); every
    key range-checked before use. Only the MLA layout (attn_k_b / attn_v_b, key_length_mla set) is read."""
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    get = meta.get
    common = meta.common(dtype)
    if common["num_key_value_heads"] != 1:
        raise meta.error(f"key {A.HEAD_COUNT_KV.format(arch=ARCH)} = {common['num_key_value_heads']}; MLA "
                         f"(attn_k_b / attn_v_b) needs 1")
    kv_lora = get(A.KV_LORA_RANK, REQUIRED, 1)
    n_rot = get(R.DIMENSION_COUNT, REQUIRED, 2)
    k_mla = get(A.KEY_LENGTH_MLA, REQUIRED, n_rot + 1)  # is_mla(); nope >= 1 (load_arch_tensors asserts it)
    v_mla = get(A.VALUE_LENGTH_MLA, REQUIRED, 1)
    if get(A.KEY_LENGTH, kv_lora + n_rot) != kv_lora + n_rot or get(A.VALUE_LENGTH, kv_lora) != kv_lora:
        raise meta.error(f"key_length / value_length must be kv_lora_rank + rope dims ({kv_lora + n_rot}) / "
                         f"kv_lora_rank ({kv_lora}) for MLA")
    q_lora = get(A.Q_LORA_RANK, 0) or None
    if get(A.TEMPERATURE_SCALE, 0.0, -math.inf, math.inf) != 0.0:
        raise meta.error("attention temperature scaling (mistral-large) is not supported")
    gating = get(L.EXPERT_GATING_FUNC, 0)
    if gating == 0:  # none: deepseek2.cpp load_arch_hparams' fallback for DeepSeek V2 / V2.5 files
        lite_glm = common["num_hidden_layers"] in (47, 48) and common["vocab_size"] == 154880
        gating = int(gguf.ExpertGatingFuncType.SIGMOID if lite_glm else gguf.ExpertGatingFuncType.SOFTMAX)
    scoring = {int(v): k for k, v in GATING.items()}.get(gating)
    if scoring is None:
        raise meta.error(f"expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    scaling = get(R.SCALING_TYPE, "linear")  # llama-model.cpp's default
    factor = f32(get(R.SCALING_FACTOR, 0.0, 0.0, math.inf) or 1.0)
    if get(R.SCALING_ATTN_FACTOR, 1.0, -math.inf, math.inf) != 1.0:
        raise meta.error("rope.scaling.attn_factor != 1 is not supported")
    yarn: dict[str, Any] = {}
    if scaling == "yarn":
        log_mul = get(R.SCALING_YARN_LOG_MUL, 0.0, 0.0, math.inf)
        if log_mul == 0.0:
            raise meta.error("YaRN without rope.scaling.yarn_log_multiplier: transformers and llama.cpp scale the "
                             "attention differently; not supported")
        mscale = _mscale_all_dim(log_mul)
        for key, want in ((R.SCALING_YARN_BETA_FAST, BETA_FAST), (R.SCALING_YARN_BETA_SLOW, BETA_SLOW)):
            if get(key, want, -math.inf, math.inf) != want:
                raise meta.error(f"key {key.format(arch=ARCH)} = {get(key)}: llama.cpp's deepseek2 ignores it and "
                                 f"uses {want}")
        yarn = dict(rope_scaling="yarn", rope_factor=factor, rope_mscale=mscale, rope_mscale_all_dim=mscale,
                    rope_original_max_position_embeddings=get(R.SCALING_ORIG_CTX_LEN,
                                                              common["max_position_embeddings"], 1))
    elif scaling not in ("none", "linear") or (scaling == "linear" and factor != 1.0):
        raise meta.error(f"rope scaling {scaling!r} (factor {factor}) is not supported (none or yarn)")
    return meta.build(
        DeepseekV3Config, **common, q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=k_mla - n_rot,
        qk_rope_head_dim=n_rot, v_head_dim=v_mla, scoring_func=scoring, **yarn,
    )


def _mscale_all_dim(log_mul: float) -> float:
    """mscale_all_dim from rope.scaling.yarn_log_multiplier = float32(0.1 * mscale_all_dim): llama.cpp divides by
    0.1f ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]); of that quotient and its float32 neighbours (all within an ulp of it),
    the shortest decimal that writes back to the same key, so a written config reads back equal."""
    x = np.float32(log_mul / 0.1)
    near = [f32(v) for v in (np.nextafter(x, np.float32(-np.inf)), x, np.nextafter(x, np.float32(np.inf)))]
    fits = [v for v in near if np.float32(0.1 * v) == np.float32(log_mul)]
    return min(fits, key=lambda v: len(repr(v))) if fits else f32(x)


def write_gguf_metadata(w: gguf.GGUFWriter, cfg: DeepseekV3Config, ftype: gguf.LlamaFileType) -> None:
    """The keys llama.cpp reads for deepseek2, in the order DeepseekV2Model.set_gguf_parameters writes them
    (TextModel's rope scaling and gating keys included). A model without q-LoRA gets q_lora_rank 0, which
    llama.cpp reads as "no q-LoRA" whatever the layer count (the converter writes no key and llama.cpp then
    requires a "lite" layer count)."""
    write_common_metadata(w, cfg)
    if cfg.rope_scaling == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)
    w.add_expert_gating_func(GATING[cfg.scoring_func])
    w.add_file_type(ftype)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_scaling == "yarn":
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_mscale_all_dim)
    w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- the tensor table ----------------------------------------------------------------------------------------


def layer_specs(cfg: DeepseekV3Config, moe: bool) -> list[Spec]:
    """One decoder block (deepseek2.cpp load_arch_tensors, MLA layout; HF DeepseekV3DecoderLayer)."""
    N, Hn, Hv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kv_b = "self_attn.kv_b_proj.weight"  # [N * (Hn + Hv), C]: per head Hn key rows, then Hv value rows
    s = [Spec(T.ATTN_NORM, ("attn_norm",), hf="input_layernorm.weight")]
    if cfg.q_lora_rank is not None:
        s += [Spec(T.ATTN_Q_A, ("attn", "wq_a"), 1, hf="self_attn.q_a_proj.weight"),
              Spec(T.ATTN_Q_A_NORM, ("attn", "q_a_norm"), hf="self_attn.q_a_layernorm.weight"),
              Spec(T.ATTN_Q_B, ("attn", "wq_b"), 1, hf="self_attn.q_b_proj.weight")]
    else:
        s += [Spec(T.ATTN_Q, ("attn", "wq"), 1, hf="self_attn.q_proj.weight")]
    s += [Spec(T.ATTN_KV_A_MQA, ("attn", "wkv_a"), 1, hf="self_attn.kv_a_proj_with_mqa.weight"),
          Spec(T.ATTN_KV_A_NORM, ("attn", "kv_a_norm"), hf="self_attn.kv_a_layernorm.weight"),
          Spec(T.ATTN_K_B, ("attn", "wk_b"), 1, 1, hf=kv_b, hf_part=Part(N, Hn + Hv, 0, Hn, transpose=True)),
          Spec(T.ATTN_V_B, ("attn", "wv_b"), 1, 1, hf=kv_b, hf_part=Part(N, Hn + Hv, Hn, Hn + Hv)),
          Spec(T.ATTN_OUT, ("attn", "wo"), 2, hf="self_attn.o_proj.weight"),
          Spec(T.FFN_NORM, ("ffn_norm",), hf="post_attention_layernorm.weight")]
    return s + glm4moe.ffn_specs(cfg, moe)


def abstract(cfg: DeepseekV3Config) -> P.Params:
    return P.decoder(cfg, P.mla_attention)


FAMILY = families.register(families.Family(
    arch=ARCH, hf_model_types=("deepseek_v3",), hf_architecture="DeepseekV3ForCausalLM", config=DeepseekV3Config,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, config_from_gguf=config_from_gguf,
    write_gguf_metadata=write_gguf_metadata, top_specs=glm4moe.top_specs, layer_specs=layer_specs,
    nextn_specs=glm4moe.nextn_specs, abstract=abstract, forward=families.Lazy("mtp_jax.model", "decoder_forward"),
    head_forward=families.Lazy("mtp_jax.mtp", "nextn_forward"),
    drafter=families.Lazy("mtp_jax.drafter", "RecursiveHead"), tiny="deepseek2-tiny",
))
