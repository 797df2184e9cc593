"""Step-3.5-Flash (HF model_type ``step3p5``, transformers' ``Step3p7TextModel``; GGUF arch ``step35``): per-layer
full or sliding-window attention with more query heads on the sliding layers, partial RoPE on full layers with its
own base, per-head q/k RMS norms, a head-wise sigmoid gate on the attention output, dense or MoE FFNs with
per-layer SwiGLU clamps, sigmoid routing with a selection bias and a shared expert, and three chained MTP heads.

Checked against the llama.cpp tree of llama-cpp-python 0.3.36 and transformers 5.24:

* graph: src/models/step35.cpp ``graph`` (trunk) and ``graph_mtp`` (head k = blk.{n_layer + k}); clamps in
  llama-graph.cpp ``build_ffn`` / ``build_moe_ffn`` (min(silu(g), L) * clamp(u, -L, L), 0 = off: layers.swiglu);
  sliding window LLAMA_SWA_TYPE_STANDARD (query p sees keys p - W < j <= p);
* RoPE: NeoX; a full layer rotates ``rope.dimension_count / 2`` dims (default head_dim / 2: load_arch_hparams halves
  n_rot_full) with ``rope.freq_base``, a sliding layer ``rope.dimension_count_swa`` (default the unhalved count) with
  ``rope.freq_base_swa`` (default 10000);
* norms: HF stores w and computes x * (1 + w); llama.cpp's converter (conversion/step3.py) writes w + 1 for every
  ``*norm.weight``. Our leaves hold the GGUF value (``Spec.hf_offset``);
* the hidden the heads take (``forward``'s first result) is the trunk's residual stream *before* the final norm,
  and head k passes its own pre-norm output to head k + 1 (step35.cpp: ``t_h_nextn``). transformers' MtpModel
  hands over the post-norm ones instead: ``mtp_hidden: postnorm`` selects that (not a GGUF key: llama.cpp has
  only the first); the default is llama.cpp's, which the peer tests check (drafter.ChainedHeads);
* files: head counts, sliding pattern and clamps are per-layer arrays over block_count (MTP blocks included);
  a layer is MoE when it has ``ffn_gate_inp`` (step35.cpp), HF says so with ``mlp_layer_types``.

Not supported (a clear error): llama3 rope scaling (``rope_freqs``), per-layer KV head counts, a
``query_pre_attn_scalar`` other than head_dim (llama.cpp always scales by 1/sqrt(head_dim)).

This module is the description (no jax); the graph (forward, head_forward, init_cache) is step35_graph.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import gguf
from gguf import Keys

from mtp_jax import families
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.families import glm4moe
from mtp_jax.io.gguf_model import Metadata, f32, write_common_metadata
from mtp_jax.io.table import Spec, T
from mtp_jax.io.validate import REQUIRED
from mtp_jax.params import ArrayInfo
from mtp_jax.pytree import pytree_dataclass

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.STEP35]  # "step35"
FULL, SWA = "full_attention", "sliding_attention"
DENSE, SPARSE = "dense", "sparse"
# the trunk's stacks: (Params attribute, attention type, MLP type), one per kind of layer
KINDS = (("dense_layers", FULL, DENSE), ("moe_layers", FULL, SPARSE), ("dense_swa_layers", SWA, DENSE),
         ("moe_swa_layers", SWA, SPARSE))


@dataclass(frozen=True, kw_only=True)
class Step35Config(ModelConfig):
    """ModelConfig plus the per-block lists (trunk blocks then MTP blocks, ``num_hidden_layers +
    num_nextn_predict_layers`` items each). ``num_attention_heads`` / ``partial_rotary_factor`` / ``rope_theta``
    describe the full-attention layers; the ``*_swa`` / ``num_sliding_attention_heads`` fields the sliding ones."""

    family = ARCH

    layer_types: tuple[str, ...] = ()  # FULL | SWA per block (default: all FULL)
    mlp_layer_types: tuple[str, ...] = ()  # DENSE | SPARSE per block (default: first_k_dense_replace dense)
    num_sliding_attention_heads: int = 0  # 0: num_attention_heads
    sliding_window: int = 512
    rope_theta_swa: float = 10000.0
    partial_rotary_factor: float = 0.5
    partial_rotary_factor_swa: float = 1.0
    swiglu_limits: tuple[float, ...] = ()  # routed experts' clamp per block (0: none; default all 0)
    swiglu_limits_shared: tuple[float, ...] = ()  # dense MLPs' and shared experts' clamp per block
    shared_intermediate_size: int = 0  # the shared expert's FFN size (0: moe_intermediate_size)
    use_qk_norm: bool = True
    # the hidden the MTP heads are handed: "prenorm" (llama.cpp step35.cpp: the trunk's residual before the final
    # norm, and each head's output before shared_head_norm) or "postnorm" (transformers' MtpModel: after them)
    mtp_hidden: str = "prenorm"
    name: str = "step35"

    def __post_init__(self):
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        fill = {"layer_types": (FULL,) * n,
                "mlp_layer_types": tuple(DENSE if b < self.first_k_dense_replace else SPARSE for b in range(n)),
                "swiglu_limits": (0.0,) * n, "swiglu_limits_shared": (0.0,) * n}
        for name, default in fill.items():
            v = getattr(self, name)
            v = default if v is None or len(v) == 0 else v
            object.__setattr__(self, name, tuple(float(x) for x in v) if "limits" in name else tuple(v))
        if not self.num_sliding_attention_heads:
            object.__setattr__(self, "num_sliding_attention_heads", self.num_attention_heads)
        if not self.shared_intermediate_size:
            object.__setattr__(self, "shared_intermediate_size", self.moe_intermediate_size)
        # informational for this family (its stacks follow mlp_layer_types): the trunk's dense layers
        dense = sum(t == DENSE for t in self.mlp_layer_types[: self.num_hidden_layers])
        object.__setattr__(self, "first_k_dense_replace", dense)
        super().__post_init__()

    def trunk_only(self) -> "Step35Config":
        L = self.num_hidden_layers
        return self.replace(num_nextn_predict_layers=0, layer_types=self.layer_types[:L],
                            mlp_layer_types=self.mlp_layer_types[:L], swiglu_limits=self.swiglu_limits[:L],
                            swiglu_limits_shared=self.swiglu_limits_shared[:L])

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_swa(self, block: int) -> bool:
        return self.layer_types[block] == SWA

    def is_moe(self, block: int) -> bool:
        return self.mlp_layer_types[block] == SPARSE

    def heads(self, block: int) -> int:
        return self.num_sliding_attention_heads if self.is_swa(block) else self.num_attention_heads

    def attention_kw(self, swa: bool) -> dict[str, Any]:
        """layers.attention's per-kind arguments: rotated dims, RoPE base, window."""
        if swa:
            return {"rope_dims": int(self.head_dim * self.partial_rotary_factor_swa), "theta": self.rope_theta_swa,
                    "window": self.sliding_window}
        return {"rope_dims": self.rotary_dim, "theta": self.rope_theta, "window": None}

    def validate(self) -> None:
        super().validate()
        n = self.num_blocks
        for name, allowed in (("layer_types", (FULL, SWA)), ("mlp_layer_types", (DENSE, SPARSE)),
                              ("swiglu_limits", None), ("swiglu_limits_shared", None)):
            v = getattr(self, name)
            if len(v) != n:
                raise ValueError(f"Step35Config.{name} has {len(v)} items; expected one per block "
                                 f"(num_hidden_layers + num_nextn_predict_layers = {n})")
            if allowed and any(x not in allowed for x in v):
                raise ValueError(f"Step35Config.{name} items must be one of {allowed}, got {sorted(set(v))}")
            if not allowed and any(not (math.isfinite(x) and x >= 0) for x in v):
                raise ValueError(f"Step35Config.{name} must be finite and >= 0 (0: no clamp), got {v}")
        if self.num_sliding_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_sliding_attention_heads ({self.num_sliding_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.mtp_hidden not in ("prenorm", "postnorm"):
            raise ValueError(f"mtp_hidden must be 'prenorm' (llama.cpp) or 'postnorm' (transformers), got "
                             f"{self.mtp_hidden!r}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

        r = self.head_dim * self.partial_rotary_factor_swa
        if not 0 < self.partial_rotary_factor_swa <= 1 or int(r) % 2:
            raise ValueError(f"partial_rotary_factor_swa {self.partial_rotary_factor_swa} gives {int(r)} rotated "
                             f"dims for head_dim {self.head_dim}; it must be even and positive")
        if any(t == DENSE for t in self.mlp_layer_types) and self.intermediate_size <= 0:
            raise ValueError("intermediate_size must be positive when there are dense layers")
        if self.shared_intermediate_size <= 0 or self.n_shared_experts != 1:
            raise ValueError(f"Step-3.5 MoE layers have one shared expert of positive size, got n_shared_experts "
                             f"{self.n_shared_experts}, shared_intermediate_size {self.shared_intermediate_size}")


# ---- HF config.json ------------------------------------------------------------------------------------------


def _per_block(hf: dict, key: str, mtp_key: str | None, n: int, L: int, default: Any) -> list:
    """A per-layer list from a hub config (padded to every block) or a transformers one (trunk list + mtp_* list)."""
    v = hf.get(key)
    if v is None:
        return [default] * n
    v = list(v)
    if len(v) == L and n > L:
        extra = hf.get(mtp_key) if mtp_key else None
        v += list(extra) if extra else [default] * (n - L)
    if len(v) != n:
        raise ValueError(f"config.json {key} has {len(v)} items; expected {L} or {n}")
    return v


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> Step35Config:
    """From a Step-3.5 ``config.json`` (hub keys such as ``moe_layers_enum`` / ``attention_other_setting`` /
    ``num_attention_groups`` / per-layer ``rope_theta`` lists, or transformers 5's ``Step3p7TextConfig`` keys);
    a ``text_config`` inside is read in place of the outer dict."""
    hf = hf.get("text_config") or hf
    L = hf["num_hidden_layers"]
    n_mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
    n = L + n_mtp
    n_heads = hf["num_attention_heads"]
    other = hf.get("attention_other_setting") or {}
    n_kv = hf.get("num_key_value_heads", hf.get("num_attention_groups", n_heads))
    if other.get("num_attention_groups", n_kv) != n_kv:
        raise ValueError(f"per-layer KV head counts ({n_kv} and {other['num_attention_groups']}) are not supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if hf.get("query_pre_attn_scalar") not in (None, head_dim):
        raise ValueError(f"query_pre_attn_scalar {hf['query_pre_attn_scalar']} != head_dim {head_dim} is not "
                         f"supported (llama.cpp scales by 1/sqrt(head_dim))")
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope scaling {scaling} is not supported")
    types = _per_block(hf, "layer_types", "mtp_layer_types", n, L, FULL)
    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is None and hf.get("moe_layers_enum") is not None:
        enum = hf["moe_layers_enum"]
        moe_set = {int(i) for i in (enum.split(",") if isinstance(enum, str) else enum) if str(i).strip()}
        mlp_types = [SPARSE if b in moe_set else DENSE for b in range(n)]
    elif mlp_types is None:
        mlp_types = [SPARSE if b >= 3 else DENSE for b in range(n)]  # transformers' default
    else:
        mlp_types = _per_block(hf, "mlp_layer_types", "mtp_mlp_layer_types", n, L, SPARSE)
    # RoPE per layer type: the first layer of each type names its base and rotary fraction (transformers)
    thetas, factors = hf.get("rope_theta", 10000.0), hf.get("partial_rotary_factors")
    rope = hf.get("rope_parameters") or {}

    def of_type(t: str, values: Any, key: str, default: float) -> float:
        if isinstance(rope.get(t), dict) and key in rope[t]:
            return float(rope[t][key])
        if isinstance(values, list):
            return float(values[types.index(t)]) if t in types else default
        return float(values) if values is not None else default

    limits = [0.0 if x is None else float(x) for x in _per_block(hf, "swiglu_limits", None, n, L, 0.0)]
    limits_sh = [0.0 if x is None else float(x) for x in _per_block(hf, "swiglu_limits_shared", None, n, L, 0.0)]
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    E = hf.get("n_routed_experts", hf.get("moe_num_experts"))
    moe_ff = hf.get("moe_intermediate_size", 1280)
    return Step35Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=L,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        num_sliding_attention_heads=hf.get("num_sliding_attention_heads") or other.get("num_attention_heads", n_heads),
        intermediate_size=hf["intermediate_size"], moe_intermediate_size=moe_ff,
        n_routed_experts=E, num_experts_per_tok=hf.get("num_experts_per_tok", hf.get("moe_top_k")),
        shared_intermediate_size=hf.get("share_expert_dim", hf.get("share_expert_dims", moe_ff)),
        n_shared_experts=1, norm_topk_prob=True,  # transformers always renormalizes the picked weights
        routed_scaling_factor=float(hf.get("moe_router_scaling_factor", 1.0)),
        layer_types=tuple(types), mlp_layer_types=tuple(mlp_types), sliding_window=hf.get("sliding_window") or 512,
        rope_theta=of_type(FULL, thetas, "rope_theta", 10000.0), rope_theta_swa=of_type(SWA, thetas, "rope_theta",
                                                                                        10000.0),
        partial_rotary_factor=of_type(FULL, factors, "partial_rotary_factor", 0.5),
        partial_rotary_factor_swa=of_type(SWA, factors, "partial_rotary_factor", 1.0),
        swiglu_limits=tuple(limits), swiglu_limits_shared=tuple(limits_sh),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), num_nextn_predict_layers=n_mtp,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 131072), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos, dtype=dtype,
    )


def config_to_hf(cfg: Step35Config) -> dict[str, Any]:
    """Hub-style keys (per-layer lists padded over the MTP blocks), which transformers' Step3p7TextConfig reads."""
    n = cfg.num_blocks
    full = cfg.rotary_dim / cfg.head_dim
    return {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "num_sliding_attention_heads": cfg.num_sliding_attention_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "share_expert_dim": cfg.shared_intermediate_size, "moe_router_scaling_factor": cfg.routed_scaling_factor,
        "layer_types": list(cfg.layer_types), "mlp_layer_types": list(cfg.mlp_layer_types),
        "sliding_window": cfg.sliding_window,
        "rope_theta": [cfg.rope_theta_swa if cfg.is_swa(b) else cfg.rope_theta for b in range(n)],
        "partial_rotary_factors": [cfg.partial_rotary_factor_swa if cfg.is_swa(b) else full for b in range(n)],
        "swiglu_limits": list(cfg.swiglu_limits), "swiglu_limits_shared": list(cfg.swiglu_limits_shared),
        "rms_norm_eps": cfg.rms_norm_eps, "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if cfg.eos_token_ids else None,
    }


# ---- GGUF metadata -------------------------------------------------------------------------------------------


def config_from_gguf(meta: Metadata, dtype: str = "float32") -> Step35Config:
    """llama-model.cpp load_hparams + step35.cpp load_arch_hparams; arrays over every block, range-checked."""
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    get = meta.get
    common = meta.common(dtype, heads_per_layer=True)
    n = common["num_hidden_layers"] + common["num_nextn_predict_layers"]
    gating = get(L.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SIGMOID))
    if gating not in (0, gguf.ExpertGatingFuncType.SIGMOID):  # 0 (none): step35 defaults to sigmoid
        raise meta.error(f"expert_gating_func {gating} is not supported (Step-3.5 uses sigmoid = 2)")
    if get(R.SCALING_TYPE, "none") != "none" or "rope_freqs.weight" in meta.tensors:
        raise meta.error("rope scaling (rope.scaling.type / rope_freqs.weight) is not supported for step35")
    swa = [bool(x) for x in meta.per_layer(A.SLIDING_WINDOW_PATTERN, n, REQUIRED, 0, 1)]
    heads = meta.per_layer(A.HEAD_COUNT, n, REQUIRED, 1)
    kv = meta.per_layer(A.HEAD_COUNT_KV, n, heads[0], 1)
    if len(set(kv)) != 1:
        raise meta.error(f"key {A.HEAD_COUNT_KV.format(arch=ARCH)} = {kv}: per-layer KV head counts are not "
                         f"supported")
    n_full, n_swa = meta.per_kind(A.HEAD_COUNT, n, swa, "head count", REQUIRED, 1)
    D = common["hidden_size"]
    head_dim = get(A.KEY_LENGTH, D // heads[0], 1)
    if get(A.VALUE_LENGTH, head_dim) != head_dim:
        raise meta.error("key_length and value_length differ; step35 needs them equal")
    rot = get(R.DIMENSION_COUNT, head_dim, 2, head_dim)  # llama.cpp halves it for the full layers
    rot_swa = get(R.DIMENSION_COUNT_SWA, rot, 2, head_dim)
    if (rot // 2) % 2 or rot_swa % 2:
        raise meta.error(f"rope dimension counts {rot} (full layers rotate half) and {rot_swa} must give even "
                         f"rotated dims")
    # a block is MoE when it has a router (step35.cpp); the trunk blocks an MTP-only file lacks follow
    # leading_dense_block_count
    lead = get(L.LEADING_DENSE_BLOCK_COUNT, 0, 0, n)
    moe = [f"blk.{b}.ffn_gate_inp.weight" in meta.tensors if f"blk.{b}.attn_norm.weight" in meta.tensors
           else b >= lead for b in range(n)]
    limit = lambda key: [f32(x) for x in meta.per_layer(key, n, 0.0, 0.0, math.inf)]  # noqa: E731
    common.update(num_attention_heads=n_full, num_key_value_heads=kv[0], n_shared_experts=1,  # always one
                  norm_topk_prob=bool(get(L.EXPERT_WEIGHTS_NORM, False)))
    return meta.build(
        Step35Config, **common, head_dim=head_dim, num_sliding_attention_heads=n_swa,
        layer_types=tuple(SWA if s else FULL for s in swa), mlp_layer_types=tuple(SPARSE if m else DENSE for m in moe),
        sliding_window=get(A.SLIDING_WINDOW, REQUIRED, 1),
        rope_theta_swa=f32(get(R.FREQ_BASE_SWA, 10000.0, 1e-30, math.inf)),
        partial_rotary_factor=(rot // 2) / head_dim, partial_rotary_factor_swa=rot_swa / head_dim,
        swiglu_limits=tuple(limit(L.SWIGLU_CLAMP_EXP)), swiglu_limits_shared=tuple(limit(L.SWIGLU_CLAMP_SHEXP)),
        shared_intermediate_size=get(L.EXPERT_SHARED_FEED_FORWARD_LENGTH, common["moe_intermediate_size"], 1),
    )


def write_gguf_metadata(w: gguf.GGUFWriter, cfg: Step35Config, ftype: gguf.LlamaFileType) -> None:
    """The keys llama.cpp reads for step35 (conversion/step3.py's set_gguf_parameters: arrays over all blocks)."""
    n = cfg.num_blocks
    write_common_metadata(w, cfg, heads=[cfg.heads(b) for b in range(n)], kv_heads=[cfg.num_key_value_heads] * n)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    if 2 * cfg.rotary_dim != cfg.head_dim:
        w.add_rope_dimension_count(2 * cfg.rotary_dim)
    rot_swa = int(cfg.head_dim * cfg.partial_rotary_factor_swa)
    if rot_swa != 2 * cfg.rotary_dim:
        w.add_uint32(Keys.Rope.DIMENSION_COUNT_SWA.format(arch=ARCH), rot_swa)
    w.add_rope_freq_base_swa(cfg.rope_theta_swa)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.is_swa(b) for b in range(n)])
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_swiglu_clamp_exp(list(cfg.swiglu_limits))
    w.add_swiglu_clamp_shexp(list(cfg.swiglu_limits_shared))
    w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- the tensor table ----------------------------------------------------------------------------------------


def top_specs(cfg: ModelConfig) -> list[Spec]:
    return [Spec(T.TOKEN_EMBD, ("embed",), table=True, hf="model.embed_tokens.weight"),
            Spec(T.OUTPUT_NORM, ("final_norm",), hf="model.norm.weight", hf_offset=1.0),
            Spec(T.OUTPUT, ("lm_head",), 1, hf="lm_head.weight")]


def layer_specs(cfg: ModelConfig, moe_ffn: bool) -> list[Spec]:
    """One decoder block (HF names as transformers' Step3p7DecoderLayer; the norms stored + 1 in GGUF)."""
    return [Spec(T.ATTN_NORM, ("attn_norm",), hf="input_layernorm.weight", hf_offset=1.0),
            Spec(T.ATTN_Q, ("attn", "wq"), 1, hf="self_attn.q_proj.weight"),
            Spec(T.ATTN_K, ("attn", "wk"), 1, hf="self_attn.k_proj.weight"),
            Spec(T.ATTN_V, ("attn", "wv"), 1, hf="self_attn.v_proj.weight"),
            Spec(T.ATTN_Q_NORM, ("attn", "q_norm"), hf="self_attn.q_norm.weight", hf_offset=1.0),
            Spec(T.ATTN_K_NORM, ("attn", "k_norm"), hf="self_attn.k_norm.weight", hf_offset=1.0),
            Spec(T.ATTN_GATE, ("attn", "wg"), 1, hf="self_attn.g_proj.weight"),
            Spec(T.ATTN_OUT, ("attn", "wo"), 2, hf="self_attn.o_proj.weight"),
            Spec(T.FFN_NORM, ("ffn_norm",), hf="post_attention_layernorm.weight", hf_offset=1.0),
            *glm4moe.ffn_specs(cfg, moe_ffn)]


def nextn_specs(cfg: ModelConfig) -> list[Spec]:
    """An MTP block's own tensors: step35.cpp load_block_mtp; HF names as the hub checkpoint's
    model.layers.{N}.* (conversion/step3.py strips ``transformer.`` and renames shared_head.output -> head)."""
    return [Spec(T.NEXTN_EH_PROJ, ("eh_proj",), 1, hf="eh_proj.weight"),
            Spec(T.NEXTN_ENORM, ("enorm",), hf="enorm.weight", hf_offset=1.0),
            Spec(T.NEXTN_HNORM, ("hnorm",), hf="hnorm.weight", hf_offset=1.0),
            Spec(T.NEXTN_SHARED_HEAD_NORM, ("shared_head_norm",), hf="transformer.shared_head.norm.weight",
                 hf_offset=1.0),
            Spec(T.NEXTN_SHARED_HEAD_HEAD, ("shared_head_head",), 1, hf="transformer.shared_head.output.weight"),
            Spec(T.NEXTN_EMBED_TOKENS, ("embed_tokens",), table=True, hf="transformer.embed_tokens.weight")]


# ---- parameters ----------------------------------------------------------------------------------------------


@pytree_dataclass
class Step35Params:
    """Params with one stack per kind of layer (KINDS): head counts differ between full and sliding layers."""

    embed: Any  # [V, D]
    dense_layers: Any  # full attention, dense MLP: Layer stacked [n, ...] or None
    moe_layers: Any  # full attention, MoE
    dense_swa_layers: Any  # sliding window, dense MLP
    moe_swa_layers: Any  # sliding window, MoE
    final_norm: Any  # [D]
    lm_head: Any = None  # [D, V]
    nextn: Any = None  # tuple[NextN, ...]: the chained MTP heads, blk.{n_layer + k}


def stacks(cfg: Step35Config) -> list[tuple[str, tuple[int, ...], bool]]:
    L = cfg.num_hidden_layers
    return [(attr, tuple(b for b in range(L) if cfg.layer_types[b] == a and cfg.mlp_layer_types[b] == m),
             m == SPARSE) for attr, a, m in KINDS]


def _layer(cfg: Step35Config, block: int) -> P.Layer:
    D, N, K, H = cfg.hidden_size, cfg.heads(block), cfg.num_key_value_heads, cfg.head_dim
    attn = P.Attention(
        wq=ArrayInfo((D, N, H), ("embed", "q_heads", "head_dim")),
        wk=ArrayInfo((D, K, H), ("embed", "kv_heads", "head_dim")),
        wv=ArrayInfo((D, K, H), ("embed", "kv_heads", "head_dim")),
        wo=ArrayInfo((N, H, D), ("q_heads", "head_dim", "embed")),
        q_norm=ArrayInfo((H,), ("head_dim",), "ones"), k_norm=ArrayInfo((H,), ("head_dim",), "ones"),
        wg=ArrayInfo((D, N), ("embed", "q_heads")),
    )
    ffn = (dataclasses.replace(P.moe(cfg), shared=P.mlp(D, cfg.shared_intermediate_size)) if cfg.is_moe(block)
           else P.mlp(D, cfg.intermediate_size))
    return P.Layer(attn_norm=ArrayInfo((D,), ("norm",), "ones"), attn=attn,
                   ffn_norm=ArrayInfo((D,), ("norm",), "ones"), ffn=ffn)


def abstract(cfg: Step35Config) -> Step35Params:
    V, D, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    st = {attr: P.stack(_layer(cfg, blocks[0]), len(blocks)) if blocks else None for attr, blocks, _ in stacks(cfg)}
    nextn = None
    if cfg.has_mtp:
        nextn = tuple(P.NextN(enorm=ArrayInfo((D,), ("norm",), "ones"), hnorm=ArrayInfo((D,), ("norm",), "ones"),
                              eh_proj=ArrayInfo((2 * D, D), (None, "embed")), layer=_layer(cfg, L + k),
                              shared_head_norm=ArrayInfo((D,), ("norm",), "ones"))
                      for k in range(cfg.num_nextn_predict_layers))
    return Step35Params(embed=ArrayInfo((V, D), ("vocab", "embed")), final_norm=ArrayInfo((D,), ("norm",), "ones"),
                        lm_head=None if cfg.tie_word_embeddings else ArrayInfo((D, V), ("embed", "vocab")),
                        nextn=nextn, **st)


_GRAPH = "mtp_jax.families.step35_graph"  # (it imports jax)
FAMILY = families.register(families.Family(
    arch=ARCH, hf_model_types=("step3p5",), hf_architecture="Step3p5ForCausalLM", config=Step35Config,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, config_from_gguf=config_from_gguf,
    write_gguf_metadata=write_gguf_metadata, top_specs=top_specs, layer_specs=layer_specs, nextn_specs=nextn_specs,
    abstract=abstract, forward=families.Lazy(_GRAPH, "forward"), head_forward=families.Lazy(_GRAPH, "head_forward"),
    drafter=families.Lazy("mtp_jax.drafter", "ChainedHeads"), tiny="step35-tiny", stacks=stacks,
    init_cache=families.Lazy(_GRAPH, "init_cache"),
))
