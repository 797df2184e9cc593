"""Gemma 4 (HF ``Gemma4ForCausalLM`` text model, model_type ``gemma4_text`` / ``gemma4``; GGUF arch ``gemma4``): sliding
and full attention layers with their own head dims, KV-shared layers, q/k/v RMS norms, proportional RoPE, attention
scale 1, post-attention / post-FFN norms, GeGLU MLPs, an optional MoE block beside the MLP of every layer,
per-layer input embeddings (PLE), a per-layer output scale and final logit soft-capping.

Checked against the llama.cpp tree of llama-cpp-python 0.3.36 and transformers 5.24:

* graph: src/models/gemma4.cpp ``graph`` (and ``build_inp_per_layer`` / ``project_per_layer_inputs`` for PLE);
  transformers models/gemma4/modeling_gemma4.py ``Gemma4TextDecoderLayer`` / ``Gemma4TextModel``. Norms are plain
  ``x * w`` (Gemma4RMSNorm, no 1 + w), V is RMS-normed without a weight, attention has no 1/sqrt(d) scale;
* a window W lets query p see keys p - W < j <= p (LLAMA_SWA_TYPE_STANDARD, HF sliding_window);
* RoPE is NeoX. Sliding layers rotate all head dims with ``rope_theta_swa``; full layers rotate all dims with
  ``rope_theta`` but only the first ``partial_rotary_factor * head_dim / 2`` frequencies turn (HF "proportional":
  the others are 0; llama.cpp: the ``rope_freqs`` tensor divides them by a huge factor);
* KV sharing: the last ``num_kv_shared_layers`` layers compute no K/V and attend with the cache of the last
  earlier layer of their kind (HF Gemma4TextConfig.kv_sharing_modes; llama.cpp's reuse rule in llama-model.cpp
  ``create_memory``: layer n_kv - 2 for sliding, n_kv - 1 for full, which is the same layer when those two are a
  sliding and a full one; the GGUF reader checks that);
* MoE (enable_moe_block): llama.cpp adds the dense MLP (its own post norm 1) and the routed GeGLU experts (pre norm
  2, post norm 2) and then applies the post-FFN norm; the router reads rms_norm(x) / sqrt(D) * scale, softmax over
  all experts, top-k renormalized, times a per-expert scale;
* the hidden the assistant drafter takes (``forward``'s first result) is after the final norm (gemma4.cpp
  ``t_h_nextn``).

This module is the description (no jax); the graph is gemma4_graph.py, the assistant's description
gemma4_assistant.py and its graph gemma4_assistant_graph.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from gguf import Keys

from mtp_jax import families
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io.gguf_model import Metadata, f32
from mtp_jax.io.table import Spec, T
from mtp_jax.io.validate import REQUIRED
from mtp_jax.params import ArrayInfo
from mtp_jax.pytree import pytree_dataclass

ARCH = "gemma4"
FULL, SWA = "full_attention", "sliding_attention"
# the trunk's stacks: (Params attribute, sliding, KV-shared), one per kind of layer
KINDS = (("swa_layers", True, False), ("full_layers", False, False), ("swa_shared_layers", True, True),
         ("full_shared_layers", False, True))
BIG_FREQ_FACTOR = 1e30  # a rope_freqs entry this large stops its pair from turning (llama.cpp's converter)


class LayerKinds:
    """What a Gemma-4 target and its assistant share about their sliding and full layers (both configs have
    ``layer_types``, the full layers' ``head_dim`` / ``num_key_value_heads`` / ``rope_theta`` /
    ``partial_rotary_factor`` and the sliding ones' ``*_swa``)."""

    def is_swa(self, layer: int) -> bool:
        return self.layer_types[layer] == SWA

    def dims(self, swa: bool) -> tuple[int, int]:
        """(KV heads, head dim) of a sliding or full layer."""
        return (self.num_key_value_heads_swa, self.head_dim_swa) if swa else (self.num_key_value_heads, self.head_dim)

    @property
    def rope_angles(self) -> int:
        """Pairs that turn in a full layer (HF _compute_proportional_rope_parameters: int(factor * H // 2))."""
        return int(self.partial_rotary_factor * self.head_dim // 2)

    def rope_freqs(self, swa: bool) -> np.ndarray:
        """[H/2] the turning frequency of each NeoX pair of a layer kind (proportional RoPE on full layers)."""
        H = self.head_dim_swa if swa else self.head_dim
        theta = self.rope_theta_swa if swa else self.rope_theta
        inv = theta ** (-np.arange(0, H, 2, dtype=np.float64) / H)
        if not swa:
            inv[self.rope_angles:] = 0.0
        return inv.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class Gemma4Config(ModelConfig, LayerKinds):
    """ModelConfig plus Gemma-4's fields. ``head_dim`` / ``num_key_value_heads`` / ``partial_rotary_factor`` /
    ``rope_theta`` describe the full-attention layers (HF global_head_dim, num_global_key_value_heads); the
    ``*_swa`` fields the sliding ones. ``assistant``: the MTP drafter attached to it (``Gemma4AssistantConfig``), which
    lives in its own file; the target's own files never hold it."""

    family = ARCH

    layer_types: tuple[str, ...] = ()  # FULL | SWA per trunk layer (default: 5 sliding then 1 full, last one full)
    sliding_window: int = 512
    head_dim_swa: int = 0  # 0: head_dim
    num_key_value_heads_swa: int = 0  # 0: num_key_value_heads
    rope_theta_swa: float = 10000.0
    num_kv_shared_layers: int = 0
    hidden_size_per_layer_input: int = 0  # PLE width (0: no per-layer inputs)
    final_logit_softcapping: float = 0.0  # 0: none
    attention_k_eq_v: bool = False  # full layers have no V projection: V = K's projection (HF alternative attention)
    enable_moe_block: bool = False  # every layer has routed experts beside its MLP
    use_double_wide_mlp: bool = False  # KV-shared layers' MLPs are twice intermediate_size
    assistant: Any = None  # Gemma4AssistantConfig or None
    partial_rotary_factor: float = 0.25
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = True
    n_shared_experts: int = 0
    n_routed_experts: int = 0  # (with enable_moe_block)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    name: str = "gemma4"

    def __post_init__(self):
        L = self.num_hidden_layers
        if not self.layer_types:
            types = [SWA if (i + 1) % 6 else FULL for i in range(L)]
            types[-1] = FULL
            object.__setattr__(self, "layer_types", tuple(types))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name, src in (("head_dim_swa", "head_dim"), ("num_key_value_heads_swa", "num_key_value_heads")):
            if not getattr(self, name):
                object.__setattr__(self, name, getattr(self, src))
        # the base class's stacks (dense lead layers, then MoE layers) describe the MLP kind: all one or the other
        object.__setattr__(self, "first_k_dense_replace", 0 if self.enable_moe_block else L)
        if isinstance(self.assistant, dict):
            from mtp_jax.families.gemma4_assistant import Gemma4AssistantConfig

            object.__setattr__(self, "assistant", Gemma4AssistantConfig(**self.assistant))
        super().__post_init__()

    @property
    def has_mtp(self) -> bool:
        return self.assistant is not None

    def trunk_only(self) -> "Gemma4Config":
        return self.replace(assistant=None)

    @property
    def first_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_shared(self, layer: int) -> bool:
        return layer >= self.first_shared

    def last_with_kv(self, swa: bool) -> int | None:
        """The last layer of a kind that computes K/V (HF kv_sharing_modes' "store" layer; None: there is none): the
        cache KV-shared layers of that kind and the assistant's layers of that kind read."""
        return max((i for i in range(self.first_shared) if self.is_swa(i) == swa), default=None)

    def kv_source(self, layer: int) -> int:
        """The layer whose cache ``layer`` attends with: itself, or for a KV-shared layer last_with_kv of its kind."""
        return self.last_with_kv(self.is_swa(layer)) if self.is_shared(layer) else layer

    def ffn_size(self, layer: int) -> int:
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.is_shared(layer) else 1)

    def cache_dims(self):
        return (self.num_key_value_heads, self.head_dim), (self.num_key_value_heads, self.head_dim)

    def validate(self) -> None:
        super().validate()
        L = self.num_hidden_layers
        if len(self.layer_types) != L or any(t not in (FULL, SWA) for t in self.layer_types):
            raise ValueError(f"Gemma4Config.layer_types must list {L} items of {FULL!r} / {SWA!r}, got "
                             f"{list(self.layer_types)}")
        if self.num_nextn_predict_layers:
            raise ValueError("Gemma 4 has no NextN blocks in the target: its drafter is a separate assistant model")
        if not 0 <= self.num_kv_shared_layers < L:
            raise ValueError(f"num_kv_shared_layers must be in [0, num_hidden_layers={L}), got "
                             f"{self.num_kv_shared_layers}")
        for layer in range(self.first_shared, L):
            if self.last_with_kv(self.is_swa(layer)) is None:
                raise ValueError(f"KV-shared layer {layer} ({self.layer_types[layer]}) has no earlier layer of its "
                                 f"kind to take K/V from")
        for name in ("head_dim_swa", "num_key_value_heads_swa", "sliding_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"Gemma4Config.{name} must be positive, got {getattr(self, name)}")
        for swa, (kv, h) in ((True, self.dims(True)), (False, self.dims(False))):
            if self.num_attention_heads % kv or h % 2:
                raise ValueError(f"{'sliding' if swa else 'full'} layers: {self.num_attention_heads} query heads, "
                                 f"{kv} KV heads, head dim {h}: heads must be a multiple of KV heads, dims even")
        if self.intermediate_size <= 0:
            raise ValueError("intermediate_size must be positive (every Gemma 4 layer has an MLP)")
        if self.hidden_size_per_layer_input < 0 or not math.isfinite(self.final_logit_softcapping) \
                or self.final_logit_softcapping < 0:
            raise ValueError("hidden_size_per_layer_input and final_logit_softcapping must be >= 0")
        if self.assistant is not None:
            self.assistant.check_target(self)


# ---- parameters ----------------------------------------------------------------------------------------------


@pytree_dataclass
class G4Attention:
    wq: Any  # [D, N, H]
    wo: Any  # [N, H, D]
    q_norm: Any  # [H]
    wk: Any = None  # [D, K, H]   (None: a KV-shared layer)
    wv: Any = None  # [D, K, H]   (None: KV-shared, or V = K's projection)
    k_norm: Any = None  # [H]


@pytree_dataclass
class G4Moe:
    """Gemma-4's routed experts (beside the layer's MLP): P.Moe's router / gate / up / down, its norms and scales."""

    experts: Any  # P.Moe (router [D, E], gate / up [E, D, F], down [E, F, D]; no bias, no shared expert)
    router_scale: Any  # [D]
    expert_scale: Any  # [E]
    pre_norm: Any  # [D]  (pre_feedforward_layernorm_2)
    post_norm_mlp: Any  # [D]  (post_feedforward_layernorm_1)
    post_norm_moe: Any  # [D]  (post_feedforward_layernorm_2)


@pytree_dataclass
class G4Layer:
    attn_norm: Any  # [D]
    attn: G4Attention
    attn_post_norm: Any  # [D]
    ffn_norm: Any  # [D]   (pre_feedforward_layernorm)
    mlp: Any  # P.Mlp
    ffn_post_norm: Any  # [D]
    out_scale: Any  # [1]  (layer_scalar)
    moe: Any = None  # G4Moe
    ple_gate: Any = None  # [D, P]
    ple_proj: Any = None  # [P, D]
    ple_norm: Any = None  # [D]


@pytree_dataclass
class Gemma4Params:
    embed: Any  # [V, D]
    swa_layers: Any  # G4Layer stacked, or None
    full_layers: Any
    swa_shared_layers: Any
    full_shared_layers: Any
    final_norm: Any  # [D]
    lm_head: Any = None  # [D, V] (None: tied)
    ple_embed: Any = None  # [V, L * P]  per-layer token embeddings
    ple_model_proj: Any = None  # [D, L * P]
    ple_proj_norm: Any = None  # [P]
    nextn: Any = None  # the attached assistant's params (never in the target's files)


def stacks(cfg: Gemma4Config) -> list[tuple[str, tuple[int, ...], bool]]:
    L = cfg.num_hidden_layers
    return [(attr, tuple(i for i in range(L) if cfg.is_swa(i) == swa and cfg.is_shared(i) == shared),
             cfg.enable_moe_block) for attr, swa, shared in KINDS]


def _layer(cfg: Gemma4Config, layer: int) -> G4Layer:
    D, N = cfg.hidden_size, cfg.num_attention_heads
    swa, shared = cfg.is_swa(layer), cfg.is_shared(layer)
    K, H = cfg.dims(swa)
    norm = lambda n: ArrayInfo((n,), ("norm",), "ones")  # noqa: E731
    attn = G4Attention(
        wq=ArrayInfo((D, N, H), ("embed", "q_heads", "head_dim")),
        wo=ArrayInfo((N, H, D), ("q_heads", "head_dim", "embed")),
        q_norm=ArrayInfo((H,), ("head_dim",), "ones"),
        wk=None if shared else ArrayInfo((D, K, H), ("embed", "kv_heads", "head_dim")),
        wv=None if shared or (cfg.attention_k_eq_v and not swa) else ArrayInfo((D, K, H), ("embed", "kv_heads",
                                                                                            "head_dim")),
        k_norm=None if shared else ArrayInfo((H,), ("head_dim",), "ones"),
    )
    moe_p = None
    if cfg.enable_moe_block:
        E = cfg.n_routed_experts
        experts = dataclasses.replace(P.moe(cfg.replace(n_shared_experts=0)), bias=None)
        moe_p = G4Moe(experts=experts, router_scale=norm(D), expert_scale=ArrayInfo((E,), (None,), "ones"),
                      pre_norm=norm(D), post_norm_mlp=norm(D), post_norm_moe=norm(D))
    Pd = cfg.hidden_size_per_layer_input
    return G4Layer(attn_norm=norm(D), attn=attn, attn_post_norm=norm(D), ffn_norm=norm(D),
                   mlp=P.mlp(D, cfg.ffn_size(layer)), ffn_post_norm=norm(D),
                   out_scale=ArrayInfo((1,), (None,), "ones"), moe=moe_p,
                   ple_gate=ArrayInfo((D, Pd), ("embed", None)) if Pd else None,
                   ple_proj=ArrayInfo((Pd, D), (None, "embed")) if Pd else None,
                   ple_norm=norm(D) if Pd else None)


def abstract(cfg: Gemma4Config) -> Gemma4Params:
    V, D, L, Pd = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    st = {attr: P.stack(_layer(cfg, blocks[0]), len(blocks)) if blocks else None for attr, blocks, _ in stacks(cfg)}
    for attr, blocks, _ in stacks(cfg):
        if blocks and len({cfg.ffn_size(b) for b in blocks}) > 1:
            raise ValueError(f"{attr}: layers of one stack must share an MLP size")
    return Gemma4Params(
        embed=ArrayInfo((V, D), ("vocab", "embed")), final_norm=ArrayInfo((D,), ("norm",), "ones"),
        lm_head=None if cfg.tie_word_embeddings else ArrayInfo((D, V), ("embed", "vocab")),
        ple_embed=ArrayInfo((V, L * Pd), ("vocab", None)) if Pd else None,
        ple_model_proj=ArrayInfo((D, L * Pd), ("embed", None)) if Pd else None,
        ple_proj_norm=ArrayInfo((Pd,), ("norm",), "ones") if Pd else None,
        nextn=_assistant_abstract(cfg), **st)


def _assistant_abstract(cfg: Gemma4Config):
    if cfg.assistant is None:
        return None
    from mtp_jax.families.gemma4_assistant import assistant_abstract

    return assistant_abstract(cfg.assistant)


# ---- the tensor table ----------------------------------------------------------------------------------------


def top_specs(cfg: Gemma4Config) -> list[Spec]:
    return [Spec(T.TOKEN_EMBD, ("embed",), table=True, hf="model.embed_tokens.weight"),
            Spec(T.PER_LAYER_TOKEN_EMBD, ("ple_embed",), table=True, hf="model.embed_tokens_per_layer.weight"),
            Spec(T.PER_LAYER_MODEL_PROJ, ("ple_model_proj",), 1, hf="model.per_layer_model_projection.weight"),
            Spec(T.PER_LAYER_PROJ_NORM, ("ple_proj_norm",), hf="model.per_layer_projection_norm.weight"),
            Spec(T.OUTPUT_NORM, ("final_norm",), hf="model.norm.weight"),
            Spec(T.OUTPUT, ("lm_head",), 1, hf="lm_head.weight")]


def layer_specs(cfg: Gemma4Config, moe_ffn: bool) -> list[Spec]:
    """One decoder layer (gemma4.cpp load_arch_tensors; HF names as Gemma4TextDecoderLayer's)."""
    s = [Spec(T.ATTN_NORM, ("attn_norm",), hf="input_layernorm.weight"),
         Spec(T.ATTN_Q, ("attn", "wq"), 1, hf="self_attn.q_proj.weight"),
         Spec(T.ATTN_K, ("attn", "wk"), 1, hf="self_attn.k_proj.weight"),
         Spec(T.ATTN_V, ("attn", "wv"), 1, hf="self_attn.v_proj.weight"),
         Spec(T.ATTN_OUT, ("attn", "wo"), 2, hf="self_attn.o_proj.weight"),
         Spec(T.ATTN_Q_NORM, ("attn", "q_norm"), hf="self_attn.q_norm.weight"),
         Spec(T.ATTN_K_NORM, ("attn", "k_norm"), hf="self_attn.k_norm.weight"),
         Spec(T.ATTN_POST_NORM, ("attn_post_norm",), hf="post_attention_layernorm.weight"),
         Spec(T.LAYER_OUT_SCALE, ("out_scale",), hf="layer_scalar"),
         Spec(T.FFN_NORM, ("ffn_norm",), hf="pre_feedforward_layernorm.weight"),
         Spec(T.FFN_GATE, ("mlp", "gate"), 1, hf="mlp.gate_proj.weight"),
         Spec(T.FFN_UP, ("mlp", "up"), 1, hf="mlp.up_proj.weight"),
         Spec(T.FFN_DOWN, ("mlp", "down"), 1, hf="mlp.down_proj.weight"),
         Spec(T.FFN_POST_NORM, ("ffn_post_norm",), hf="post_feedforward_layernorm.weight")]
    if moe_ffn:
        s += [Spec(T.FFN_GATE_INP, ("moe", "experts", "router"), 1, hf="router.proj.weight"),
              Spec(T.FFN_GATE_INP, ("moe", "router_scale"), suffix="scale", hf="router.scale"),
              Spec(T.FFN_PRE_NORM_2, ("moe", "pre_norm"), hf="pre_feedforward_layernorm_2.weight"),
              Spec(T.FFN_POST_NORM_1, ("moe", "post_norm_mlp"), hf="post_feedforward_layernorm_1.weight"),
              Spec(T.FFN_POST_NORM_2, ("moe", "post_norm_moe"), hf="post_feedforward_layernorm_2.weight"),
              Spec(T.FFN_GATE_EXP, ("moe", "experts", "gate"), 1, 1, hf="experts.{e}.gate_proj.weight"),
              Spec(T.FFN_UP_EXP, ("moe", "experts", "up"), 1, 1, hf="experts.{e}.up_proj.weight"),
              Spec(T.FFN_DOWN_EXP, ("moe", "experts", "down"), 1, 1, hf="experts.{e}.down_proj.weight"),
              Spec(T.FFN_DOWN_EXP, ("moe", "expert_scale"), suffix="scale", hf="router.per_expert_scale")]
    s += [Spec(T.PER_LAYER_INP_GATE, ("ple_gate",), 1, hf="per_layer_input_gate.weight"),
          Spec(T.PER_LAYER_PROJ, ("ple_proj",), 1, hf="per_layer_projection.weight"),
          Spec(T.PER_LAYER_POST_NORM, ("ple_norm",), hf="post_per_layer_input_norm.weight")]
    return s


def nextn_specs(cfg: Gemma4Config) -> list[Spec]:
    return []  # the target has no NextN blocks; the assistant's tensors are gemma4_assistant.TOP / LAYER


def constant_tensors(cfg: LayerKinds) -> dict[str, np.ndarray]:
    """Tensors a gemma4 (or gemma4-assistant) GGUF holds that are functions of the config: ``rope_freqs``
    (proportional RoPE's frequency factors: 1 for the pairs that turn, BIG_FREQ_FACTOR for the others), when the
    model has a full layer."""
    if all(cfg.is_swa(i) for i in range(cfg.num_hidden_layers)):
        return {}
    f = np.full(cfg.head_dim // 2, BIG_FREQ_FACTOR, np.float32)
    f[: cfg.rope_angles] = 1.0
    return {"rope_freqs.weight": f}


# ---- HF config.json ------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> Gemma4Config:
    """From a Gemma-4 ``config.json`` (its ``text_config`` when there is one): the full layers' head dim and KV heads
    from ``global_head_dim`` / ``num_global_key_value_heads`` (hub files) or ``per_layer_config`` (what
    Gemma4TextConfig.to_dict writes)."""
    hf = hf.get("text_config") or hf
    L = hf["num_hidden_layers"]
    types = list(hf.get("layer_types") or [])
    if not types:
        types = [SWA if (i + 1) % 6 else FULL for i in range(L)]
        types[-1] = FULL
    head_swa, kv_swa = hf.get("head_dim", 256), hf.get("num_key_value_heads", 4)
    full = [i for i, t in enumerate(types) if t == FULL]
    plc = hf.get("per_layer_config") or {}
    over = plc.get(str(full[0]), plc.get(full[0], {})) if full else {}
    head_full = hf.get("global_head_dim") or over.get("head_dim") or head_swa
    kv_full = kv_swa
    if hf.get("attention_k_eq_v"):
        kv_full = hf.get("num_global_key_value_heads") or over.get("num_key_value_heads") or kv_swa
    rope = hf.get("rope_parameters") or {}
    r_full, r_swa = rope.get(FULL, {}), rope.get(SWA, {})
    for kind, r in ((FULL, r_full), (SWA, r_swa)):
        if r.get("rope_type", "default") not in ("default", "proportional") or r.get("factor", 1.0) != 1.0:
            raise ValueError(f"rope_parameters[{kind}] = {r} is not supported (default / proportional, factor 1)")
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention 'all' (a non-causal encoder) is not supported")
    moe = bool(hf.get("enable_moe_block", False))
    ple = hf.get("hidden_size_per_layer_input", 0) or 0
    if ple and hf.get("vocab_size_per_layer_input", hf["vocab_size"]) != hf["vocab_size"]:
        raise ValueError("vocab_size_per_layer_input must equal vocab_size (llama.cpp's per_layer_token_embd)")
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    return Gemma4Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=L,
        num_attention_heads=hf["num_attention_heads"], num_key_value_heads=kv_full, head_dim=head_full,
        num_key_value_heads_swa=kv_swa, head_dim_swa=head_swa, intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=(hf.get("moe_intermediate_size") or 0) if moe else 0,
        n_routed_experts=(hf.get("num_experts") or 0) if moe else 0,
        num_experts_per_tok=(hf.get("top_k_experts") or 0) if moe else 0, enable_moe_block=moe,
        layer_types=tuple(types), sliding_window=hf.get("sliding_window", 512),
        rope_theta=float(r_full.get("rope_theta", 1e6)), rope_theta_swa=float(r_swa.get("rope_theta", 1e4)),
        partial_rotary_factor=float(r_full.get("partial_rotary_factor", 1.0)),
        num_kv_shared_layers=hf.get("num_kv_shared_layers", 0) or 0, hidden_size_per_layer_input=ple,
        final_logit_softcapping=float(hf.get("final_logit_softcapping") or 0.0),
        attention_k_eq_v=bool(hf.get("attention_k_eq_v", False)),
        use_double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)), rms_norm_eps=float(hf.get("rms_norm_eps",
                                                                                                  1e-6)),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        max_position_embeddings=hf.get("max_position_embeddings", 131072), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos, dtype=dtype,
    )


def config_to_hf(cfg: Gemma4Config) -> dict[str, Any]:
    """transformers' Gemma4TextConfig keys (global_head_dim / num_global_key_value_heads for the full layers)."""
    d = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads_swa, "head_dim": cfg.head_dim_swa,
        "global_head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
        "rope_parameters": {SWA: {"rope_type": "default", "rope_theta": cfg.rope_theta_swa},
                            FULL: {"rope_type": "proportional", "partial_rotary_factor": cfg.partial_rotary_factor,
                                   "rope_theta": cfg.rope_theta}},
        "num_kv_shared_layers": cfg.num_kv_shared_layers, "attention_k_eq_v": cfg.attention_k_eq_v,
        "hidden_size_per_layer_input": cfg.hidden_size_per_layer_input,
        "vocab_size_per_layer_input": cfg.vocab_size, "use_double_wide_mlp": cfg.use_double_wide_mlp,
        "enable_moe_block": cfg.enable_moe_block,
        "final_logit_softcapping": cfg.final_logit_softcapping or None, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) if cfg.eos_token_ids else None,
    }
    if cfg.attention_k_eq_v:
        d["num_global_key_value_heads"] = cfg.num_key_value_heads
    elif cfg.num_key_value_heads != cfg.num_key_value_heads_swa:
        raise ValueError("transformers' Gemma 4 gives full layers their own KV head count only with attention_k_eq_v")
    if cfg.enable_moe_block:
        d |= {"num_experts": cfg.n_routed_experts, "top_k_experts": cfg.num_experts_per_tok,
              "moe_intermediate_size": cfg.moe_intermediate_size}
    return d


# ---- GGUF metadata -------------------------------------------------------------------------------------------


def _kinds_metadata(meta: Metadata, n: int, swa: list[bool]) -> dict[str, Any]:
    """Head dims and KV heads of each kind (llama.cpp: key_length(_swa), per-layer head_count_kv)."""
    A = Keys.Attention
    kv_full, kv_swa = meta.per_kind(A.HEAD_COUNT_KV, n, swa, "KV head count", REQUIRED, 1)
    heads = meta.per_layer(A.HEAD_COUNT, n, REQUIRED, 1)
    if len(set(heads)) != 1:
        raise meta.error(f"key {A.HEAD_COUNT.format(arch=meta.arch)} = {heads}: per-layer query head counts are not "
                         f"supported")
    H = meta.get(A.KEY_LENGTH, REQUIRED, 2, 4096)
    H_swa = meta.get(A.KEY_LENGTH_SWA, REQUIRED, 2, 4096)
    if meta.get(A.VALUE_LENGTH, H) != H or meta.get(A.VALUE_LENGTH_SWA, H_swa) != H_swa:
        raise meta.error("key_length and value_length (and their _swa) must be equal (llama.cpp requires it)")
    return dict(num_attention_heads=heads[0], num_key_value_heads=kv_full, num_key_value_heads_swa=kv_swa,
                head_dim=H, head_dim_swa=H_swa)


def _partial_factor(meta: Metadata, head_dim: int) -> float:
    """partial_rotary_factor from rope_freqs.weight (1 for the pairs that turn, then huge factors), or 1 without."""
    t = meta.tensors.get("rope_freqs.weight")
    if t is None:
        return 1.0
    f = np.asarray(t.data, np.float32).reshape(-1)
    if f.size != head_dim // 2:
        raise meta.error(f"tensor rope_freqs.weight has {f.size} values, expected key_length / 2 = {head_dim // 2}")
    n = int(np.argmax(f != 1.0)) if (f != 1.0).any() else f.size
    if not (np.all(f[:n] == 1.0) and np.all(f[n:] >= 1e20)):
        raise meta.error("tensor rope_freqs.weight: only proportional RoPE (factors 1, then >= 1e20) is supported")
    return 2 * n / head_dim


def config_from_gguf(meta: Metadata, dtype: str = "float32") -> Gemma4Config:
    """gemma4.cpp load_arch_hparams (+ llama-model.cpp load_hparams), range-checked."""
    L_, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    get = meta.get
    n = get(L_.BLOCK_COUNT, REQUIRED, 1, 512)
    if get(L_.NEXTN_PREDICT_LAYERS, 0) != 0:
        raise meta.error("a gemma4 target declares no NextN layers (its drafter is a gemma4-assistant file)")
    swa = [bool(x) for x in meta.per_layer(A.SLIDING_WINDOW_PATTERN, n, REQUIRED, 0, 1)]
    kinds = _kinds_metadata(meta, n, swa)
    n_shared = get(A.SHARED_KV_LAYERS, 0, 0, n - 1)
    if n_shared:  # llama.cpp's reuse rule reads layer n_kv - 2 for sliding layers, n_kv - 1 for full ones
        n_kv = n - n_shared
        if n_kv < 2 or not swa[n_kv - 2] or swa[n_kv - 1]:
            raise meta.error(f"key {A.SHARED_KV_LAYERS.format(arch=ARCH)} = {n_shared}: the last two layers with K/V "
                             f"must be a sliding then a full one (llama.cpp's KV reuse rule)")
    ff = meta.per_layer(L_.FEED_FORWARD_LENGTH, n, REQUIRED, 1)
    base_ff = ff[0]
    double = n_shared > 0 and ff[-1] == 2 * base_ff
    for i, f in enumerate(ff):
        if f != base_ff * (2 if double and i >= n - n_shared else 1):
            raise meta.error(f"key {L_.FEED_FORWARD_LENGTH.format(arch=ARCH)} = {ff}: per-layer MLP sizes other than "
                             f"one size (doubled on the KV-shared layers) are not supported")
    moe = [f"blk.{i}.ffn_gate_inp.weight" in meta.tensors for i in range(n)]
    if any(moe) and not all(moe):
        raise meta.error("layers with and without routed experts in one model are not supported")
    if moe[0] and "blk.0.ffn_gate_up_exps.weight" in meta.tensors:
        raise meta.error("fused ffn_gate_up_exps tensors are not supported (convert with separate gate / up)")
    E = get(L_.EXPERT_COUNT, REQUIRED if moe[0] else 0, 0, 1024)
    tie = "output.weight" not in meta.tensors
    embd = meta.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise meta.error("missing tensor token_embd.weight (or not 2-D)")
    D, V = (int(x) for x in embd.shape)
    T_ = Keys.Tokenizer
    token = lambda k: get(k, None, 0, V - 1)  # noqa: E731
    eos = tuple(dict.fromkeys(i for i in (token(T_.EOS_ID), token(T_.EOT_ID), token(T_.EOM_ID)) if i is not None))
    return meta.build(
        Gemma4Config, vocab_size=V, hidden_size=D, num_hidden_layers=n, **kinds,
        intermediate_size=base_ff, use_double_wide_mlp=double, enable_moe_block=moe[0],
        n_routed_experts=E, num_experts_per_tok=get(L_.EXPERT_USED_COUNT, REQUIRED, 1, E) if moe[0] else 0,
        moe_intermediate_size=get(L_.EXPERT_FEED_FORWARD_LENGTH, REQUIRED, 1) if moe[0] else 0,
        layer_types=tuple(SWA if s else FULL for s in swa), sliding_window=get(A.SLIDING_WINDOW, REQUIRED, 1),
        rope_theta=f32(get(R.FREQ_BASE, 1e6, 1e-30, math.inf)), rope_theta_swa=f32(get(R.FREQ_BASE_SWA, 1e4, 1e-30,
                                                                                      math.inf)),
        partial_rotary_factor=_partial_factor(meta, kinds["head_dim"]), num_kv_shared_layers=n_shared,
        hidden_size_per_layer_input=get(L_.EMBD_LENGTH_PER_LAYER_INP, 0, 0, 65536),
        final_logit_softcapping=f32(get(L_.FINAL_LOGIT_SOFTCAPPING, 0.0, 0.0, math.inf)),
        attention_k_eq_v=all(f"blk.{i}.attn_v.weight" not in meta.tensors for i in range(n) if not swa[i]
                             and i < n - n_shared) and not all(swa),
        rms_norm_eps=f32(get(A.LAYERNORM_RMS_EPS, REQUIRED, 1e-30, 1.0)), tie_word_embeddings=tie,
        max_position_embeddings=get(L_.CONTEXT_LENGTH, 131072, 1), bos_token_id=token(T_.BOS_ID), eos_token_ids=eos,
        dtype=dtype, name=get(Keys.General.NAME, ARCH),
    )


def write_attention_keys(w: gguf.GGUFWriter, cfg: Any, arch: str, n: int) -> None:
    """The attention keys gemma4.cpp and gemma4-assistant.cpp read alike, from a Gemma4Config or a
    Gemma4AssistantConfig (``n`` layers): query heads, per-layer KV heads, both kinds' head dims, RoPE dims and bases
    (full layers rotate the whole head; rope_freqs stops most pairs), the window and the sliding pattern."""
    key = lambda k: k.format(arch=arch)  # noqa: E731
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.dims(cfg.is_swa(i))[0] for i in range(n)])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_theta_swa)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_uint32(key(Keys.Attention.KEY_LENGTH_SWA), cfg.head_dim_swa)
    w.add_uint32(key(Keys.Attention.VALUE_LENGTH_SWA), cfg.head_dim_swa)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_uint32(key(Keys.Rope.DIMENSION_COUNT_SWA), cfg.head_dim_swa)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.is_swa(i) for i in range(n)])


def write_gguf_metadata(w: gguf.GGUFWriter, cfg: Gemma4Config, ftype: gguf.LlamaFileType) -> None:
    """The keys gemma4.cpp reads (per-layer head_count_kv / feed_forward_length arrays, the bool sliding pattern)."""
    L = cfg.num_hidden_layers
    key = lambda k: k.format(arch=ARCH)  # noqa: E731
    w.add_name(cfg.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(L)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length([cfg.ffn_size(i) for i in range(L)])
    write_attention_keys(w, cfg, ARCH, L)
    w.add_uint32(key(Keys.Attention.SHARED_KV_LAYERS), cfg.num_kv_shared_layers)
    w.add_uint32(key(Keys.LLM.EMBD_LENGTH_PER_LAYER_INP), cfg.hidden_size_per_layer_input)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


_GRAPH, _ASSISTANT_GRAPH = "mtp_jax.families.gemma4_graph", "mtp_jax.families.gemma4_assistant_graph"  # (jax)
_ASSISTANT = "mtp_jax.families.gemma4_assistant"  # (it imports this module)
FAMILY = families.register(families.Family(
    arch=ARCH, hf_model_types=("gemma4_text", "gemma4"), hf_architecture="Gemma4ForCausalLM", config=Gemma4Config,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, config_from_gguf=config_from_gguf,
    write_gguf_metadata=write_gguf_metadata, top_specs=top_specs, layer_specs=layer_specs, nextn_specs=nextn_specs,
    abstract=abstract, forward=families.Lazy(_GRAPH, "forward"), head_forward=families.Lazy(_GRAPH, "head_forward"),
    drafter=families.Lazy(_ASSISTANT_GRAPH, "Assistant"), tiny="gemma4-tiny", stacks=stacks,
    init_cache=families.Lazy(_GRAPH, "init_cache"), constant_tensors=constant_tensors,
    read_head=families.Lazy(_ASSISTANT_GRAPH, "read_head"),
    write_head=families.Lazy(_ASSISTANT, "write_assistant_gguf"),
    head_imatrix=families.Lazy(_ASSISTANT, "imatrix_entries"),
))
