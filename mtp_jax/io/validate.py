"""Validate once, between parsing and use: what every GGUF reader (model, imatrix, quantizer input) checks before
it trusts a file.

* ``regular_file``: a missing path, a directory, a FIFO or a device is refused before anything opens it;
* ``scan``: the header walked with bounds checks before gguf-py parses it, so no length or count read from the
  file can make a reader allocate or loop beyond the file's size. The checks are llama.cpp's
  (ggml/src/gguf.cpp ``gguf_init_from_reader``, llama-cpp-python 0.3.36 tree): version, non-empty unique keys,
  value types (no nested arrays), strings within the file, tensor names shorter than GGML_MAX_NAME and unique,
  at most GGML_MAX_DIMS dims, element counts below INT64_MAX, known types whose block divides the row, and data
  offsets that are exactly the running sum of the tensors' sizes padded to the alignment; as llama_model_loader,
  every tensor's data lies inside the file. Beyond llama.cpp: nothing follows the last tensor but its padding (a
  tensor whose type was relabelled no longer fits its span), and every string is valid UTF-8;
* ``open_reader``: the three above, then gguf-py's GGUFReader and the types of the metadata keys this project
  reads (``KEY_TYPES``);
* ``value``: one metadata value of a checked type, in a range; ``dequantizable`` and ``check_finite`` for the
  tensors' types and data.

Every failure is a GGUFError (or the caller's error class) with one line naming the file, the key or tensor,
what was expected and what was found.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

V = GGUFValueType
_SCALAR_SIZES = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
                 V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
_INTS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_FLOATS = {V.FLOAT32, V.FLOAT64}
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is shorter
MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = 2**63 - 1
_MIN_KV = 8 + 1 + 4 + 1  # key length, a one-byte key, type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFError(ValueError):
    """A GGUF file that fails validation or cannot be read as (or written from) a model of a registered family; the
    message names the file."""


def output_file(path: str | os.PathLike, error: type[Exception] = GGUFError) -> Path:
    """``path`` as a file to write (checked before the work that makes it): its directory exists and it is not a
    directory itself; else ``error``."""
    path = Path(path)
    if not path.absolute().parent.is_dir():
        raise error(f"output directory {path.absolute().parent} does not exist")
    if path.is_dir():
        raise error(f"{path}: is a directory; give a file name to write")
    return path


def regular_file(path: str | os.PathLike, error: type[ValueError] = GGUFError) -> Path:
    """``path`` when it is a regular file; a missing path, a directory, a FIFO or a device raises ``error``."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise error(f"{path}: expected a regular file, found {kind}")
    return path


# ---- the bounded header walk --------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian values from ``buf``, refusing any read past its end."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {len(self.buf)}")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        start = self.take(n, f"{what} ({n} bytes)")
        try:
            return self.buf[start: start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        t = self.unpack("<I", what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what} has GGUF type {t}, expected one of 0..{int(max(GGUFValueType))}") from None


def _value(c: _Cursor, key: str) -> tuple[GGUFValueType, ...]:
    """Skip one key's value; its (type,) or (ARRAY, item type)."""
    t = c.value_type(f"key {key}")
    if t == V.STRING:
        c.string(f"key {key}")
        return (t,)
    if t in _SCALAR_SIZES:
        c.take(_SCALAR_SIZES[t], f"key {key}")
        return (t,)
    it = c.value_type(f"key {key} (array items)")
    n = c.unpack("<Q", f"key {key} (array length)")
    if it == V.ARRAY:
        raise c.fail(f"key {key} is an array of arrays, which GGUF readers do not support")
    least = 8 if it == V.STRING else _SCALAR_SIZES[it]
    if n > (len(c.buf) - c.pos) // least:
        raise c.fail(f"key {key}: an array of {n} {it.name} items needs at least {n * least} bytes, "
                     f"{len(c.buf) - c.pos} are left in the file")
    if it == V.STRING:
        for _ in range(n):
            c.string(f"an item of key {key}")
    else:
        c.take(n * least, f"key {key}")
    return (t, it)


def _tensor_info(c: _Cursor, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = c.string(f"the name of tensor {i}")
    if len(name.encode()) >= MAX_NAME:
        raise c.fail(f"tensor {name[:80]!r}: name of {len(name.encode())} bytes, at most {MAX_NAME - 1} allowed")
    if name in seen:
        raise c.fail(f"tensor {name}: duplicate name")
    seen.add(name)
    n_dims = c.unpack("<I", f"tensor {name} (n_dims)")
    if n_dims > MAX_DIMS:
        raise c.fail(f"tensor {name}: {n_dims} dimensions, at most {MAX_DIMS} allowed")
    ne = tuple(c.unpack("<Q", f"tensor {name} (dims)") for _ in range(n_dims))
    if any(n > _INT64_MAX for n in ne) or math.prod(ne) > _INT64_MAX:
        raise c.fail(f"tensor {name}: shape {list(ne)} has more than INT64_MAX elements")
    raw = c.unpack("<I", f"tensor {name} (type)")
    try:
        qtype = GGMLQuantizationType(raw)
        block = GGML_QUANT_SIZES[qtype][0]
    except (ValueError, KeyError):
        raise c.fail(f"tensor {name}: ggml type {raw} is not a known tensor type") from None
    if ne and ne[0] % block:
        raise c.fail(f"tensor {name}: type {qtype.name} needs rows of a multiple of {block} elements, "
                     f"the shape {list(ne)} has rows of {ne[0]}")
    return name, ne, qtype, c.unpack("<Q", f"tensor {name} (data offset)")


def _alignment(c: _Cursor, types: Mapping[str, tuple[GGUFValueType, ...]], at: int | None) -> int:
    key = Keys.General.ALIGNMENT
    if key not in types:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    if types[key] != (V.UINT32,):
        raise c.fail(f"key {key} has GGUF type {_type_name(types[key])}, expected UINT32")
    align = struct.unpack_from("<I", c.buf, at)[0]
    if align == 0 or align & (align - 1):
        raise c.fail(f"key {key} = {align}, expected a power of 2")
    return align


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def scan(path: Path, buf: Any) -> dict[str, tuple[GGUFValueType, ...]]:
    """Walk the GGUF file in ``buf`` with every bound checked; GGUFError on the first fault. Returns each key's
    GGUF type: (type,) or (ARRAY, item type), which gguf-py's reader loses for an empty array."""
    c = _Cursor(buf, path)
    if c.unpack("<I", "the magic") != gguf.GGUF_MAGIC:
        raise c.fail(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    version = c.unpack("<I", "the version")
    if version & 0xFFFF == 0:
        raise c.fail(f"GGUF version {version:#x} is byte-swapped: a big-endian file, which is not supported")
    if version not in (2, 3):
        raise c.fail(f"GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the key count")
    if n_kv > (len(buf) - c.pos) // _MIN_KV:
        raise c.fail(f"header: {n_kv} keys cannot fit in the {len(buf) - c.pos} bytes left in the file")
    types: dict[str, tuple[GGUFValueType, ...]] = {}
    align_at = None
    for i in range(n_kv):
        key = c.string(f"key {i}")
        if not key:
            raise c.fail(f"key {i} is empty")
        if key in types:
            raise c.fail(f"key {key}: duplicate key")
        if key == Keys.General.ALIGNMENT:
            align_at = c.pos + 4
        types[key] = _value(c, key)
    if n_tensors > (len(buf) - c.pos) // _MIN_TENSOR_INFO:
        raise c.fail(f"header: {n_tensors} tensors cannot fit in the {len(buf) - c.pos} bytes left in the file")
    seen: set[str] = set()
    infos = [_tensor_info(c, i, seen) for i in range(n_tensors)]
    align = _alignment(c, types, align_at)
    data = _pad(c.pos, align)
    size, after = 0, "the start of the data section"
    for name, ne, qtype, offset in infos:
        if offset != size:
            raise c.fail(f"tensor {name}: data offset {offset}, expected {size}: {after}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(ne) // block * type_size
        after = f"the end of {name} ({qtype.name} {list(ne)}: {nbytes} bytes), padded to {align}"
        if data + offset + nbytes > len(buf):
            raise c.fail(f"truncated: tensor {name} needs bytes up to {data + offset + nbytes}, "
                         f"the file has {len(buf)}")
        size = _pad(offset + nbytes, align)
    if infos and len(buf) > data + size:
        raise c.fail(f"{len(buf) - data - size} bytes follow the data of the last tensor ({infos[-1][0]}), expected "
                     f"none: a tensor's type or shape does not match its data")
    return types


def _type_name(t: tuple[GGUFValueType, ...]) -> str:
    return t[0].name if len(t) == 1 else f"ARRAY of {t[1].name}"


# ---- metadata types ---------------------------------------------------------------------------------------


INT, INTS, FLOAT, BOOL, STR, STRS, INT_ARRAY, FLOAT_ARRAY, FLOATS, BOOL_ARRAY = (
    "an integer", "an integer or an array of integers", "a float", "a bool", "a string", "an array of strings",
    "an array of integers", "an array of floats", "a float or an array of floats", "an array of bools")
_L, _A, _T = Keys.LLM, Keys.Attention, Keys.Tokenizer
KEY_TYPES = {  # the keys this project reads ({arch}: general.architecture's value) -> the kind of value
    Keys.General.ARCHITECTURE: STR, Keys.General.NAME: STR, Keys.General.TYPE: STR, Keys.General.FILE_TYPE: INT,
    Keys.General.QUANTIZATION_VERSION: INT, Keys.Split.LLM_KV_SPLIT_COUNT: INT,
    _L.BLOCK_COUNT: INT, _L.CONTEXT_LENGTH: INT, _L.EMBEDDING_LENGTH: INT, _L.FEED_FORWARD_LENGTH: INTS,
    _L.EXPERT_FEED_FORWARD_LENGTH: INT, _L.EXPERT_COUNT: INT, _L.EXPERT_USED_COUNT: INT,
    _L.EXPERT_SHARED_COUNT: INT, _L.LEADING_DENSE_BLOCK_COUNT: INT, _L.EXPERT_GROUP_COUNT: INT,
    _L.EXPERT_GROUP_USED_COUNT: INT, _L.EXPERT_GATING_FUNC: INT, _L.EXPERT_WEIGHTS_SCALE: FLOAT,
    _L.EXPERT_WEIGHTS_NORM: BOOL, _L.NEXTN_PREDICT_LAYERS: INT,
    _A.HEAD_COUNT: INTS, _A.HEAD_COUNT_KV: INTS, _A.KEY_LENGTH: INT, _A.VALUE_LENGTH: INT,
    _A.LAYERNORM_RMS_EPS: FLOAT, Keys.Rope.DIMENSION_COUNT: INT, Keys.Rope.FREQ_BASE: FLOAT,
    Keys.Rope.SCALING_TYPE: STR, Keys.Rope.SCALING_FACTOR: FLOAT,
    # MLA and YaRN (deepseek2)
    _L.VOCAB_SIZE: INT, _A.Q_LORA_RANK: INT, _A.KV_LORA_RANK: INT, _A.KEY_LENGTH_MLA: INT, _A.VALUE_LENGTH_MLA: INT,
    _A.TEMPERATURE_SCALE: FLOAT, Keys.Rope.SCALING_ORIG_CTX_LEN: INT, Keys.Rope.SCALING_YARN_LOG_MUL: FLOAT,
    Keys.Rope.SCALING_YARN_BETA_FAST: FLOAT, Keys.Rope.SCALING_YARN_BETA_SLOW: FLOAT,
    Keys.Rope.SCALING_ATTN_FACTOR: FLOAT,
    # sliding windows, per-layer heads, SwiGLU clamps (step35)
    _A.SLIDING_WINDOW: INT, _A.SLIDING_WINDOW_PATTERN: BOOL_ARRAY, Keys.Rope.FREQ_BASE_SWA: FLOAT,
    Keys.Rope.DIMENSION_COUNT_SWA: INT, _L.EXPERT_SHARED_FEED_FORWARD_LENGTH: INT, _L.SWIGLU_CLAMP_EXP: FLOATS,
    _L.SWIGLU_CLAMP_SHEXP: FLOATS,
    _T.MODEL: STR, _T.PRE: STR, _T.LIST: STRS, _T.TOKEN_TYPE: INT_ARRAY, _T.MERGES: STRS, _T.SCORES: FLOAT_ARRAY,
    _T.BOS_ID: INT, _T.EOS_ID: INT, _T.EOT_ID: INT, _T.EOM_ID: INT, _T.UNK_ID: INT, _T.PAD_ID: INT,
    _T.ADD_BOS: BOOL, _T.ADD_EOS: BOOL, _T.ADD_PREFIX: BOOL,
    "imatrix.datasets": STRS, "imatrix.chunk_count": INT, "imatrix.chunk_size": INT,
}


def _fits(kind: str, t: tuple[GGUFValueType, ...]) -> bool:
    scalar, items = t[0], t[1] if len(t) > 1 else None
    return {INT: scalar in _INTS, INTS: scalar in _INTS or items in _INTS, FLOAT: scalar in _FLOATS,
            BOOL: scalar == V.BOOL, STR: scalar == V.STRING, STRS: items == V.STRING, INT_ARRAY: items in _INTS,
            FLOAT_ARRAY: items in _FLOATS, FLOATS: scalar in _FLOATS or items in _FLOATS,
            BOOL_ARRAY: items == V.BOOL}[kind]


def check_key_types(types: Mapping[str, tuple[GGUFValueType, ...]], arch: Any, path: Path) -> None:
    """Every key of KEY_TYPES in ``types`` (scan's: an empty array keeps its item type) holds the kind of value
    the readers expect."""
    for pattern, kind in KEY_TYPES.items():
        key = pattern.format(arch=arch)
        t = types.get(key)
        if t is not None and not _fits(kind, t):
            raise GGUFError(f"{path}: key {key} holds {_type_name(t)}, expected {kind}")


REQUIRED = object()


def value(reader: gguf.GGUFReader, key: str, path: Path, default: Any = None, lo: float = -math.inf,
          hi: float = math.inf) -> Any:
    """The value of ``key`` (of the type check_key_types checked); a per-layer array must be uniform and gives its
    value. ``default`` REQUIRED: a missing key is an error. Numbers must be finite and within [lo, hi]."""
    f = reader.fields.get(key)
    if f is None:
        if default is REQUIRED:
            raise GGUFError(f"{path}: missing metadata key {key}")
        return default
    v = f.contents()
    if f.types[0] == V.ARRAY and f.types[-1] != V.STRING:  # llama.cpp's get_key_or_arr
        if not v or len(set(v)) != 1:
            raise GGUFError(f"{path}: key {key} = {v[:8]}{'...' if len(v) > 8 else ''}, expected one value for "
                            f"every layer")
        v = v[0]
    if isinstance(v, (int, float)) and not (lo <= v <= hi and math.isfinite(v)):
        raise GGUFError(f"{path}: key {key} = {v}, expected a value in [{lo}, {hi}]")
    return v


# ---- opening ----------------------------------------------------------------------------------------------


def open_reader(path: str | os.PathLike, error: type[ValueError] = GGUFError) -> gguf.GGUFReader:
    """A GGUFReader of a file that passed regular_file, scan and check_key_types; faults raise ``error``
    (GGUFError by default) with GGUFError's one-line message."""
    try:
        path = regular_file(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                types = scan(path, buf)
        reader = gguf.GGUFReader(path)
        key = Keys.General.ARCHITECTURE
        check_key_types(types, reader.fields[key].contents() if types.get(key) == (V.STRING,) else None, path)
        return reader
    except GGUFError as e:
        if error is GGUFError:
            raise
        raise error(str(e)) from None


@functools.cache
def dequantizable(t: GGMLQuantizationType) -> bool:
    """Whether gguf-py reads (dequantizes) tensors of type t."""
    try:
        gguf.quants.dequantize(np.zeros(GGML_QUANT_SIZES[t][1], np.uint8), t)
    except NotImplementedError:
        return False
    return True


def check_finite(x: np.ndarray, name: str, path: Path, error: type[ValueError] = GGUFError) -> None:
    """``error`` naming the tensor, the count and the first non-finite value of ``x``, if there is one."""
    flat = x.reshape(-1)
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        raise error(f"{path}: tensor {name} contains non-finite values ({int(bad.sum())} of them; first at "
                    f"flat index {i}: {flat[i]})")
