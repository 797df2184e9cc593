"""GGUF <-> (ModelConfig, Params) for every registered family (``mtp_jax.families``), NextN blocks included.

The family of a file is its ``general.architecture``; its metadata keys are read by the family's
``config_from_gguf`` (with ``Metadata``'s range-checked reads) and its tensors follow the family's tensor table
(``mtp_jax.io.table``). Tensor types as convert_hf_to_gguf's ``prepare_tensors``: 1-D tensors,
``*_norm.weight``, biases and ``ffn_gate_inp`` stay F32, every other weight takes ``outtype``.

Reading memory-maps the file and copies each tensor once, straight into its (64-byte aligned) slot of the
stacked parameter array, which ``jax.device_put`` then adopts without a copy on CPU; the mapped pages of a
tensor are released once it is copied, so peak host memory stays near the size of the parameters. On a device
mesh each process reads only its own devices' shards (``read_gguf(mesh=)``), holding those and one tensor.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
from pathlib import Path
from typing import Any

import gguf
import jax
import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from mtp_jax import params as P
from mtp_jax import qweight
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree, validate
from mtp_jax.io.split import open_model_files
from mtp_jax.io.table import Slot, plan, stacks
from mtp_jax.io.tokenizer import Tokenizer, TokenizerError
from mtp_jax.io.validate import REQUIRED, GGUFError, dequantizable, open_reader, value
from mtp_jax.quant.policy import name_allows_quantization

OUTTYPES = {  # --outtype -> (tensor type of the big weights, general.file_type)
    "f32": (GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_RAW_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
               GGMLQuantizationType.BF16: ml_dtypes.bfloat16}
_ALIGN = 64  # XLA:CPU adopts host buffers aligned to 64 bytes without copying them
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


def _write_special_ids(w: gguf.GGUFWriter, cfg: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """cfg.eos_token_ids are GLM's (eos, eot, eom) = HF config.json's eos_token_id list; BOS is the config's,
    else the tokenizer's (what llama.cpp prepends when add_bos_token is set)."""
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer and tokenizer.bos_id
    if bos is not None:
        w.add_bos_token_id(bos)
    for add, i in zip((w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id), cfg.eos_token_ids):
        add(i)


# ---- reading --------------------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader (memory-mapped) of a file that passed mtp_jax.io.validate's checks (GGUFError otherwise)."""
    return open_reader(path)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + _ALIGN, np.uint8)
    off = -buf.ctypes.data % _ALIGN
    return buf[off: off + n].view(dtype).reshape(shape)


def _source(mm: mmap.mmap, t: Any) -> np.ndarray:
    """The tensor's data in GGUF numpy layout: a view of the mapping for F32/F16/BF16, dequantized otherwise."""
    raw = _raw(mm, t)
    return raw if t.tensor_type in _RAW_DTYPES else gguf.quants.dequantize(raw, t.tensor_type)


def _release(mm: mmap.mmap, t: Any) -> None:
    """Drop the tensor's mapped pages from this process (they stay in the page cache)."""
    page = mmap.PAGESIZE
    start = t.data_offset // page * page
    end = min(-(-(t.data_offset + t.n_bytes) // page) * page, len(mm))
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _gguf_shape(template: P.Params, slot: Slot) -> tuple[int, ...]:
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
        want, got = _gguf_shape(template, slot), tuple(int(d) for d in reversed(t.shape.tolist()))
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


def read_gguf(path: str | os.PathLike, dtype: str | None = None, load_mtp: bool = True,
              check_finite: bool = True, quantized: str = "dequantize",
              float_rows: bool = False, mesh: Any = None, placement: Any = ()) -> tuple[ModelConfig, P.Params]:
    """A GGUF of a registered family (or the first file of a split one) -> (ModelConfig, Params of jax arrays in ``dtype``).

    ``dtype`` None: the file's own float type (float32 for ALL_F32, float16 / bfloat16 for MOSTLY_F16 / BF16),
    bfloat16 for quantized files. ``load_mtp=False`` skips the NextN block's tensors like llama.cpp's
    TENSOR_SKIP (params.nextn is None; the config keeps num_nextn_predict_layers); so does a trunk-only file
    whose config announces NextN layers but which has none of their tensors (glm4-moe.cpp ``trunk_only``). Any
    type gguf-py dequantizes is accepted. The file is validated (mtp_jax.io.validate, config_from_gguf,
    check_tensors) before anything is allocated; ``check_finite`` refuses NaN/Inf weights. ``quantized="keep"``
    keeps the weights of the block types the graph dequantizes in their GGUF format (qweight.QuantWeight,
    dequantized next to each matmul); "dequantize" converts every tensor to ``dtype`` here. ``float_rows`` (with
    "keep", when ``dtype`` is the file's own): the F16/BF16/F32 matrices llama-quantize would quantize stay in
    GGUF's [out, in] rows too (a QuantWeight of a float type), the layout the CPU kernel reads fastest at a few
    rows of x (mtp_jax/kernels/cpu_linear.cc, kFewRows); they are not transposed at load. ``mesh`` (a Mesh, or
    a function of the config returning one or None): every leaf is read straight into its shards on the mesh
    (sharding.param_shardings with ``placement``; with "keep", block-type weights stay in their GGUF blocks, split
    along experts and output rows, float matrices are arrays), each process reading only its own devices' parts,
    so host memory never holds the whole model (``_read_into_shards``). Raises GGUFError
    naming the file (and the key or tensor) for bad input.
    """
    path = Path(path)
    files = open_model_files(path)
    reader = files.whole()  # a split model's tensors from all its files
    own = _default_dtype(reader, path)
    float_rows = float_rows and dtype in (None, own)
    dtype = dtype or own
    cfg = config_from_gguf(reader, path, dtype)
    held = check_tensors(reader, cfg, path)
    template = held if load_mtp else dataclasses.replace(held, nextn=None)
    tensors = {t.name: (i, t) for i, t in files.tensors}
    dt = np.dtype(dtype)
    mms = []
    for p in files.paths:  # the mappings are left to the GC: a GGUFError's traceback may hold views of them
        with open(p, "rb") as f:
            mms.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    read = _TensorReader(files.paths, mms, tensors, check_finite)
    from mtp_jax import sharding  # noqa: PLC0415

    mesh = sharding.mesh_for_config(mesh, cfg)
    if mesh is not None:
        kept = _kept_quantized(cfg, template, tensors, allocate=False) if quantized == "keep" else {}
        layout = tree.build(template, [kept[leaf].weight(tuple(jax.ShapeDtypeStruct(*s) for s in kept[leaf].shapes),
                                                          tree.get(template, leaf).shape) if leaf in kept
                                       else tree.get(template, leaf) for leaf in tree.leaf_paths(template)])
        shardings = sharding.param_shardings(cfg, mesh, placement=placement, template=template, params=layout)
        return cfg, _read_into_shards(cfg, template, shardings, dt, read, kept)
    kept = _kept_quantized(cfg, template, tensors, float_rows) if quantized == "keep" else {}
    bufs = {leaf: _aligned_empty(tree.get(template, leaf).shape, dt)
            for leaf in tree.leaf_paths(template) if leaf not in kept}
    for slot in plan(cfg, template):
        if slot.leaf in kept:
            dst = kept[slot.leaf].slot(slot.index)
            np.copyto(dst, read.raw(slot).reshape(dst.shape))
        else:
            dst = bufs[slot.leaf] if slot.index is None else bufs[slot.leaf][slot.index]
            np.copyto(dst, read(slot, dst.shape), casting="unsafe")
        read.release(slot)
    leaves = []
    for leaf in tree.leaf_paths(template):
        if leaf in kept:
            leaves.append(kept[leaf].build(tree.get(template, leaf).shape))
        else:
            leaves.append(jax.device_put(bufs[leaf]))
    return cfg, tree.build(template, leaves)


@dataclasses.dataclass(frozen=True)
class _TensorReader:
    """A model's tensors by name from its files' mappings: ``(slot, shape)`` -> the tensor in our layout at
    ``shape`` (a view of the mapping for F32/F16/BF16, dequantized otherwise), finite-checked when asked;
    ``release(slot)`` drops its mapped pages again (they stay in the page cache)."""

    paths: list[Path]
    mms: list[mmap.mmap]
    tensors: dict[str, tuple[int, Any]]
    check_finite: bool

    def __call__(self, slot: Slot, shape: tuple[int, ...]) -> np.ndarray:
        i, t = self.tensors[slot.name]
        src = _source(self.mms[i], t)
        if self.check_finite:
            validate.check_finite(src, slot.name, self.paths[i])
        return slot.spec.from_gguf(src, shape)

    def raw(self, slot: Slot) -> np.ndarray:
        """The tensor as stored (``_raw``), finite-checked on its values when asked."""
        i, t = self.tensors[slot.name]
        if self.check_finite:
            validate.check_finite(_source(self.mms[i], t), slot.name, self.paths[i])
        return _raw(self.mms[i], t)

    def release(self, slot: Slot) -> None:
        i, t = self.tensors[slot.name]
        _release(self.mms[i], t)


class _Shards:
    """One global array assembled from this process' device shards (jax.make_array_from_single_device_arrays): a
    host buffer per distinct shard (devices holding the same part share one), filled tensor by tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, where: Any):
        self.shape, self.where = shape, where
        self.on_device = where.addressable_devices_indices_map(shape)  # device -> index (slices) of its shard
        self.parts = {b: _aligned_empty(tuple(hi - lo for lo, hi in b), dtype)
                      for b in {self._bounds(idx) for idx in self.on_device.values()}}

    def _bounds(self, index: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:  # [start, stop) per dimension
        return tuple(s.indices(n)[:2] for s, n in zip(index, self.shape))

    def fill(self, row: int | None, x: np.ndarray) -> None:
        """``x``: the whole array (``row`` None) or row ``row`` of its leading (stack) axis; each shard copies its
        part (from a view of the mapping, only those pages are read)."""
        for b, buf in self.parts.items():
            if row is None:
                np.copyto(buf, x[tuple(slice(*r) for r in b)], casting="unsafe")
            elif b[0][0] <= row < b[0][1]:
                np.copyto(buf[row - b[0][0]], x[tuple(slice(*r) for r in b[1:])], casting="unsafe")

    def array(self) -> jax.Array:
        arrays = [jax.device_put(self.parts[self._bounds(idx)], d) for d, idx in self.on_device.items()]
        return jax.make_array_from_single_device_arrays(self.shape, self.where, arrays)


def _read_into_shards(cfg: ModelConfig, template: P.Params, shardings: Any, dt: np.dtype, read: _TensorReader,
                      kept: dict) -> P.Params:
    """Each leaf assembled from this process' device shards (``_Shards``): every tensor is read from the mapping
    once, each distinct shard copies its part, and the tensor's pages are released, so host memory holds this
    process' shards plus one tensor. Leaves in ``kept`` (qweight.HostLayout, unallocated) keep their GGUF blocks:
    each type group is a sharded array of rows (``shardings`` holds a QuantWeight of shardings there)."""
    slots: dict = {}
    for slot in plan(cfg, template):
        slots.setdefault(slot.leaf, []).append(slot)
    leaves = []
    for leaf in tree.leaf_paths(template):
        shape, where = tree.get(template, leaf).shape, tree.get(shardings, leaf)
        if leaf in kept:
            lay = kept[leaf]
            groups = [_Shards(s, d, w) for (s, d), w in zip(lay.shapes, where.groups)]
            for slot in slots[leaf]:
                g, j = lay.where[slot.index or 0]
                one = lay.shapes[g][0][lay.stacked:]  # one tensor's rows [*batch, N, row_bytes]
                groups[g].fill(j if lay.stacked else None, read.raw(slot).reshape(one))
                read.release(slot)
            leaves.append(lay.weight(tuple(x.array() for x in groups), shape))
        else:
            out = _Shards(shape, dt, where)
            for slot in slots[leaf]:
                out.fill(slot.index, read(slot, shape if slot.index is None else shape[1:]))
                read.release(slot)
            leaves.append(out.array())
    return tree.build(template, leaves)


def _raw(mm: mmap.mmap, t: Any) -> np.ndarray:
    """The tensor as stored: floats [*, out, in] for F32/F16/BF16, bytes [*, out, row_bytes] otherwise (a view)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    raw = _RAW_DTYPES.get(t.tensor_type)
    if raw is not None:
        return np.frombuffer(mm, raw, math.prod(shape), t.data_offset).reshape(shape)
    data = np.frombuffer(mm, np.uint8, t.n_bytes, t.data_offset)
    return data.reshape(gguf.quant_shape_to_byte_shape(shape, t.tensor_type))


def _kept_quantized(cfg: ModelConfig, template: P.Params, tensors: dict, float_rows: bool = False,
                    allocate: bool = True) -> dict:
    """leaf -> qweight.HostLayout for every weight matrix or table with a tensor of a block type the graph
    dequantizes (qweight.DEQUANTIZERS), and with ``float_rows`` every float matrix (not a table) whose tensors
    llama-quantize would quantize; other leaves (and types only the host dequantizes) load as floats."""
    by_leaf: dict = {}
    for slot in plan(cfg, template):
        by_leaf.setdefault(slot.leaf, []).append(slot)
    kept = {}
    for leaf, slots in by_leaf.items():
        types = [tensors[s.name][1].tensor_type.name for s in slots]
        spec = slots[0].spec
        as_rows = (float_rows and spec.n_in is not None
                   and all(name_allows_quantization(cfg.family, s.name) for s in slots))
        if (spec.n_in is None and not spec.table) or not (as_rows or any(t in qweight.DEQUANTIZERS for t in types)):
            continue
        if not all(t in qweight.SUPPORTED for t in types):
            continue
        stacked = slots[0].index is not None
        kept[leaf] = qweight.HostLayout(types, _gguf_shape(template, slots[0]), stacked, stacked + spec.batch,
                                        spec.n_in, allocate)
    return kept


def _default_dtype(reader: gguf.GGUFReader, path: Any = "") -> str:
    """From general.file_type (else token_embd's type): F32 -> float32, F16 -> float16, anything else bfloat16."""
    ftype = value(reader, Keys.General.FILE_TYPE, path)
    if ftype is None:
        embd = [t.tensor_type for t in reader.tensors if t.name == "token_embd.weight"]
        ftype = {GGMLQuantizationType.F32: 0, GGMLQuantizationType.F16: 1}.get(embd[0] if embd else None)
    return {gguf.LlamaFileType.ALL_F32: "float32", gguf.LlamaFileType.MOSTLY_F16: "float16"}.get(ftype, "bfloat16")


def read_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    try:
        return Tokenizer.from_gguf(open_gguf(path))
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


# ---- writing --------------------------------------------------------------------------------------------------


def _encode(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(x, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), qtype)  # BF16: round-to-nearest-even bytes


def _split_keys_in_llama_order(w: gguf.GGUFWriter) -> None:
    """gguf-py appends split.no, split.count, split.tensors.count to each shard's keys (write_header_to_file);
    llama-gguf-split (tools/gguf-split/gguf-split.cpp) writes no, tensors.count, count. Reordered before the keys
    are written (the header holds only their number), the shards are llama-gguf-split's bytes."""
    S = Keys.Split
    for i, kv in enumerate(w.kv_data):
        if S.LLM_KV_SPLIT_COUNT in kv:
            w.kv_data[i] = {k: v for k, v in kv.items() if k != S.LLM_KV_SPLIT_COUNT} | {
                S.LLM_KV_SPLIT_COUNT: kv[S.LLM_KV_SPLIT_COUNT]}


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, params: P.Params, outtype: str = "f32",
               tokenizer: Tokenizer | None = None, split_max_tensors: int = 0, part: str = "all") -> Path:
    """(ModelConfig, Params) -> a GGUF of the config's family that llama.cpp loads (NextN block included when params has one).

    ``outtype`` f32 / f16 / bf16 for the weight matrices (norms, biases, router stay F32). The tokenizer's
    vocabulary is padded to cfg.vocab_size; without one the file says ``tokenizer.ggml.model = none``. Written
    to a temporary file in the same directory and renamed on success: no partial file is ever left.
    ``split_max_tensors`` > 0: a split model of at most that many tensors per file, ``PATH-0000k-of-0000n.gguf``
    (PATH less ".gguf") with llama-gguf-split's split.* keys (gguf-py's writer, as convert_hf_to_gguf.py
    --split-max-tensors); returns the first file. ``part``: "all"; "trunk" (the config's metadata, NextN
    blocks declared but not written: llama.cpp loads it trunk_only); "mtp" (the same metadata, only the NextN
    blocks and the top tensors: llama.cpp's mtp_only, the file its converter's --mtp writes).
    """
    if part not in ("all", "trunk", "mtp"):
        raise GGUFError(f"part must be 'all', 'trunk' or 'mtp', got {part!r}")
    if split_max_tensors < 0:
        raise GGUFError(f"split_max_tensors must be >= 0, got {split_max_tensors}")
    if outtype not in OUTTYPES:
        raise GGUFError(f"outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}")
    from mtp_jax import families

    fam = families.of(cfg)
    if fam.write_head is not None:  # the drafter is a model file of its own (another arch): part="mtp" writes it
        if part == "mtp":
            return fam.write_head(path, cfg, params, outtype, tokenizer)
        cfg, params = cfg.trunk_only(), dataclasses.replace(params, nextn=None)
    qtype, ftype = OUTTYPES[outtype]
    path = Path(path)
    if (params.nextn is not None) != cfg.has_mtp:
        raise GGUFError(f"{path}: params {'have' if params.nextn else 'lack'} a NextN layer but the config says "
                        f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}")
    template = tree.template_of(cfg, params)
    try:
        tree.check_shapes(template, params, path)
    except ValueError as e:
        raise GGUFError(str(e)) from None
    if part != "all" and params.nextn is None:
        raise GGUFError(f"{path}: part={part!r} splits a model with NextN layers; these params have none")
    if part == "trunk":
        template = dataclasses.replace(template, nextn=None)
    elif part == "mtp":
        template = mtp_only(cfg, template)
    host = {leaf: np.asarray(tree.get(params, leaf)) for leaf in tree.leaf_paths(template)}
    if len(cfg.eos_token_ids) > 3:
        raise GGUFError(f"{path}: GGUF holds at most 3 end-of-generation ids (eos, eot, eom), "
                        f"got {cfg.eos_token_ids}")
    slots = list(plan(cfg, template))
    stem = path.name[:-len(".gguf")] if path.name.endswith(".gguf") else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}.gguf")  # shards get gguf-py's -0000k-of-0000n suffix
    w = gguf.GGUFWriter(tmp, fam.arch, split_max_tensors=split_max_tensors)
    written: list[tuple[Path, Path]] = []
    try:
        fam.write_gguf_metadata(w, cfg, ftype)
        if tokenizer is not None:
            tokenizer.add_to_gguf(w, cfg.vocab_size)
        else:
            w.add_tokenizer_model("none")
        _write_special_ids(w, cfg, tokenizer)
        consts = fam.constant_tensors(cfg) if fam.constant_tensors and part != "mtp" else {}
        types = []
        for s in slots:
            x = host[s.leaf] if s.index is None else host[s.leaf][s.index]
            shape = s.spec.gguf_shape(x.shape)
            types.append(s.spec.ggml_type(s.name, len(shape), qtype))
            bs, ts = GGML_QUANT_SIZES[types[-1]]
            w.add_tensor_info(s.name, shape, np.dtype(np.float32), math.prod(shape) // bs * ts, raw_dtype=types[-1])
        for name, x in consts.items():
            w.add_tensor_info(name, x.shape, np.dtype(np.float32), x.nbytes, raw_dtype=GGMLQuantizationType.F32)
        w.write_header_to_file()
        _split_keys_in_llama_order(w)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s, ty in zip(slots, types):
            x = host[s.leaf] if s.index is None else host[s.leaf][s.index]
            w.write_tensor_data(_encode(s.spec.to_gguf(x), ty))
        for x in consts.values():
            w.write_tensor_data(x)
        shards = w.format_shard_names(tmp)
        w.close()
        if len(shards) == 1:
            written = [(tmp, path)]
        else:
            written = [(t, path.with_name(f"{stem}{t.name[len(tmp.stem):]}")) for t in shards]
        for t, final in written:
            os.replace(t, final)
    except BaseException:
        w.close()
        for t in (w.format_shard_names(tmp) if w.tensors else [tmp]):
            t.unlink(missing_ok=True)
        raise
    return written[0][1]
