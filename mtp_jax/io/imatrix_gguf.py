"""The importance-matrix file formats of llama.cpp: GGUF (llama-imatrix's default) and the legacy .dat.

Mirrors, in the llama.cpp tree of llama-cpp-python 0.3.36:
* ``read_imatrix``       common/imatrix-loader.cpp ``common_imatrix_load`` (+ the metadata check of
                         tools/quantize/quantize.cpp ``load_imatrix``);
* ``write_imatrix_gguf`` tools/imatrix/imatrix.cpp ``IMatrixCollector::save_imatrix``;
* ``combine``            ``IMatrixCollector::load_imatrix`` over several ``--in-file``s, then save;
* ``to_quant_weights``   quantize.cpp ``load_imatrix``: the per-column weights handed to ggml.

A GGUF imatrix stores raw sums: ``<name>.in_sum2`` = sum over tokens of x^2 per column (per expert for
MoE tensors) and ``<name>.counts`` = the number of tokens (per expert). A legacy .dat stores
``sum/count * ncall`` and one ``ncall`` per tensor, so it is kept in that form (``legacy=True``).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType

from mtp_jax.io.validate import GGUFError, open_reader, output_file, regular_file, value

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_TYPE = "general.type"
_STANDARD_KEYS = (KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


class ImatrixError(ValueError):
    """A malformed, inconsistent or non-finite importance matrix."""


@dataclass
class ImatrixData:
    """An imatrix file's content. Entries are keyed by the weight's tensor name ('blk.0.attn_q.weight')."""

    in_sum2: dict[str, np.ndarray]  # name -> f32[n_mat, K]; n_mat = n_expert for 3-D weights, else 1
    counts: dict[str, np.ndarray]  # name -> f32[n_mat] (token counts; legacy: [ncall])
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)  # further GGUF keys (str, bool, int, float, list[str])
    legacy: bool = False  # from a .dat file: in_sum2 holds sum/count*ncall, shape [1, n_mat*K]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ImatrixError on mismatched entries, or on negative or non-finite values (naming the tensor)."""
        if set(self.in_sum2) != set(self.counts):
            raise ImatrixError(f"mismatched sums and counts for {sorted(set(self.in_sum2) ^ set(self.counts))}")
        if self.chunk_count < 0 or self.chunk_size < 0:
            raise ImatrixError(f"chunk_count {self.chunk_count} and chunk_size {self.chunk_size} must be >= 0")
        for name in self.in_sum2:
            s, c = self.in_sum2[name], self.counts[name]
            if s.ndim != 2 or c.shape != (s.shape[0],):
                raise ImatrixError(f"{name}: in_sum2 {s.shape} and counts {c.shape} do not match ([n_mat, K], [n_mat])")
            _check_finite(name + SUFFIX_SUMS, s)
            _check_finite(name + SUFFIX_COUNTS, c)

    def __len__(self) -> int:
        return len(self.in_sum2)


def _check_finite(name: str, a: np.ndarray) -> None:
    """Sums of squares and counts are finite and >= 0."""
    flat = a.reshape(-1)
    bad = ~(flat >= 0) | ~np.isfinite(flat)
    if bad.any():
        what = "non-finite" if not np.isfinite(flat[bad][0]) else "negative"
        raise ImatrixError(f"imatrix tensor {name} contains {what} value {flat[bad][0]} (expected finite values >= 0)")


def _lround(a: np.ndarray) -> np.ndarray:
    """std::lround (halves away from zero) -> int64."""
    a = np.asarray(a, dtype=np.float64)
    return (np.sign(a) * np.floor(np.abs(a) + 0.5)).astype(np.int64)


# --- reading -------------------------------------------------------------------------------------------------


def read_imatrix(path: str | os.PathLike) -> ImatrixData:
    """Read a GGUF or legacy .dat imatrix (told apart by the GGUF magic, as common_imatrix_load does), validated:
    a regular file, the GGUF checks of mtp_jax.io.validate, typed metadata, F32 sums and counts whose sizes agree,
    finite values >= 0. ImatrixError names the file."""
    path = regular_file(path, ImatrixError)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"cannot read imatrix {path}: {e.strerror}") from None
    return _read_gguf(path) if magic == struct.pack("<I", GGUF_MAGIC) else _read_legacy(path)


def _validated(path: Path, *args: Any, **kw: Any) -> ImatrixData:
    """ImatrixData(*args, **kw), whose validation errors name the file."""
    try:
        return ImatrixData(*args, **kw)
    except ImatrixError as e:
        raise ImatrixError(f"{path}: {e}") from None


def _read_gguf(path: Path) -> ImatrixData:
    r = open_reader(path, ImatrixError)
    if not r.tensors:
        raise ImatrixError(f"no data in file {path}")
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if not all(k in fields for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        raise ImatrixError(f"missing imatrix metadata in file {path} ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, "
                           f"{KEY_CHUNK_SIZE}); is it an imatrix file?")
    try:  # llama.cpp reads them as u32
        chunk_count, chunk_size = (value(r, k, path, lo=0, hi=2**32 - 1) for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    except GGUFError as e:
        raise ImatrixError(str(e)) from None

    pairs: dict[str, dict[str, Any]] = {}
    for t in r.tensors:
        for suffix in (SUFFIX_SUMS, SUFFIX_COUNTS):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise ImatrixError(f"{path}: sums and counts for {t.name[:-len(suffix)]} must be F32, "
                                       f"{t.name} is {t.tensor_type.name}")
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32).ravel()
    sums, counts = {}, {}
    for name, p in sorted(pairs.items()):
        if len(p) != 2:
            raise ImatrixError(f"{path}: mismatched sums and counts for {name}")
        s, c = p[SUFFIX_SUMS], p[SUFFIX_COUNTS]
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{path}: {name}: {s.size} sums cannot be split over {c.size} counts")
        sums[name], counts[name] = s.reshape(c.size, -1), c
    return _validated(
        path, sums, counts,
        datasets=list(fields[KEY_DATASETS].contents()), chunk_count=chunk_count, chunk_size=chunk_size,
        metadata={k: f.contents() for k, f in fields.items() if k not in _STANDARD_KEYS},
    )


def _read_legacy(path: Path) -> ImatrixData:
    """common_imatrix_load_legacy: i32 n_entries, per entry (i32 len, name, i32 ncall, i32 nval,
    f32[nval]), then optionally i32 chunk_count, i32 len, dataset."""
    buf = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise ImatrixError(f"{path}: truncated legacy imatrix (reading {what})")
        pos += n
        return buf[pos - n: pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count") if len(buf) >= 4 else 0
    if n_entries < 1:
        raise ImatrixError(f"no data in file {path} (neither GGUF nor a legacy imatrix)")
    sums, counts = {}, {}
    for i in range(n_entries):
        n = i32(f"entry {i + 1}")
        if n < 0:
            raise ImatrixError(f"{path}: bad name length {n} for entry {i + 1}")
        name = take(n, f"the name of entry {i + 1}").split(b"\0")[0].decode("utf-8", "replace")
        ncall, nval = i32(f"ncall of {name}"), i32(f"nval of {name}")
        if nval < 1:
            raise ImatrixError(f"{path}: failed reading number of values for entry {i + 1} ({name})")
        sums[name] = np.frombuffer(take(4 * nval, f"the data of {name}"), dtype="<f4").astype(np.float32)[None]
        counts[name] = np.array([ncall], dtype=np.float32)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(buf):
        chunk_count = i32("the chunk count")
        if pos + 4 <= len(buf) and (n := i32("the dataset length")) > 0 and pos + n <= len(buf):
            datasets.append(take(n, "the dataset name").split(b"\0")[0].decode("utf-8", "replace"))
    return _validated(path, sums, counts, datasets=datasets, chunk_count=chunk_count, chunk_size=0, legacy=True)


# --- writing -------------------------------------------------------------------------------------------------


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(key: str, value: Any) -> bytes:
    """One key/value pair; Python types map to GGUF types as llama-imatrix uses them (ints -> u32)."""
    if isinstance(value, str):
        return _gguf_str(key) + struct.pack("<I", GGUFValueType.STRING) + _gguf_str(value)
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise TypeError(f"imatrix metadata {key}: only lists of strings are supported")
        return (_gguf_str(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(value))
                + b"".join(_gguf_str(v) for v in value))
    if isinstance(value, (bool, np.bool_)):
        return _gguf_str(key) + struct.pack("<I?", GGUFValueType.BOOL, bool(value))
    if isinstance(value, (int, np.integer)):
        if 0 <= value < 2**32:
            return _gguf_str(key) + struct.pack("<II", GGUFValueType.UINT32, int(value))
        return _gguf_str(key) + struct.pack("<Iq", GGUFValueType.INT64, int(value))
    if isinstance(value, (float, np.floating)):
        return _gguf_str(key) + struct.pack("<If", GGUFValueType.FLOAT32, float(value))
    raise TypeError(f"imatrix metadata {key}: unsupported value type {type(value).__name__}")


def _pad(n: int, align: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def write_imatrix_gguf(data: ImatrixData, path: str | os.PathLike) -> Path:
    """Write ``data`` as llama-imatrix does (save_imatrix); atomically (temp file + os.replace).

    Keys: general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size (u32), then
    ``data.metadata``. Tensors, by sorted name: ``<name>.in_sum2`` ne = [K, n_mat] and ``<name>.counts``
    ne = [1, n_mat], F32, with trailing 1-dims dropped as ggml_n_dims does.
    """
    data.validate()
    if data.legacy:
        raise ImatrixError("legacy (.dat) data holds sum/count*ncall, not raw sums: convert it with combine([data], "
                           "chunk_size=...) as llama-imatrix --in-file does")
    kvs = [_gguf_kv(KEY_TYPE, "imatrix"), _gguf_kv(KEY_DATASETS, list(data.datasets)),
           _gguf_kv(KEY_CHUNK_COUNT, int(data.chunk_count)), _gguf_kv(KEY_CHUNK_SIZE, int(data.chunk_size))]
    kvs += [_gguf_kv(k, v) for k, v in data.metadata.items() if k not in _STANDARD_KEYS]

    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(data.in_sum2):
        s = np.ascontiguousarray(data.in_sum2[name], dtype=np.float32)  # [n_mat, K]
        if s.size:
            counts = np.asarray(data.counts[name], np.float32)[:, None]  # [n_mat, 1]
            tensors += [(name + SUFFIX_SUMS, s), (name + SUFFIX_COUNTS, counts)]
    infos, offset = [], 0
    for name, a in tensors:
        ne = a.shape[::-1]
        while len(ne) > 1 and ne[-1] == 1:
            ne = ne[:-1]
        infos.append(_gguf_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, GGMLQuantizationType.F32, offset))
        offset += _pad(a.nbytes)
    header = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)

    def write(f):
        f.write(header + bytes(_pad(len(header)) - len(header)))
        for _, a in tensors:
            f.write(a.tobytes() + bytes(_pad(a.nbytes) - a.nbytes))

    return atomic_write(Path(path), write)


def atomic_write(path: Path, write) -> Path:
    """Call write(f) on a temp file next to ``path`` and rename it over ``path``; no file is left on failure."""
    output_file(path, FileNotFoundError)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# --- combining and use ---------------------------------------------------------------------------------------


def combine(datas: Sequence[ImatrixData], chunk_size: int | None = None) -> ImatrixData:
    """What ``llama-imatrix --in-file a --in-file b ... -o out`` computes (no prompt).

    Sums add in f32 in file order; counts add as integers (lround of the stored f32); the tensor sets
    are united (a tensor seen in some files keeps only their data); a single count broadcasts to an
    expert count; datasets are concatenated; chunk_count = max count // chunk_size. A legacy file
    adds sums*chunk_size and ncall*chunk_size. chunk_size is llama-imatrix's n_ctx/n_parallel
    (512 with its defaults); None takes the one the GGUF inputs agree on.

    Files for another model (an entry with another number of values or experts) raise ImatrixError.
    """
    if not datas:
        raise ImatrixError("nothing to combine")
    if chunk_size is None:
        sizes = {d.chunk_size for d in datas if not d.legacy}
        if len(sizes) != 1 or 0 in sizes:
            raise ImatrixError(f"inputs have chunk sizes {sorted(sizes) or 'unknown (legacy)'}; pass chunk_size")
        (chunk_size,) = sizes
    if chunk_size < 1:
        raise ImatrixError(f"chunk_size must be positive, got {chunk_size}")

    values: dict[str, np.ndarray] = {}  # f32[n_mat*K], flat as IMatrixCollector's Stats.values
    counts: dict[str, np.ndarray] = {}  # int64[n_mat]
    datasets: list[str] = []
    for i, d in enumerate(datas):
        for name in sorted(d.in_sum2):
            s = d.in_sum2[name].reshape(-1)
            if name in values and values[name].size != s.size:
                raise ImatrixError(f"mismatched sums size for {name}: {s.size} != {values[name].size} (input {i}); "
                                   "are these imatrix files for the same model?")
            v = values.setdefault(name, np.zeros(s.size, np.float32))
            if d.legacy:
                v += s * np.float32(chunk_size)
                c = counts.setdefault(name, np.zeros(1, np.int64))
                c += int(d.counts[name][0]) * chunk_size
                continue
            v += s
            n = _lround(d.counts[name])
            c = counts.setdefault(name, np.zeros(n.size, np.int64))
            if c.size == 1 and n.size > 1:
                c = counts[name] = np.full(n.size, c[0], np.int64)
            elif c.size != n.size:
                raise ImatrixError(f"mismatched counts size for {name}: {n.size} != {c.size} (input {i}); "
                                   "are these imatrix files for the same model?")
            c += n
        datasets += d.datasets
    max_count = max((int(c.max()) for c in counts.values()), default=0)
    return ImatrixData(
        {n: v.reshape(counts[n].size, -1) for n, v in values.items()},
        {n: c.astype(np.float32) for n, c in counts.items()},
        datasets=datasets, chunk_count=max_count // chunk_size, chunk_size=chunk_size,
    )


def check_model(data: ImatrixData, sizes: Mapping[str, int | None], path: Any = "") -> set[str]:
    """``data`` against the model it is used with: ``sizes`` maps each tensor of the model to the number of values
    its entry has (row length x experts; None: any, as llama-quantize does for token embeddings). An entry for a
    tensor the model lacks, or of another size, raises ImatrixError (an imatrix of another model); returns the
    model's tensors without an entry."""
    for name, s in sorted(data.in_sum2.items()):
        if name not in sizes:
            raise ImatrixError(f"{path}: imatrix entry {name} is not a tensor of the model (an imatrix of another "
                               f"model?)")
        if sizes[name] is not None and s.size != sizes[name]:
            raise ImatrixError(f"{path}: imatrix size {s.size} is different from tensor size {sizes[name]} for "
                               f"{name} (an imatrix of another model?)")
    return set(sizes) - set(data.in_sum2)


def to_quant_weights(data: ImatrixData) -> dict[str, np.ndarray]:
    """name -> f32[n_mat*K], the importance llama-quantize passes to ggml (expert e: [e*K:(e+1)*K]).

    GGUF: in_sum2 / count per expert, f32; an expert with count 0 gets all ones. Legacy: sums / ncall
    (sums as stored when ncall is 0).
    """
    out = {}
    for name, s in data.in_sum2.items():
        c = data.counts[name]
        if data.legacy:
            ncall = int(c[0])
            w = s.reshape(-1) / np.float32(ncall) if ncall > 0 else s.reshape(-1).copy()
        else:
            n = _lround(c).astype(np.float32)[:, None]  # [n_mat, 1]
            w = np.where(n > 0, s / np.where(n > 0, n, np.float32(1)), np.float32(1)).reshape(-1)
        w = w.astype(np.float32, copy=False)
        _check_finite(name, w)
        out[name] = w
    return out
