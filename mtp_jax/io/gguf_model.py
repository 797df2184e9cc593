"""What a GGUF says about its model, without jax: its metadata <-> the family's ModelConfig (``Metadata``,
``config_from_gguf``, ``write_common_metadata``) and its tensors against the family's tensor table
(``check_tensors``). io/gguf.py reads and writes the weights with these; the quantizer checks a family's file
with this module alone (``import jax`` would cost it ~145 MB of RSS, twice llama-quantize's peak).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, Keys

from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.io.table import Slot, plan, stacks
from mtp_jax.io.validate import REQUIRED, GGUFError, dequantizable, value

MAX_LAYERS, MAX_EXPERTS = 512, 1024  # llama.cpp's LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS (src/llama-hparams.h)
_U32 = 2**32 - 1


# ---- metadata <-> ModelConfig ---------------------------------------------------------------------------------


_BLOCK = re.compile(r"blk\.(\d+)\.")
POSITIVE = float(np.finfo(np.float32).tiny)


def f32(v: float) -> float:
    """GGUF stores float32: take the shortest decimal that rounds to it, so 1e-5 reads back as 1e-5."""
    return float(str(np.float32(v)))


def rotary_factor(n_rot: int, head_dim: int) -> float:
    """partial_rotary_factor with int(head_dim * factor) == n_rot (ModelConfig.rotary_dim)."""
    f = n_rot / head_dim
    return f if int(head_dim * f) == n_rot else math.nextafter(f, 1.0)


class Metadata:
    """Range-checked reads of one GGUF's metadata for its arch (``get``), and the fields every family shares
    (llama-model.cpp ``load_hparams``): vocab and hidden size from token_embd, trunk and NextN layer counts
    (block_count bounded by LLAMA_MAX_LAYERS and by the blocks the file has tensors for), the MoE sizes, the
    special token ids."""

    def __init__(self, reader: gguf.GGUFReader, path: Any, arch: str):
        self.reader, self.path, self.arch = reader, path, arch
        self.tensors = {t.name: t for t in reader.tensors}

    def get(self, key: str, default: Any = None, lo: float = 0, hi: float = _U32) -> Any:
        return value(self.reader, key.format(arch=self.arch), self.path, default, lo, hi)

    def error(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def per_layer(self, key: str, n: int, default: Any = None, lo: float = 0, hi: float = _U32) -> list:
        """llama.cpp's get_key_or_arr for a per-layer value: a scalar for every layer, or an array of at least
        ``n`` items (its first n taken, each range-checked) -> a list of n values."""
        name = key.format(arch=self.arch)
        f = self.reader.fields.get(name)
        if f is None or f.types[0] != gguf.GGUFValueType.ARRAY:
            return [self.get(key, default, lo, hi)] * n
        v = f.contents()
        if len(v) < n:
            raise self.error(f"key {name} has {len(v)} items, expected one per layer ({n})")
        for x in v[:n]:
            if not (isinstance(x, (bool, int, float)) and lo <= x <= hi and math.isfinite(x)):
                raise self.error(f"key {name} holds {x!r}, expected values in [{lo}, {hi}]")
        return list(v[:n])

    def per_kind(self, key: str, n: int, swa: list[bool], what: str, default: Any = None,
                 lo: float = 0, hi: float = _U32) -> tuple[Any, Any]:
        """A per-layer value (``per_layer``) that the full layers, and the sliding layers, must each share (``swa``:
        each layer's kind) -> (full layers' value, sliding layers' value); a model of one kind gives it for both."""
        v = self.per_layer(key, n, default, lo, hi)
        by_kind = {s: sorted({x for x, t in zip(v, swa) if t == s}) for s in (False, True)}
        if any(len(x) > 1 for x in by_kind.values()):
            raise self.error(f"key {key.format(arch=self.arch)} = {v}: the full layers, and the sliding layers, must "
                             f"each share one {what}")
        full = (by_kind[False] or by_kind[True])[0]
        return full, (by_kind[True] or [full])[0]

    def common(self, dtype: str, heads_per_layer: bool = False) -> dict[str, Any]:
        """ModelConfig's shared fields (MoE ones included: every family here has a MoE NextN block)."""
        L, A, T_ = Keys.LLM, Keys.Attention, Keys.Tokenizer
        get = self.get
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise self.error("missing tensor token_embd.weight")
        if len(embd.shape) != 2:
            raise self.error(f"tensor token_embd.weight has shape {embd.shape.tolist()[::-1]} (numpy order), "
                             f"expected [vocab, hidden]")
        D, V = (int(x) for x in embd.shape)
        n_blocks = get(L.BLOCK_COUNT, REQUIRED, 1, MAX_LAYERS)
        n_nextn = get(L.NEXTN_PREDICT_LAYERS, 0, 0, n_blocks - 1)
        n_layer = n_blocks - n_nextn
        in_file = 1 + max((int(m[1]) for n in self.tensors if (m := _BLOCK.match(n))), default=-1)
        if n_layer > in_file:
            raise self.error(f"key {L.BLOCK_COUNT.format(arch=self.arch)} = {n_blocks} with {n_nextn} NextN "
                             f"layers makes {n_layer} trunk layers, but the file has tensors of {in_file} blocks")
        n_expert = get(L.EXPERT_COUNT, REQUIRED, 1, MAX_EXPERTS)
        n_group = get(L.EXPERT_GROUP_COUNT, 0, 0, n_expert) or 1
        token = lambda k: get(k, None, 0, V - 1)  # noqa: E731
        eos = tuple(dict.fromkeys(i for i in (token(T_.EOS_ID), token(T_.EOT_ID), token(T_.EOM_ID)) if i is not None))
        if heads_per_layer:  # the family reads the arrays itself; layer 0's counts stand for the model here
            n_head = self.per_layer(A.HEAD_COUNT, n_blocks, REQUIRED, 1)[0]
            n_kv = self.per_layer(A.HEAD_COUNT_KV, n_blocks, n_head, 1)[0]
        else:
            n_head = get(A.HEAD_COUNT, REQUIRED, 1)
            n_kv = get(A.HEAD_COUNT_KV, n_head, 1)
        return dict(
            vocab_size=V, hidden_size=D, num_hidden_layers=n_layer, num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            intermediate_size=get(L.FEED_FORWARD_LENGTH, 0),
            moe_intermediate_size=get(L.EXPERT_FEED_FORWARD_LENGTH, REQUIRED),
            n_routed_experts=n_expert, num_experts_per_tok=get(L.EXPERT_USED_COUNT, REQUIRED, 1, n_expert),
            n_shared_experts=get(L.EXPERT_SHARED_COUNT, 0), first_k_dense_replace=get(L.LEADING_DENSE_BLOCK_COUNT, 0),
            n_group=n_group, topk_group=get(L.EXPERT_GROUP_USED_COUNT, 0, 0, n_group) or n_group,
            norm_topk_prob=bool(get(L.EXPERT_WEIGHTS_NORM, False)),
            routed_scaling_factor=f32(get(L.EXPERT_WEIGHTS_SCALE, 1.0, -math.inf, math.inf) or 1.0),
            rope_theta=f32(get(Keys.Rope.FREQ_BASE, 10000.0, POSITIVE, math.inf)),
            rms_norm_eps=f32(get(A.LAYERNORM_RMS_EPS, REQUIRED, POSITIVE, 1.0)),
            num_nextn_predict_layers=n_nextn, tie_word_embeddings="output.weight" not in self.tensors,
            max_position_embeddings=get(L.CONTEXT_LENGTH, 131072, 1), bos_token_id=token(T_.BOS_ID),
            eos_token_ids=eos, dtype=dtype, name=get(Keys.General.NAME, self.arch),
        )

    def build(self, cls: type, **fields: Any) -> ModelConfig:
        try:
            return cls(**fields)
        except ValueError as e:
            raise self.error(f"inconsistent {self.arch} metadata: {e}") from None


def config_from_gguf(reader: gguf.GGUFReader, path: Any = "", dtype: str = "float32") -> ModelConfig:
    """The config of a GGUF, read by the family of its general.architecture (GGUFError for other archs)."""
    from mtp_jax import families

    arch = value(reader, Keys.General.ARCHITECTURE, path)
    try:
        fam = families.by_arch(arch)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    return fam.config_from_gguf(Metadata(reader, path, arch), dtype)


def write_common_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, heads: Any = None, kv_heads: Any = None) -> None:
    """The shared keys, in the order convert_hf_to_gguf's TextModel.set_gguf_parameters writes them (``heads`` /
    ``kv_heads``: per-layer arrays instead of the config's counts)."""
    w.add_name(cfg.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads if heads is None else heads)
    w.add_head_count_kv(cfg.num_key_value_heads if kv_heads is None else kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if 1 < cfg.n_group and cfg.topk_group < cfg.n_group:  # llama.cpp asserts n_group_used < n_expert_groups
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)


# ---- tensors against the table --------------------------------------------------------------------------


def gguf_shape(template: P.Params, slot: Slot) -> tuple[int, ...]:
    """The GGUF (numpy order) shape of the tensor in ``slot`` of a model shaped like ``template``."""
    info = tree.get(template, slot.leaf)
    return slot.spec.gguf_shape(tuple(info.shape if slot.index is None else info.shape[1:]))


def check_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, path: Any = "") -> P.Params:
    """The file's tensors against the tensor table of ``cfg`` (``plan``): each one there, of its shape and of a type
    gguf-py reads, and no other. The NextN blocks are complete or, as llama.cpp's trunk_only, absent altogether;
    a block with some of its tensors is an error. An MTP-only file (the NextN blocks and the top tensors, no
    ``blk.0.attn_norm.weight``: llama.cpp's mtp_only, as its converter's --mtp writes it) holds no trunk stacks.
    Returns the template of what the file holds."""
    tensors = {t.name: t for t in reader.tensors}
    head = tuple(f"blk.{cfg.num_hidden_layers + n}." for n in range(cfg.num_nextn_predict_layers))
    has_head = any(name.startswith(head) for name in tensors) if head else False
    from mtp_jax import families

    fam = families.of(cfg)
    present = {s.path[0] for s in fam.nextn_specs(cfg) if s.name(cfg.num_hidden_layers) in tensors}
    template = tree.template(cfg, present, has_head)
    if has_head and "blk.0.attn_norm.weight" not in tensors:
        template = mtp_only(cfg, template)
    expected = set()
    for slot in plan(cfg, template):
        t = tensors.get(slot.name)
        if t is None:
            why = " (the NextN block's other tensors are there)" if slot.name.startswith(head or "-") else ""
            raise GGUFError(f"{path}: missing tensor {slot.name}{why}")
        want, got = gguf_shape(template, slot), tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != want:
            raise GGUFError(f"{path}: tensor {slot.name} has shape {list(got)} (numpy order), expected {list(want)}")
        if not dequantizable(t.tensor_type):
            raise GGUFError(f"{path}: tensor {slot.name} has type {t.tensor_type.name}, which gguf-py cannot "
                            f"dequantize")
        expected.add(slot.name)
    for name, want_values in (fam.constant_tensors(cfg) if fam.constant_tensors else {}).items():
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path}: missing tensor {name}")
        got_values = np.asarray(t.data, np.float32).reshape(-1) if t.tensor_type == GGMLQuantizationType.F32 else None
        if got_values is None or got_values.shape != want_values.shape or not np.array_equal(got_values, want_values):
            raise GGUFError(f"{path}: tensor {name} does not hold what the metadata implies ({fam.arch} "
                            f"constant_tensors)")
        expected.add(name)
    for name in tensors.keys() - expected:
        m = _BLOCK.match(name)
        why = (f"; nextn_predict_layers = {cfg.num_nextn_predict_layers} makes blk.{m[1]} a trunk layer"
               if m and ".nextn." in name else "")
        raise GGUFError(f"{path}: unexpected tensor {name}: not part of a {fam.arch} model of {cfg.num_hidden_layers} "
                        f"trunk and {cfg.num_nextn_predict_layers} NextN layers{why}")
    return template


def mtp_only(cfg: ModelConfig, params: Any) -> Any:
    """params (or a template) without the trunk's layer stacks: what an MTP-only file holds."""
    return dataclasses.replace(params, **{attr: None for attr, _, _ in stacks(cfg)})
