"""Damaged copies of good GGUF files, for the validation and fuzz tests: byte-level edits at known places of the
header (located with gguf-py's reader) and rewrites through gguf-py's writer."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType


@dataclass(frozen=True)
class Anatomy:
    """Where things are in a GGUF file: the start of the key/values, of the tensor infos and of the data, each key's
    field offset and each tensor's info offset and data offset."""

    data: bytes
    keys: dict[str, int]
    infos: dict[str, int]
    tensor_data: dict[str, tuple[int, gguf.GGMLQuantizationType]]
    kv_start: int
    info_start: int
    data_start: int
    data_end: int  # of the last tensor's data (the padding after it not included)


def anatomy(path: Path) -> Anatomy:
    r = gguf.GGUFReader(path)
    keys = {k: f.offset for k, f in r.fields.items() if not k.startswith("GGUF.")}
    infos = {t.name: t.field.offset for t in r.tensors}
    return Anatomy(path.read_bytes(), keys, infos, {t.name: (t.data_offset, t.tensor_type) for t in r.tensors},
                   min(keys.values()), min(infos.values()), r.data_offset,
                   max(t.data_offset + t.n_bytes for t in r.tensors))


def put(data: bytes, pos: int, fmt: str, *values) -> bytes:
    """``data`` with struct-packed ``values`` written at ``pos``."""
    b = struct.pack(fmt, *values)
    return data[:pos] + b + data[pos + len(b):]


def value_pos(a: Anatomy, key: str) -> int:
    """The offset of the key's value type (the value follows it)."""
    return a.keys[key] + 8 + len(key.encode())


def info_pos(a: Anatomy, name: str) -> dict[str, int]:
    """Offsets of a tensor info's n_dims, dims, type and data offset fields."""
    at = a.infos[name] + 8 + len(name.encode())
    n_dims = struct.unpack_from("<I", a.data, at)[0]
    return {"n_dims": at, "dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}


def rewrite(src, dst, arch=None, tensors=None, kv=None):
    """Copy a GGUF through gguf-py, changing the arch, tensors (fn(name, numpy array, type) -> (array, type), or
    None to drop the tensor) or metadata (kv: key -> (value, GGUFValueType[, item type]), or None to drop it)."""
    r = gguf.GGUFReader(src)
    f = r.fields.get("general.architecture")
    w = gguf.GGUFWriter(dst, arch or (f.contents() if f is not None else "none"))
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or (kv and k in kv):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub)
    for k, v in (kv or {}).items():
        if v is not None:
            w.add_key_value(k, *v)
    for t in r.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if tensors is not None:
            out = tensors(t.name, data, qtype)
            if out is None:
                continue
            data, qtype = out
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def drop(*names: str):
    """A ``tensors`` function for rewrite that leaves out the named tensors."""
    return lambda n, d, t: None if n in names else (d, t)


def nan_at(a: Anatomy, name: str, index: int = 3) -> bytes:
    """The file with element ``index`` of an F32 or F16 tensor set to NaN."""
    off, qtype = a.tensor_data[name]
    if qtype == gguf.GGMLQuantizationType.F32:
        return put(a.data, off + 4 * index, "<f", float("nan"))
    assert qtype == gguf.GGMLQuantizationType.F16, qtype
    return put(a.data, off + 2 * index, "<H", 0x7E00)
