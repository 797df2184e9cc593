"""GGUF <-> (ModelConfig, Params) for every registered family (``mtp_jax.families``), NextN blocks included.

The family of a file is its ``general.architecture``; its metadata keys are read by the family's
``config_from_gguf`` (with ``Metadata``'s range-checked reads) and its tensors follow the family's tensor table
(``mtp_jax.io.table``), both checked by io/gguf_model.py, which does without jax. Tensor types as
convert_hf_to_gguf's ``prepare_tensors``: 1-D tensors, ``*_norm.weight``, biases and ``ffn_gate_inp`` stay F32,
every other weight takes ``outtype``.

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
from mtp_jax.io.gguf_model import check_tensors, config_from_gguf, gguf_shape, mtp_only
from mtp_jax.io.split import open_model_files
from mtp_jax.io.table import Slot, plan
from mtp_jax.io.tokenizer import Tokenizer, TokenizerError
from mtp_jax.io.validate import GGUFError, open_reader, value
from mtp_jax.quant.policy import name_allows_quantization

OUTTYPES = {  # --outtype -> (tensor type of the big weights, general.file_type)
    "f32": (GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_RAW_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
               GGMLQuantizationType.BF16: ml_dtypes.bfloat16}
_ALIGN = 64  # XLA:CPU adopts host buffers aligned to 64 bytes without copying them


# ---- metadata (the family's keys: io/gguf_model.py) ----------------------------------------------------------


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


def read_gguf(path: str | os.PathLike, dtype: str | None = None, load_mtp: bool = True,
              check_finite: bool = True, quantized: str = "dequantize",
              float_rows: bool = False, mesh: Any = None, placement: Any = ()) -> tuple[ModelConfig, P.Params]:
    """A GGUF of a registered family (or the first file of a split one) -> (ModelConfig, Params of jax arrays in
    ``dtype``).

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
        kept[leaf] = qweight.HostLayout(types, gguf_shape(template, slots[0]), stacked, stacked + spec.batch,
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
    """(ModelConfig, Params) -> a GGUF of the config's family that llama.cpp loads (NextN block included when params
    has one).

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
