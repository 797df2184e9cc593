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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import params as P
from mtp_jax.families.gemma4 import (FULL, SWA, G4Attention, G4Layer, Gemma4Config, Gemma4Params, LayerKinds,
                                     _partial_factor, constant_tensors, write_attention_keys)
from mtp_jax.families.gemma4_graph import attend_cache, cache_slot, forward, init_cache, rope_pairs
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import at, mlp, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype, linear
from mtp_jax.model import valid_mask
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


# ---- the assistant drafter -----------------------------------------------------------------------------------


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


def _masked_logits(h: jax.Array, ap: Gemma4AssistantParams, acfg: Gemma4AssistantConfig) -> jax.Array:
    """The centroid shortlist head (HF Gemma4AssistantMaskedEmbedder): the top-k centroids of h pick k clusters of
    V / C token ids (``ordering`` viewed [C, V / C]); those ids get their lm-head logits, every other id the smallest
    of them over the whole batch minus 1. h [B, T, Da] -> [B, T, V] float32."""
    B, T, _ = h.shape
    C, K, V = acfg.num_centroids, acfg.centroid_top_k, acfg.vocab_size
    hf = h.astype(jnp.float32)
    _, top = jax.lax.top_k(linear(hf, ap.centroids), K)  # [B, T, K]
    ids = ap.ordering.astype(jnp.int32).reshape(C, V // C)[top].reshape(B, T, K * (V // C))
    sel = jnp.einsum("btd,btnd->btn", hf, ap.embed[ids].astype(jnp.float32))
    out = jnp.full((B, T, V), sel.min() - 1.0, jnp.float32)
    return out.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], ids].set(sel)


def assistant_forward(params: Gemma4Params, h, tokens, trunk: KVCache, positions, cfg: Gemma4Config,
                      collect_stats: bool = False, mask=None):
    """The assistant on pairs (h_{p-1}, t_p) at positions p: h [B, T, Db] the target's final-normed hidden (or the
    previous draft step's next hidden), tokens [B, T], positions [B, T]. Each query reads the target's cached
    entries at positions < p (its sliding layers only the newest ones, ``swa_keys``), writes nothing.
    -> (next hidden [B, T, Db], logits [B, T, V] float32, stats)."""
    ap, acfg = params.nextn, cfg.assistant
    B, T = tokens.shape
    eps = acfg.rms_norm_eps
    mask = jnp.ones((B, T), bool) if mask is None else mask
    dt = compute_dtype(cfg.dtype)
    e = params.embed[tokens].astype(dt) * jnp.asarray(cfg.hidden_size ** 0.5, dt)  # the target's scaled embedding
    eh = jnp.concatenate([e, h.astype(dt)], axis=-1)  # [B, T, 2 Db]
    x = linear(eh, ap.pre_proj)
    stats: dict[str, Any] = {}
    where = {i: (attr, j) for attr, ids in assistant_stacks(acfg) for j, i in enumerate(ids)}
    key_pos = jnp.arange(trunk.size)[None, None, :]
    query_pos = positions[:, :, None]
    for i in range(acfg.num_hidden_layers):
        attr, j = where[i]
        lp, swa = getattr(ap, attr), acfg.is_swa(i)
        c, ci = cache_slot(cfg, cfg.last_with_kv(swa))
        xn = rms_norm(x, at(lp.attn_norm, j), eps)
        N, H = lp.attn.wq.shape[-2:]
        q = linear(xn, lp.attn.wq.reshape(*lp.attn.wq.shape[:-2], -1), j).reshape(B, T, N, H)
        q = rope_pairs(rms_norm(q, at(lp.attn.q_norm, j), eps), positions, acfg.rope_freqs(swa))
        visible = key_pos < query_pos
        if swa:
            n_keys = acfg.sliding_window - 1 if acfg.swa_keys == "llama.cpp" else acfg.sliding_window + 1
            visible &= key_pos >= query_pos - n_keys
        o = attend_cache(q, trunk.k[c], trunk.v[c], ci, visible).reshape(B, T, N * H)
        a = linear(o, lp.attn.wo.reshape(*lp.attn.wo.shape[:-3], N * H, -1), j)
        x = x + rms_norm(a, at(lp.attn_post_norm, j), eps)
        f, f_stats = mlp(rms_norm(x, at(lp.ffn_norm, j), eps), lp.mlp, mask, collect_stats, prefix="mlp.", li=j,
                         act="gelu")
        if collect_stats:
            st = {"attn.wq": sum_squares(xn, mask), "attn.wo": sum_squares(o, mask)} | f_stats
            stats.setdefault(attr, []).append(st)
        x = (x + rms_norm(f, at(lp.ffn_post_norm, j), eps)) * at(lp.out_scale, j).astype(x.dtype)
    hn = rms_norm(x, ap.final_norm, eps)
    if acfg.use_ordered_embeddings:
        logits = _masked_logits(hn, ap, acfg)
    else:
        logits = linear(hn.astype(jnp.float32), ap.embed, trans=True)
    nxt = linear(hn, ap.post_proj)
    if collect_stats:
        stats = {a: jax.tree.map(lambda *xs: jnp.stack(xs), *v) for a, v in stats.items()}
        top = {"pre_proj": sum_squares(eh, mask), "post_proj": sum_squares(hn, mask), "embed": sum_squares(hn, mask)}
        if acfg.use_ordered_embeddings:
            top["centroids"] = sum_squares(hn, mask)
        stats["top"] = top
    return nxt, logits, stats


@pytree_dataclass
class AssistantState:
    """The assistant owns no cache; the loop still carries a drafter state (lengths, for the interface)."""

    lengths: Any  # [B] int32, unused by the assistant

    def with_lengths(self, lengths) -> "AssistantState":
        return AssistantState(lengths.astype(jnp.int32))


@dataclass(frozen=True)
class Assistant:
    """The Gemma-4 assistant as a drafter (drafter.py's protocol): every draft step of a speculative step runs the
    assistant at the same position p (the newest token's, not cached yet) over the target's cache, which it reads
    and never writes: step 1 on (h_{p-1}, t_p) with the target's final-normed hidden, step i + 1 on (its step i
    next hidden, d_i) (llama.cpp common/speculative.cpp, transformers SinglePositionMultiTokenCandidateGenerator).
    Nothing rolls back."""

    cfg: Any
    num_draft: int | None = None

    @property
    def max_drafts(self) -> int | None:
        return None

    def init_cache(self, batch: int, size: int, k_type: str | None = None, v_type: str | None = None):
        return AssistantState(jnp.zeros((batch,), jnp.int32))

    def prefill(self, params, state, h, tokens, n_valid, trunk=None):
        return state

    def _run(self, params, h, token, trunk):
        nxt, logits, _ = assistant_forward(params, h, token[:, None], trunk, trunk.lengths[:, None], self.cfg)
        return nxt, logits

    def catch_up(self, params, state, pend_h, pend_tok, n_pend, trunk=None):
        from mtp_jax.model import take_last

        h = take_last(pend_h, n_pend)  # [B, 1, Db] h_{p-1}
        tok = take_last(pend_tok[..., None], n_pend)[:, 0, 0]  # [B] t_p
        nxt, logits = self._run(params, h, tok, trunk)
        return nxt, logits, state

    def step(self, params, state, g, token, i, trunk=None):
        nxt, logits = self._run(params, g, token, trunk)
        return nxt, logits, state

    def commit(self, state, before):
        return state

    def keep(self, new, old, rows):
        return new

    def teacher_forced(self, params, h, tokens, n_valid, collect_stats: bool = False):
        """The assistant on every pair (h_{j-1}, t_j) of known text, each query at j over the target's entries < j
        (a trunk forward over the text fills them) -> [(logits [B, T, V] predicting t_{j+1}, stats)]."""
        from mtp_jax.mtp import shift_hidden

        B, T = tokens.shape
        cache = init_cache(self.cfg, B, T)
        _, _, cache, _ = forward(params, tokens, cache, self.cfg, n_valid, logits="none")
        _, logits, stats = assistant_forward(params, shift_hidden(h), tokens, cache, jnp.broadcast_to(
            jnp.arange(T)[None, :], (B, T)), self.cfg, collect_stats, valid_mask(T, n_valid))
        return [(logits, stats)]


# ---- its GGUF (arch gemma4-assistant) ------------------------------------------------------------------------

ARCH = "gemma4-assistant"


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the assistant's file: its GGUF name ({bid}: the layer), leaf path, and layout (io.table.Spec's
    n_in: None = a vector or table stored as is, k = a matrix whose first k dims are inputs)."""

    name: str
    path: tuple[str, ...]
    n_in: int | None = None

    def spec(self):
        from mtp_jax.io.table import Spec, T

        return Spec(T.TOKEN_EMBD, self.path, self.n_in, table=self.n_in is None)


TOP = (_Tensor("token_embd.weight", ("embed",)), _Tensor("output_norm.weight", ("final_norm",)),
       _Tensor("nextn.pre_projection.weight", ("pre_proj",), 1),
       _Tensor("nextn.post_projection.weight", ("post_proj",), 1),
       _Tensor("masked_embd_centroids.weight", ("centroids",), 1),
       _Tensor("masked_embd_ordering", ("ordering",)))
LAYER = (_Tensor("blk.{bid}.attn_norm.weight", ("attn_norm",)), _Tensor("blk.{bid}.attn_q.weight", ("attn", "wq"), 1),
         _Tensor("blk.{bid}.attn_output.weight", ("attn", "wo"), 2),
         _Tensor("blk.{bid}.attn_q_norm.weight", ("attn", "q_norm")),
         _Tensor("blk.{bid}.post_attention_norm.weight", ("attn_post_norm",)),
         _Tensor("blk.{bid}.layer_output_scale.weight", ("out_scale",)),
         _Tensor("blk.{bid}.ffn_norm.weight", ("ffn_norm",)), _Tensor("blk.{bid}.ffn_gate.weight", ("mlp", "gate"), 1),
         _Tensor("blk.{bid}.ffn_up.weight", ("mlp", "up"), 1), _Tensor("blk.{bid}.ffn_down.weight", ("mlp", "down"), 1),
         _Tensor("blk.{bid}.post_ffw_norm.weight", ("ffn_post_norm",)))
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


def tensor_slots(acfg: Gemma4AssistantConfig, params_or_template) -> list[tuple[str, _Tensor, str | None, int | None]]:
    """(GGUF name, tensor, stack attribute or None, index in the stack) of every tensor the assistant holds, in the
    order llama.cpp's converter writes them (top tensors first, then the layers)."""
    out = [(t.name, t, None, None) for t in TOP if _get(params_or_template, t.path) is not None]
    where = {i: (attr, j) for attr, ids in assistant_stacks(acfg) for j, i in enumerate(ids)}
    for i in range(acfg.num_hidden_layers):
        attr, j = where[i]
        out += [(t.name.format(bid=i), t, attr, j) for t in LAYER]
    return out


def _leaf(params, attr, t: _Tensor):
    return _get(params, t.path) if attr is None else _get(getattr(params, attr), t.path)


def write_assistant_gguf(path, cfg: Gemma4Config, params, outtype: str = "f32", tokenizer=None):
    """The attached assistant as llama.cpp's gemma4-assistant GGUF (the keys gemma4-assistant.cpp and llama-model.cpp
    read; its sliding and full dims are the target's). Written to a temporary file and renamed."""
    import os
    from pathlib import Path

    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

    from mtp_jax.io.gguf import OUTTYPES, GGUFError, _encode

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
            x = np.asarray(_leaf(ap, attr, t))
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


def read_assistant_gguf(path, target: Gemma4Config, dtype: str | None = None, check_finite: bool = True):
    """A gemma4-assistant GGUF for ``target`` -> (target config with the assistant, assistant params). Keys and
    tensors are checked (GGUFError naming the file and the key or tensor); any type gguf-py dequantizes is read."""
    import gguf
    from gguf import GGMLQuantizationType, Keys

    from mtp_jax.io.gguf_model import Metadata, f32
    from mtp_jax.io.validate import REQUIRED, dequantizable, open_reader
    from mtp_jax.io.validate import check_finite as finite

    reader = open_reader(path)
    meta = Metadata(reader, path, ARCH)
    get = meta.get
    A, R, L_ = Keys.Attention, Keys.Rope, Keys.LLM
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
        cfg = target.replace(assistant=acfg)
    except ValueError as e:
        raise meta.error(f"does not fit the target model: {e}") from None
    dtype = dtype or target.dtype
    tensors = {t.name: t for t in reader.tensors}
    expected = {name for name, *_ in tensor_slots(acfg, assistant_abstract(acfg))} | {"rope_freqs.weight"}
    for name in tensors.keys() - expected:
        raise meta.error(f"unexpected tensor {name}: not part of a {ARCH} model of {n} layers")

    def fetch(name: str, t: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
        g = tensors.get(name)
        if g is None:
            raise meta.error(f"missing tensor {name}")
        want = tuple(t.spec().gguf_shape(shape))
        got = tuple(int(d) for d in reversed(g.shape.tolist()))
        if got != want:
            raise meta.error(f"tensor {name} has shape {list(got)} (numpy order), expected {list(want)}")
        if t.path == ("ordering",):
            if g.tensor_type != GGMLQuantizationType.I32:
                raise meta.error(f"tensor {name} has type {g.tensor_type.name}, expected I32")
            y = np.asarray(g.data, np.int32).reshape(-1)
            if not np.array_equal(np.sort(y), np.arange(V)):
                raise meta.error(f"tensor {name} is not a permutation of the {V} token ids")
            return y
        if not dequantizable(g.tensor_type):
            raise meta.error(f"tensor {name} has type {g.tensor_type.name}, which gguf-py cannot dequantize")
        y = gguf.quants.dequantize(g.data, g.tensor_type).reshape(want)
        if check_finite:
            finite(np.asarray(y, np.float32), name, path)
        return t.spec().from_gguf(np.ascontiguousarray(y, np.float32), shape).astype(dtype)

    return cfg, _assemble(acfg, fetch)


def _assemble(acfg: Gemma4AssistantConfig, fetch) -> Gemma4AssistantParams:
    """The assistant's params, each tensor from ``fetch(name, tensor, shape)`` (our layout; a stacked layer's
    shape without its layer axis)."""
    template = assistant_abstract(acfg)
    leaves: dict = {}
    for name, t, attr, j in tensor_slots(acfg, template):
        info = _leaf(template, attr, t)
        x = fetch(name, t, tuple(info.shape if j is None else info.shape[1:]))
        if j is None:
            leaves[(None, t.path)] = x
        else:
            leaves.setdefault((attr, t.path), np.empty(info.shape, x.dtype))[j] = x
    out = {attr: None if getattr(template, attr) is None else
           _fill(getattr(template, attr), {p: v for (a, p), v in leaves.items() if a == attr})
           for attr in ("swa_layers", "full_layers")}
    top = {t.path[0]: jnp.asarray(leaves[(None, t.path)]) if (None, t.path) in leaves else None for t in TOP}
    return Gemma4AssistantParams(**top, **out)


def _fill(template, by_path: dict) -> Any:
    """A stacked layer template with its leaves from ``by_path`` (path tuple -> array)."""

    def walk(obj, prefix):
        if obj is None or isinstance(obj, ArrayInfo):
            return None if obj is None else jnp.asarray(by_path[prefix])
        return dataclasses.replace(obj, **{f.name: walk(getattr(obj, f.name), (*prefix, f.name))
                                           for f in dataclasses.fields(obj)})

    return walk(template, ())


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


def assistant_from_hf(sd: dict, acfg: Gemma4AssistantConfig, dtype: str = "float32") -> Gemma4AssistantParams:
    """An HF assistant state dict -> our params (KeyError naming a missing tensor)."""
    where = {name: (attr, j) for name, _, attr, j in tensor_slots(acfg, assistant_abstract(acfg))}

    def fetch(name: str, t: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
        attr, j = where[name]
        key = HF_NAMES[".".join(t.path)]
        hf = key if attr is None else f"model.layers.{_layer_id(acfg, attr, j)}.{key}"
        if hf not in sd:
            raise KeyError(f"missing tensor {hf}")
        y = np.asarray(sd[hf])
        if t.path == ("ordering",):
            return y.astype(np.int32)
        return t.spec().from_gguf(np.ascontiguousarray(y, np.float32), shape).astype(dtype)

    return _assemble(acfg, fetch)


def _layer_id(acfg: Gemma4AssistantConfig, attr: str, j: int) -> int:
    return dict(assistant_stacks(acfg))[attr][j]


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


def read_head(path, target: Gemma4Config, dtype: str | None = None, check_finite: bool = True):
    """The assistant from a gemma4-assistant GGUF or an HF ``Gemma4AssistantForCausalLM`` directory (config.json +
    *.safetensors; transformers' window, ``swa_keys="transformers"``) -> (target config with it, its params)."""
    import json
    from pathlib import Path

    from mtp_jax.io.hf import HFError, _Safetensors

    path = Path(path)
    if not path.is_dir():
        return read_assistant_gguf(path, target, dtype, check_finite)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: no readable config.json ({e})") from None
    if hf.get("model_type") != "gemma4_assistant":
        raise HFError(f"{path}: model_type {hf.get('model_type')!r} is not gemma4_assistant")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFError(f"{path}: no *.safetensors files")
    try:
        acfg = assistant_config_from_hf(hf, target)
        cfg = target.replace(assistant=acfg)
        ap = assistant_from_hf(_Safetensors(files), acfg, dtype or target.dtype)
    except (KeyError, ValueError) as e:
        raise HFError(f"{path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    return cfg, ap


def drafting_params(cfg: Gemma4Config, accept: float = 0.6, seed: int = 0, alpha: float = 24.0, mix: float = 0.0,
                    dtype: str = "float32"):
    """A target + assistant pair whose drafts agree with the trunk at a chosen rate, by construction (tests,
    benchmarks; synthetic.constructed_params' idea): the trunk's greedy continuation is a random permutation
    t -> pi(t) (quiet blocks: post norms at 0.05; lm_head column pi(t) = alpha E[t] / D), and the assistant drafts
    pi'(t) from its input token t, pi' = pi on a random fraction ``accept`` of the tokens: E's rows lie in the span
    of Q [D, Da] (orthonormal columns), pre_proj passes the target embedding through Q, the assistant's tied table
    maps E[t] Q to pi'(t). With ordered embeddings each centroid is the mean table row of its cluster (a
    k-means-like shortlist). ``mix``: the gain of a random hidden half of pre_proj, so that drafts also depend on
    the hidden the assistant is handed (tests telling llama.cpp's semantics from near misses). -> (cfg with an
    untied head, params)."""
    from mtp_jax.synthetic import _head

    cfg = cfg.replace(tie_word_embeddings=False, dtype=dtype)
    rng = np.random.default_rng(seed)
    D, V, Da = cfg.hidden_size, cfg.vocab_size, cfg.assistant.hidden_size
    p = P.init(jax.random.key(seed), cfg, std=0.02)
    quiet = ("attn_post_norm", "ffn_post_norm", "ple_norm")
    p = jax.tree_util.tree_map_with_path(lambda kp, x: x * 0.05 if kp[-1].name in quiet else x, p)
    Q = np.linalg.qr(rng.standard_normal((D, Da)))[0].astype(np.float32)
    e = rng.standard_normal((V, Da)).astype(np.float32)
    e *= np.sqrt(D) / np.linalg.norm(e, axis=1, keepdims=True)  # rows of norm sqrt(D): E rows rms 1
    E = e @ Q.T
    pi = rng.permutation(V)
    other = (pi + 1 + rng.integers(0, V - 1, V)) % V  # != pi(t)
    pi_head = np.where(rng.random(V) < accept, pi, other)
    pre = np.concatenate([Q / np.sqrt(D), mix * rng.standard_normal((D, Da)).astype(np.float32) / np.sqrt(D)])
    table = _head(e, pi_head, alpha).T  # [V, Da]
    a = dataclasses.replace(p.nextn, pre_proj=jnp.asarray(pre, dtype), embed=jnp.asarray(table, dtype))
    if cfg.assistant.use_ordered_embeddings:
        C = cfg.assistant.num_centroids
        clusters = np.asarray(a.ordering).reshape(C, V // C)
        a = dataclasses.replace(a, centroids=jnp.asarray(table[clusters].mean(1).T, dtype))
    return cfg, dataclasses.replace(p, embed=jnp.asarray(E, dtype), lm_head=jnp.asarray(_head(E, pi, alpha), dtype),
                                    nextn=a)
