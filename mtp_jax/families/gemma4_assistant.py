"""The Gemma-4 MTP assistant (HF ``Gemma4AssistantForCausalLM``, GGUF arch ``gemma4-assistant``): a small model of
its own width whose layers have queries only and attend into the target's KV cache, drafting every step of a
speculative step at the newest token's position. Its weights sit in a file of their own (``--mtp-head``), in memory
as the target's ``params.nextn``.

Checked against llama.cpp (llama-cpp-python 0.3.36) src/models/gemma4-assistant.cpp (graph), llama-model.cpp
``create_memory`` (its sliding layers read target layer n_layer - 2's cache, its full layers n_layer - 1's, which is
the last layer of each kind with K/V when the target ends sliding, full as Gemma 4 does), common/speculative.cpp
(draft-mtp: every draft at the same position, the first from the target's hidden after output_norm), and
transformers models/gemma4_assistant (the same, plus the centroid shortlist head, ``use_ordered_embeddings``, which
llama.cpp's converter drops).

This module is the description (config, tensor table, abstract tree, its GGUF's metadata and tensor check, its
writer, imatrix names), which imports no jax (the writer does when it runs, through io.gguf); the graph, the drafter
and the weights' readers are gemma4_assistant_graph.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from mtp_jax import params as P
from mtp_jax.families.gemma4 import (FULL, SWA, G4Attention, G4Layer, Gemma4Config, LayerKinds, _partial_factor,
                                     constant_tensors, write_attention_keys)
from mtp_jax.io.gguf_model import Metadata, f32
from mtp_jax.io.table import Spec, T
from mtp_jax.io.validate import REQUIRED, dequantizable
from mtp_jax.params import ArrayInfo
from mtp_jax.pytree import pytree_dataclass


@dataclass(frozen=True, kw_only=True)
class Gemma4AssistantConfig(LayerKinds):
    """The MTP assistant (HF Gemma4AssistantForCausalLM, GGUF arch ``gemma4-assistant``): query-only layers that
    attend into the target's cache (a sliding layer into the target's last sliding layer with K/V, a full one into
    its last full one), so their head dims and KV heads are the target's; its own width, query heads and MLP.

    ``swa_keys``: how many of the newest cached entries a sliding layer sees. The draft query sits at the newest
    token's position p, which is not cached yet; llama.cpp masks keys j <= p - W out (so W - 1 of them), transformers'
    Gemma4Assistant sees the last W + 1 cached entries. ``"llama.cpp"`` or ``"transformers"``."""

    hidden_size: int  # the assistant's width
    backbone_hidden_size: int  # the target's
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_theta_swa: float = 10000.0
    partial_rotary_factor: float = 0.25
    sliding_window: int = 512
    head_dim: int = 512  # full layers' (= the target's)
    head_dim_swa: int = 256
    num_key_value_heads: int = 1  # full layers' (= the target's), for the query grouping
    num_key_value_heads_swa: int = 1
    use_ordered_embeddings: bool = False  # the centroid shortlist head (HF Gemma4AssistantMaskedEmbedder)
    num_centroids: int = 2048
    centroid_top_k: int = 32
    swa_keys: str = "llama.cpp"

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        L = self.num_hidden_layers
        if len(self.layer_types) != L or any(t not in (FULL, SWA) for t in self.layer_types):
            raise ValueError(f"Gemma4AssistantConfig.layer_types must list {L} items of {FULL!r} / {SWA!r}")
        for name in ("hidden_size", "backbone_hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "vocab_size", "sliding_window", "head_dim", "head_dim_swa",
                     "num_key_value_heads", "num_key_value_heads_swa"):
            if getattr(self, name) < 1:
                raise ValueError(f"Gemma4AssistantConfig.{name} must be positive, got {getattr(self, name)}")
        if self.swa_keys not in ("llama.cpp", "transformers"):
            raise ValueError(f"swa_keys must be 'llama.cpp' or 'transformers', got {self.swa_keys!r}")
        if self.use_ordered_embeddings and (self.vocab_size % self.num_centroids
                                            or not 0 < self.centroid_top_k <= self.num_centroids):
            raise ValueError(f"ordered embeddings: vocab_size {self.vocab_size} must be a multiple of num_centroids "
                             f"{self.num_centroids}, and 0 < centroid_top_k <= num_centroids")

    def check_target(self, target: "Gemma4Config") -> None:
        """The cache the assistant reads must be the target's: same dims per kind, a layer of each kind it uses."""
        if self.backbone_hidden_size != target.hidden_size or self.vocab_size != target.vocab_size:
            raise ValueError(f"the assistant is for a target of hidden size {self.backbone_hidden_size} and vocab "
                             f"{self.vocab_size}, the model has {target.hidden_size} and {target.vocab_size}")
        for swa in {self.is_swa(i) for i in range(self.num_hidden_layers)}:
            kind = "sliding" if swa else "full"
            if self.dims(swa) != target.dims(swa):
                raise ValueError(f"the assistant's {kind} layers expect (KV heads, head dim) {self.dims(swa)}, the "
                                 f"target's are {target.dims(swa)}")
            if target.last_with_kv(swa) is None:
                raise ValueError(f"the assistant has {kind} layers but the target has no {kind} layer with K/V")
        if self.num_attention_heads % max(self.num_key_value_heads, self.num_key_value_heads_swa):
            raise ValueError("the assistant's query heads must be a multiple of the target's KV heads")


# ---- parameters ----------------------------------------------------------------------------------------------


@pytree_dataclass
class Gemma4AssistantParams:
    """The assistant's weights (in memory as the target's ``params.nextn``)."""

    embed: Any  # [V, Da]  its own table: the tied output head (the input embedding is the target's)
    pre_proj: Any  # [2 Db, Da]  [target_embed(t) sqrt(Db); h] -> Da
    post_proj: Any  # [Da, Db]   next hidden
    final_norm: Any  # [Da]
    swa_layers: Any  # G4Layer stacked (query-only attention), or None
    full_layers: Any
    centroids: Any = None  # [Da, C]  ordered embeddings
    ordering: Any = None  # [V] int32: token ids grouped by centroid (C rows of V / C)


def assistant_stacks(acfg: Gemma4AssistantConfig) -> list[tuple[str, tuple[int, ...]]]:
    return [(attr, tuple(i for i in range(acfg.num_hidden_layers) if acfg.is_swa(i) == swa))
            for attr, swa in (("swa_layers", True), ("full_layers", False))]


def assistant_abstract(acfg: Gemma4AssistantConfig) -> Gemma4AssistantParams:
    Da, Db, V, N = acfg.hidden_size, acfg.backbone_hidden_size, acfg.vocab_size, acfg.num_attention_heads
    norm = lambda n: ArrayInfo((n,), ("norm",), "ones")  # noqa: E731

    def layer(swa: bool) -> G4Layer:
        H = acfg.dims(swa)[1]
        attn = G4Attention(wq=ArrayInfo((Da, N, H), ("embed", "q_heads", "head_dim")),
                           wo=ArrayInfo((N, H, Da), ("q_heads", "head_dim", "embed")),
                           q_norm=ArrayInfo((H,), ("head_dim",), "ones"))
        return G4Layer(attn_norm=norm(Da), attn=attn, attn_post_norm=norm(Da), ffn_norm=norm(Da),
                       mlp=P.mlp(Da, acfg.intermediate_size), ffn_post_norm=norm(Da),
                       out_scale=ArrayInfo((1,), (None,), "ones"))

    st = {attr: P.stack(layer(attr == "swa_layers"), len(ids)) if ids else None
          for attr, ids in assistant_stacks(acfg)}
    ordered = acfg.use_ordered_embeddings
    return Gemma4AssistantParams(
        embed=ArrayInfo((V, Da), ("vocab", "embed")), pre_proj=ArrayInfo((2 * Db, Da), (None, "embed")),
        post_proj=ArrayInfo((Da, Db), ("embed", None)), final_norm=norm(Da),
        centroids=ArrayInfo((Da, acfg.num_centroids), ("embed", None)) if ordered else None,
        ordering=ArrayInfo((V,), (None,), "permutation") if ordered else None, **st)


# ---- its GGUF (arch gemma4-assistant) ------------------------------------------------------------------------

ARCH = "gemma4-assistant"


@dataclass(frozen=True)
class Tensor:
    """One tensor of the assistant's file: its GGUF name ({bid}: the layer), leaf path, and layout (io.table.Spec's
    n_in: None = a vector or table stored as is, k = a matrix whose first k dims are inputs)."""

    name: str
    path: tuple[str, ...]
    n_in: int | None = None

    def spec(self) -> Spec:
        return Spec(T.TOKEN_EMBD, self.path, self.n_in, table=self.n_in is None)


TOP = (Tensor("token_embd.weight", ("embed",)), Tensor("output_norm.weight", ("final_norm",)),
       Tensor("nextn.pre_projection.weight", ("pre_proj",), 1),
       Tensor("nextn.post_projection.weight", ("post_proj",), 1),
       Tensor("masked_embd_centroids.weight", ("centroids",), 1),
       Tensor("masked_embd_ordering", ("ordering",)))
LAYER = (Tensor("blk.{bid}.attn_norm.weight", ("attn_norm",)), Tensor("blk.{bid}.attn_q.weight", ("attn", "wq"), 1),
         Tensor("blk.{bid}.attn_output.weight", ("attn", "wo"), 2),
         Tensor("blk.{bid}.attn_q_norm.weight", ("attn", "q_norm")),
         Tensor("blk.{bid}.post_attention_norm.weight", ("attn_post_norm",)),
         Tensor("blk.{bid}.layer_output_scale.weight", ("out_scale",)),
         Tensor("blk.{bid}.ffn_norm.weight", ("ffn_norm",)), Tensor("blk.{bid}.ffn_gate.weight", ("mlp", "gate"), 1),
         Tensor("blk.{bid}.ffn_up.weight", ("mlp", "up"), 1), Tensor("blk.{bid}.ffn_down.weight", ("mlp", "down"), 1),
         Tensor("blk.{bid}.post_ffw_norm.weight", ("ffn_post_norm",)))
HF_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "pre_proj": "pre_projection.weight", "post_proj": "post_projection.weight",
            "centroids": "masked_embedding.centroids.weight", "ordering": "masked_embedding.token_ordering",
            "attn_norm": "input_layernorm.weight", "attn.wq": "self_attn.q_proj.weight",
            "attn.wo": "self_attn.o_proj.weight", "attn.q_norm": "self_attn.q_norm.weight",
            "attn_post_norm": "post_attention_layernorm.weight", "out_scale": "layer_scalar",
            "ffn_norm": "pre_feedforward_layernorm.weight", "mlp.gate": "mlp.gate_proj.weight",
            "mlp.up": "mlp.up_proj.weight", "mlp.down": "mlp.down_proj.weight",
            "ffn_post_norm": "post_feedforward_layernorm.weight"}


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


def tensor_slots(acfg: Gemma4AssistantConfig, params_or_template) -> list[tuple[str, Tensor, str | None, int | None]]:
    """(GGUF name, tensor, stack attribute or None, index in the stack) of every tensor the assistant holds, in the
    order llama.cpp's converter writes them (top tensors first, then the layers)."""
    out = [(t.name, t, None, None) for t in TOP if _get(params_or_template, t.path) is not None]
    where = {i: (attr, j) for attr, ids in assistant_stacks(acfg) for j, i in enumerate(ids)}
    for i in range(acfg.num_hidden_layers):
        attr, j = where[i]
        out += [(t.name.format(bid=i), t, attr, j) for t in LAYER]
    return out


def slot_leaf(params, attr, t: Tensor):
    return _get(params, t.path) if attr is None else _get(getattr(params, attr), t.path)


def write_assistant_gguf(path, cfg: Gemma4Config, params, outtype: str = "f32", tokenizer=None):
    """The attached assistant as llama.cpp's gemma4-assistant GGUF (the keys gemma4-assistant.cpp and llama-model.cpp
    read; its sliding and full dims are the target's). Written to a temporary file and renamed."""
    from mtp_jax.io.gguf import OUTTYPES, GGUFError, _encode  # (it imports jax)

    acfg, ap = cfg.assistant, params.nextn
    if acfg is None or ap is None:
        raise GGUFError(f"{path}: the model has no assistant to write")
    qtype, ftype = OUTTYPES[outtype]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, ARCH)
    key = lambda k: k.format(arch=ARCH)  # noqa: E731
    L = acfg.num_hidden_layers
    try:
        w.add_name(f"{cfg.name}-assistant")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_block_count(L)
        w.add_nextn_predict_layers(L)  # every block is a draft block: n_layer() == 0 (gemma4-assistant.cpp)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(acfg.hidden_size)
        w.add_uint32(key(Keys.LLM.EMBEDDING_LENGTH_OUT), acfg.backbone_hidden_size)
        w.add_feed_forward_length(acfg.intermediate_size)
        write_attention_keys(w, acfg, ARCH, L)
        w.add_uint32(key(Keys.Attention.SHARED_KV_LAYERS), 0)
        w.add_uint32(key(Keys.LLM.EMBD_LENGTH_PER_LAYER_INP), 0)
        if acfg.use_ordered_embeddings:
            w.add_uint32(f"{ARCH}.num_centroids", acfg.num_centroids)
            w.add_uint32(f"{ARCH}.centroid_top_k", acfg.centroid_top_k)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            tokenizer.add_to_gguf(w, acfg.vocab_size)
        else:
            w.add_tokenizer_model("none")
        data = []
        for name, t, attr, j in tensor_slots(acfg, ap):
            x = np.asarray(slot_leaf(ap, attr, t))
            x = x if j is None else x[j]
            if t.path == ("ordering",):
                y = shaped = np.ascontiguousarray(x, np.int32)
                ty = GGMLQuantizationType.I32
            else:
                shaped = t.spec().to_gguf(x)
                ty = t.spec().ggml_type(name, shaped.ndim, qtype)  # convert_hf_to_gguf's rule: 1-D and norms F32
                y = _encode(shaped, ty)
            shape = shaped.shape
            bs, ts = GGML_QUANT_SIZES[ty]
            w.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // bs * ts, raw_dtype=ty)
            data.append(y)
        for name, f in constant_tensors(acfg).items():
            w.add_tensor_info(name, f.shape, np.dtype(np.float32), f.nbytes, raw_dtype=GGMLQuantizationType.F32)
            data.append(f)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for y in data:
            w.write_tensor_data(y)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path




def config_from_gguf(meta: Metadata, target: Gemma4Config) -> Gemma4Config:
    """A gemma4-assistant GGUF's metadata (and its tensors' shapes where they set dims) -> ``target``'s config with
    the assistant (GGUFError naming the file and the key; one that does not fit the target says so)."""
    A, R, L_ = Keys.Attention, Keys.Rope, Keys.LLM
    get = meta.get
    n = get(L_.BLOCK_COUNT, REQUIRED, 1, 512)
    if get(L_.NEXTN_PREDICT_LAYERS, REQUIRED, 0, n) != n:
        raise meta.error(f"key {L_.NEXTN_PREDICT_LAYERS.format(arch=ARCH)} must equal block_count ({n})")
    swa = [bool(x) for x in meta.per_layer(A.SLIDING_WINDOW_PATTERN, n, REQUIRED, 0, 1)]
    kv_full, kv_swa = meta.per_kind(A.HEAD_COUNT_KV, n, swa, "KV head count", REQUIRED, 1)
    embd = meta.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise meta.error("missing tensor token_embd.weight (or not 2-D)")
    Da, V = (int(x) for x in embd.shape)
    ordered = "masked_embd_centroids.weight" in meta.tensors and "masked_embd_ordering" in meta.tensors
    C = int(meta.tensors["masked_embd_centroids.weight"].shape[1]) if ordered else 2048
    H = get(A.KEY_LENGTH, REQUIRED, 2, 4096)
    H_swa = get(A.KEY_LENGTH_SWA, REQUIRED, 2, 4096)
    partial = _partial_factor(meta, H) if "rope_freqs.weight" in meta.tensors else target.partial_rotary_factor
    try:
        acfg = Gemma4AssistantConfig(
            hidden_size=Da, backbone_hidden_size=get(L_.EMBEDDING_LENGTH_OUT, REQUIRED, 1), num_hidden_layers=n,
            layer_types=tuple(SWA if s else FULL for s in swa), num_attention_heads=get(A.HEAD_COUNT, REQUIRED, 1),
            intermediate_size=get(L_.FEED_FORWARD_LENGTH, REQUIRED, 1), vocab_size=V,
            rms_norm_eps=f32(get(A.LAYERNORM_RMS_EPS, REQUIRED, 1e-30, 1.0)),
            rope_theta=f32(get(R.FREQ_BASE, 1e6, 1e-30, math.inf)),
            rope_theta_swa=f32(get(R.FREQ_BASE_SWA, 1e4, 1e-30, math.inf)), partial_rotary_factor=partial,
            sliding_window=get(A.SLIDING_WINDOW, REQUIRED, 1), head_dim=H, head_dim_swa=H_swa,
            num_key_value_heads=kv_full, num_key_value_heads_swa=kv_swa,
            use_ordered_embeddings=ordered, num_centroids=C,
            centroid_top_k=get(f"{ARCH}.centroid_top_k", 32, 1, C) if ordered else 32)
        return target.replace(assistant=acfg)
    except ValueError as e:
        raise meta.error(f"does not fit the target model: {e}") from None


def slot_shape(template: Gemma4AssistantParams, attr: str | None, t: Tensor, j: int | None) -> tuple[int, ...]:
    """A tensor's shape in our layout (a stacked layer's without its layer axis)."""
    shape = slot_leaf(template, attr, t).shape
    return tuple(shape if j is None else shape[1:])


def check_tensors(meta: Metadata, acfg: Gemma4AssistantConfig) -> None:
    """The file's tensors against the assistant's table (tensor_slots, and rope_freqs): each one there, of its shape
    and of a type gguf-py dequantizes (the ordering I32), and no other (GGUFError naming the file and the tensor)."""
    template = assistant_abstract(acfg)
    slots = tensor_slots(acfg, template)
    for name in meta.tensors.keys() - {s[0] for s in slots} - {"rope_freqs.weight"}:
        raise meta.error(f"unexpected tensor {name}: not part of a {ARCH} model of {acfg.num_hidden_layers} layers")
    for name, t, attr, j in slots:
        g = meta.tensors.get(name)
        if g is None:
            raise meta.error(f"missing tensor {name}")
        want = t.spec().gguf_shape(slot_shape(template, attr, t, j))
        got = tuple(int(d) for d in reversed(g.shape.tolist()))
        if got != want:
            raise meta.error(f"tensor {name} has shape {list(got)} (numpy order), expected {list(want)}")
        if t.path == ("ordering",):
            if g.tensor_type != GGMLQuantizationType.I32:
                raise meta.error(f"tensor {name} has type {g.tensor_type.name}, expected I32")
        elif not dequantizable(g.tensor_type):
            raise meta.error(f"tensor {name} has type {g.tensor_type.name}, which gguf-py cannot dequantize")


# ---- HF (Gemma4AssistantForCausalLM) -------------------------------------------------------------------------


def assistant_config_from_hf(hf: dict, target: Gemma4Config, swa_keys: str = "transformers") -> Gemma4AssistantConfig:
    """From a Gemma4AssistantConfig dict (its ``text_config`` holds the drafter's layers); dims as the target's."""
    from mtp_jax.families.gemma4 import config_from_hf

    text = hf.get("text_config") or {}
    t = config_from_hf(text | {"num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
                               "enable_moe_block": False, "use_double_wide_mlp": False})
    return Gemma4AssistantConfig(
        hidden_size=t.hidden_size, backbone_hidden_size=hf.get("backbone_hidden_size", target.hidden_size),
        num_hidden_layers=t.num_hidden_layers, layer_types=t.layer_types, num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size, vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, rope_theta_swa=t.rope_theta_swa, partial_rotary_factor=t.partial_rotary_factor,
        sliding_window=t.sliding_window, head_dim=target.head_dim, head_dim_swa=target.head_dim_swa,
        num_key_value_heads=target.num_key_value_heads, num_key_value_heads_swa=target.num_key_value_heads_swa,
        use_ordered_embeddings=bool(hf.get("use_ordered_embeddings", False)),
        num_centroids=hf.get("num_centroids", 2048), centroid_top_k=hf.get("centroid_intermediate_top_k", 32),
        swa_keys=swa_keys)


def imatrix_entries(stats: dict, params, cfg: Gemma4Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """assistant_forward's statistics -> {the assistant file's tensor name: (in_sum2 [1, C], counts [1])} for every
    matrix it multiplies by (the tied output table included: it is the assistant's output head)."""
    acfg = cfg.assistant
    out = {}
    for name, t, attr, j in tensor_slots(acfg, params.nextn):
        if t.n_in is None and t.path != ("embed",):
            continue
        st = stats.get(attr or "top", {}).get(".".join(t.path))
        if st is None:
            continue
        s, c = (st["sum2"], st["count"]) if j is None else (st["sum2"][j], st["count"][j])
        out[name] = (np.asarray(s, np.float64)[None], np.asarray(c, np.float64).reshape(1))
    return out

