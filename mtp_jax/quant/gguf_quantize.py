"""quantize_gguf: a whole GGUF file from F32/F16/BF16 to an llama-quantize ftype, file for file.

Mirrors ``llama_model_quantize_impl`` (src/llama-quant.cpp, llama-cpp-python 0.3.36 tree) and the
metadata tools/quantize/quantize.cpp adds: the same key/value pairs in the same order, the same tensor
order and types (mtp_jax.quant.policy), the same data and alignment, so the output can be compared
byte for byte with llama-quantize's. Differences: the header is written first and the tensors streamed
after it in pieces of rows (mtp_jax.quant.stream: read from the memory-mapped input, converted, written,
released, so memory holds a few pieces, never the file), every imatrix / input-type error is raised
before any data is written, and the output appears only on success (a failed llama-quantize leaves a
partial file). The input is validated first (mtp_jax.io.validate; a model of a registered family also
against its tensor table, without importing jax), and an imatrix against the model (imatrix_gguf.check_model).
Quantized inputs (--allow-requantize) are dequantized by gguf-py. A split model (``NAME-00001-of-0000N.gguf``, split.*
keys as llama-gguf-split writes them) is read from its first file, as llama.cpp's model loader does;
``keep_split`` writes one output per input split, as llama-quantize --keep-split.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_MAGIC, GGUF_VERSION, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf import ReaderTensor
from gguf import Keys, LlamaFileType
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mtp_jax.families import ARCHS
from mtp_jax.io.imatrix_gguf import check_model, read_imatrix, to_quant_weights
from mtp_jax.io.split import ModelFiles, open_model_files, split_path
from mtp_jax.io.validate import GGUFError, output_file, regular_file
from mtp_jax.quant import policy, registry, stream
from mtp_jax.quant.base import QuantError
from mtp_jax.quant.policy import FLOAT_TYPES, ModelInfo, QuantOptions, TensorDesc, TensorPlan, ggml_type_name

log = logging.getLogger(__name__)

# quantize.cpp's LLM_KV_QUANTIZE_IMATRIX_*
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
_SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
GGUF_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorReport:
    name: str
    ne: tuple[int, ...]
    src_type: GGMLQuantizationType
    dst_type: GGMLQuantizationType
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class QuantizeSummary:
    out_path: Path | None  # None: a dry run; with keep_split, the first split's file
    ftype: str  # the file type's name, COPY included
    tensors: tuple[TensorReport, ...]
    n_elements: int
    n_fallback: int  # tensors whose row size forced a fallback type
    mtp_promoted: tuple[str, ...]  # NextN/MTP tensors promoted by mtp_fallback
    seconds: float
    would_fail: str | None = None  # a dry run: the first error the real run would raise
    out_paths: tuple[Path, ...] = ()  # every file written (keep_split: one per split)

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    @property
    def bpw_in(self) -> float:
        return self.bytes_in * 8 / self.n_elements

    @property
    def bpw_out(self) -> float:
        return self.bytes_out * 8 / self.n_elements

    def describe(self) -> str:
        lines = [f"model size  = {self.bytes_in / 2**20:8.2f} MiB ({self.bpw_in:.2f} BPW)",
                 f"quant size  = {self.bytes_out / 2**20:8.2f} MiB ({self.bpw_out:.2f} BPW)"]
        if self.out_path is None:
            lines.append(f"dry run: {len(self.tensors)} tensors as {self.ftype}, no file written")
        else:
            where = (f"{len(self.out_paths)} split files {self.out_paths[0]} .. {self.out_paths[-1].name}"
                     if len(self.out_paths) > 1 else self.out_path)
            lines.append(f"{len(self.tensors)} tensors as {self.ftype} -> {where} in {self.seconds:.1f} s")
        if self.would_fail:
            lines.append(f"WARNING: dry run completed, but the quantization itself would fail: {self.would_fail}")
        if self.n_fallback:
            lines.append(f"WARNING: {self.n_fallback} of {len(self.tensors)} tensor(s) required fallback quantization")
        if self.mtp_promoted:
            lines.append(f"{len(self.mtp_promoted)} NextN/MTP tensor(s) promoted by mtp_fallback: "
                         + ", ".join(self.mtp_promoted))
        return "\n".join(lines)


def quantize_gguf(in_path: str | os.PathLike, out_path: str | os.PathLike | None,
                  ftype: str | int | LlamaFileType, imatrix: str | os.PathLike | None = None, *,
                  pure: bool = False, output_tensor_type: str | GGMLQuantizationType | None = None,
                  token_embedding_type: str | GGMLQuantizationType | None = None,
                  tensor_types: Sequence[str | tuple[str, str | GGMLQuantizationType]] = (),
                  include_weights: Sequence[str] = (), exclude_weights: Sequence[str] = (),
                  leave_output_tensor: bool = False, allow_requantize: bool = False, dry_run: bool = False,
                  mtp_fallback: str | GGMLQuantizationType | None = None, threads: int | None = None,
                  keep_split: bool = False, progress: bool = True) -> QuantizeSummary:
    """Quantize the GGUF at ``in_path`` to ``out_path`` as ``llama-quantize [options] IN OUT FTYPE [threads]``.

    ftype: a file type's name or number, or "COPY" (every tensor copied as it is, general.file_type
    kept). imatrix: a GGUF or legacy .dat importance matrix (--imatrix). tensor_types: 'PATTERN=TYPE'
    strings or (pattern, type) pairs (--tensor-type). include_weights / exclude_weights: name substrings
    that select the imatrix entries to keep / to drop (--include-weights / --exclude-weights, one or the
    other). leave_output_tensor: output.weight keeps its type. allow_requantize: quantized input tensors
    are dequantized and quantized again instead of refused. dry_run: plan and size every tensor and
    write nothing (``out_path`` unused); the errors llama-quantize's dry run skips end up in the
    summary's ``would_fail``. mtp_fallback: the type a NextN/MTP-block tensor gets when it needs an
    imatrix and has no entry (None: llama.cpp's error). threads: processes converting pieces of rows,
    this one included (default: all CPUs). ``in_path`` may be the first file of a split model
    (``NAME-00001-of-0000N.gguf``); keep_split: one output per input split, named as llama-quantize
    names them (``out_path`` less a ".gguf" + ``-0000k-of-0000n.gguf``), with the split.* keys, so
    llama-gguf-split --merge joins them (tensors in split order, which the type choice follows too).
    Raises QuantError (a ValueError) on bad input; no output is left then.
    """
    t0 = time.perf_counter()
    opts = _options(ftype, pure, output_tensor_type, token_embedding_type, tensor_types, mtp_fallback,
                    leave_output_tensor, allow_requantize)
    if out_path is None and not dry_run:
        raise QuantError("an output path is required (except for a dry run)")
    in_path, out_path = Path(in_path), None if dry_run else Path(out_path)
    _check_paths(in_path, out_path)
    threads = (os.cpu_count() or 1) if threads is None else threads
    if threads < 1:
        raise QuantError(f"threads must be >= 1, got {threads}")

    src = _open(in_path)
    fields = {k: f.contents() for k, f in src.readers[0].fields.items() if not k.startswith("tokenizer.")}
    where = {t.name: (i, t.data_offset) for i, t in src.tensors}
    tensors = sorted(src.tensors, key=lambda it: (it[0], it[1].data_offset)) if keep_split else src.tensors
    descs = _tensor_descs(t for _, t in tensors)
    weights, imatrix_kvs, unused = _load_imatrix(imatrix, include_weights, exclude_weights, descs)
    deferred = [] if dry_run else None
    try:
        model = ModelInfo.from_metadata(fields)
    except QuantError as e:
        raise QuantError(f"{in_path}: {e}") from None
    plans = policy.plan_tensors(model, descs, opts, {k: v.size for k, v in weights.items()}, deferred,
                                keep_order=keep_split)
    _check_quantizers(plans, deferred)
    _warn_uncovered(imatrix, plans, unused)

    reports: list[TensorReport] = []
    out_paths: list[Path] = []
    if dry_run:
        for i, p in enumerate(plans):
            reports.append(_report(p, _nbytes(p.type, p.desc.ne)))
            _log_tensor(i, len(plans), p, reports[-1], dry_run=True)
    else:
        file_type = policy.copy_file_type(fields.get(Keys.General.FILE_TYPE), descs) if opts.only_copy else opts.ftype
        kvs = _metadata(src.readers[0], file_type, imatrix_kvs)
        outputs = _outputs(out_path, plans, where, kvs, int(src.readers[0].alignment), keep_split)
        out_paths = [o.path for o in outputs]
        _check_outputs(src.paths, out_paths)
        paths = [str(p) for p in src.paths]
        del src, tensors  # the readers (and their maps) are not needed for the data
        _atomic_write_all(out_paths, lambda files: _write_data(files, outputs, where, paths, weights, threads,
                                                               progress, reports))
    return QuantizeSummary(out_paths[0] if out_paths else out_path,
                           policy.COPY if opts.only_copy else policy.ftype_name(opts.ftype),
                           tuple(reports), sum(int(np.prod(p.desc.ne)) for p in plans),
                           sum(p.fallback for p in plans), tuple(p.name for p in plans if p.mtp_promoted),
                           time.perf_counter() - t0, deferred[0] if deferred else None, tuple(out_paths))


def _options(ftype, pure, output_tensor_type, token_embedding_type, tensor_types, mtp_fallback,
             leave_output_tensor, allow_requantize) -> QuantOptions:
    def qtype(t):
        return None if t is None else policy.parse_ggml_type(t)

    only_copy = isinstance(ftype, str) and ftype.strip().upper() == policy.COPY
    return QuantOptions(
        ftype=LlamaFileType.ALL_F32 if only_copy else policy.parse_ftype(ftype), pure=pure, only_copy=only_copy,
        quantize_output_tensor=not leave_output_tensor, allow_requantize=allow_requantize,
        output_tensor_type=qtype(output_tensor_type), token_embedding_type=qtype(token_embedding_type),
        mtp_fallback=qtype(mtp_fallback),
        tensor_types=tuple(policy.parse_tensor_type(
            s if isinstance(s, str) else f"{s[0]}={getattr(s[1], 'name', s[1])}") for s in tensor_types))


def _check_quantizers(plans: Sequence[TensorPlan], deferred: list[str] | None) -> None:
    """Every target type needs a registered quantizer; a dry run notes the first that has none."""
    for p in plans:
        if p.converts and p.type not in FLOAT_TYPES:
            try:
                registry.quant_type(p.type)
            except QuantError as e:
                if deferred is None:
                    raise
                deferred.append(str(e))
                return


@dataclass(frozen=True)
class _Output:
    path: Path
    header: bytes
    plans: tuple[TensorPlan, ...]
    align: int


def keep_split_prefix(out_path: str | os.PathLike) -> str:
    """The prefix llama-quantize --keep-split names its outputs after: the output path less its last five
    characters when ".gguf" occurs in it (quantize.cpp's test, kept as it is)."""
    name = os.fspath(out_path)
    return name[:-5] if ".gguf" in name else name


def _outputs(out_path: Path, plans: Sequence[TensorPlan], where: dict[str, tuple[int, int]], kvs: list[bytes],
             align: int, keep_split: bool) -> list[_Output]:
    """The output file(s), each with its header and tensors. keep_split: one per input split, up to the last
    split holding a tensor (a split of no tensors, as --no-tensor-first-split makes, gets a file of none);
    the first has the model's key/values; when there are several, each has split.no / split.count /
    split.tensors.count appended (and the others no other key, hence ggml's default alignment)."""
    if not keep_split:
        return [_Output(out_path, _header(kvs, plans, align), tuple(plans), align)]
    n_split = max((where[p.name][0] + 1 for p in plans), default=1)
    prefix = keep_split_prefix(out_path)
    outputs = []
    for i in range(n_split):
        mine = tuple(p for p in plans if where[p.name][0] == i)
        split_kvs = [_kv_u16(Keys.Split.LLM_KV_SPLIT_NO, i), _kv_u16(Keys.Split.LLM_KV_SPLIT_COUNT, n_split),
                     _kv_i32(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(plans))] if n_split > 1 else []
        a = align if i == 0 else GGUF_DEFAULT_ALIGNMENT
        header = _header((kvs if i == 0 else []) + split_kvs, mine, a)
        outputs.append(_Output(split_path(prefix, i, n_split), header, mine, a))
    return outputs


def _atomic_write_all(paths: Sequence[Path], write: Callable[[list], None]) -> None:
    """Call write(files) on temp files next to ``paths`` and rename them over ``paths`` when it returns; no
    file is left on failure (imatrix_gguf.atomic_write for several files)."""
    tmps: list[str] = []
    try:
        files = []
        for path in paths:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmps.append(tmp)
            files.append(os.fdopen(fd, "wb"))
        try:
            write(files)
        finally:
            for f in files:
                f.close()
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(tmps, paths):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _write_data(files: list, outputs: Sequence[_Output], where: dict[str, tuple[int, int]], paths: Sequence[str],
                weights: dict[str, np.ndarray], threads: int, progress: bool, reports: list[TensorReport]) -> None:
    """Each output's header, then its tensors, each padded to the alignment, from pieces converted by
    ``threads`` processes (mtp_jax.quant.stream)."""
    all_plans = [p for o in outputs for p in o.plans]

    def pieces():
        for p in all_plans:
            file, offset = where[p.name]
            yield from stream.pieces(p.name, file, offset, p.desc.type, p.type, p.desc.ne,
                                     weights.get(p.name) if p.use_imatrix else None)

    i = 0
    types = {(p.type, p.use_imatrix and p.name in weights) for p in all_plans if p.type != p.desc.type}
    with closing(stream.convert(pieces(), paths, threads, types)) as results, logging_redirect_tqdm(), \
            tqdm(total=len(all_plans), desc="quantize", unit="tensor", disable=not progress) as bar:
        for f, o in zip(files, outputs):
            f.write(o.header)
            for p in o.plans:
                n_out = sum(f.write(next(results)[1]) for _ in range(stream.count(p.desc.ne)))
                if n_out != _nbytes(p.type, p.desc.ne):  # the header says so
                    raise AssertionError(f"{p.name}: {n_out} bytes written, {_nbytes(p.type, p.desc.ne)} expected")
                f.write(bytes(_pad(n_out, o.align) - n_out))
                reports.append(_report(p, n_out))
                _log_tensor(i, len(all_plans), p, reports[-1])
                bar.update()
                i += 1


def _check_paths(in_path: Path, out_path: Path | None) -> None:
    """The input is a regular file; the output (None: a dry run) can be written: its directory exists and it is
    not a directory."""
    regular_file(in_path, QuantError)
    if out_path is not None:
        output_file(out_path, QuantError)


def _check_outputs(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    for o in outputs:
        for i in inputs:
            if o.exists() and os.path.samefile(i, o):
                raise QuantError(f"input and output files are the same: '{i}'")


def _open(path: Path) -> ModelFiles:
    """The input, validated (mtp_jax.io.validate; a model of a registered family also against its tensor table, as
    loading does); a split model's other files found and checked as llama_model_loader does (io/split.py)."""
    inp = open_model_files(path, QuantError)
    reader = inp.readers[0]
    arch = reader.fields.get(Keys.General.ARCHITECTURE)
    if arch is not None and arch.contents() in ARCHS:  # a family we model: its tensor table is checked
        from mtp_jax.io.gguf_model import check_tensors, config_from_gguf  # (no jax: see its docstring)

        whole = inp.whole()  # every split's tensors
        try:
            check_tensors(whole, config_from_gguf(whole, path), path)
        except GGUFError as e:
            raise QuantError(str(e)) from None
    return inp


def _tensor_descs(tensors: Iterable[ReaderTensor]) -> list[TensorDesc]:
    descs = []
    for t in tensors:
        ne = tuple(int(n) for n in t.shape) or (1,)  # n_dims 0: a scalar, ne = [1] as in ggml
        while len(ne) > 1 and ne[-1] == 1:
            ne = ne[:-1]
        descs.append(TensorDesc(t.name, ne, GGMLQuantizationType(t.tensor_type)))
    return descs


def _load_imatrix(path: str | os.PathLike | None, include: Sequence[str], exclude: Sequence[str],
                  descs: Sequence[TensorDesc]) -> tuple[dict[str, np.ndarray], list[bytes], set[str]]:
    """The per-column weights (to_quant_weights), the quantize.imatrix.* pairs quantize.cpp adds, and the names
    of the model's tensors the imatrix has no entry for.

    The imatrix must fit the model (imatrix_gguf.check_model: ImatrixError otherwise). As prepare_imatrix:
    entries whose name contains an ``exclude`` string are dropped, or only those that contain an ``include``
    string kept; entries_count counts what is left, and nothing left means no imatrix at all (no pairs, and
    the mixtures of a model without one)."""
    if include and exclude:
        raise QuantError("--include-weights and --exclude-weights cannot be used together")
    if path is None:
        if include or exclude:
            raise QuantError("--include-weights / --exclude-weights select importance matrix entries; "
                             "pass --imatrix")
        return {}, [], set()
    data = read_imatrix(path)
    unused = check_model(data, {d.name: None if policy.is_token_embd(d.name) else d.ne[0] * d.dim(2)
                                for d in descs}, path)
    weights = to_quant_weights(data)
    log.info("loaded %d importance matrix entries from %s computed on %d chunks", len(weights), path,
             data.chunk_count)
    if include or exclude:
        weights = {k: v for k, v in weights.items()
                   if not any(s in k for s in exclude) and (not include or any(s in k for s in include))}
        log.info("have %d importance matrix entries", len(weights))
    if not weights:
        return {}, [], unused
    kvs = [_kv_str(KEY_IMATRIX_FILE, os.fspath(path))]
    if data.datasets:
        kvs.append(_kv_str(KEY_IMATRIX_DATASET, data.datasets[0]))
    kvs.append(_kv_u32(KEY_IMATRIX_N_ENTRIES, len(weights)))
    if data.chunk_count > 0:
        kvs.append(_kv_u32(KEY_IMATRIX_N_CHUNKS, data.chunk_count))
    return weights, kvs, unused


def _warn_uncovered(path: str | os.PathLike | None, plans: Sequence[TensorPlan], unused: set[str]) -> None:
    """Warn about the tensors quantized here that an imatrix from llama-imatrix would cover but this one does not
    (token_embd and output.weight are left out: llama-imatrix collects neither by default)."""
    missing = [p.name for p in plans if p.name in unused and p.converts and p.type not in FLOAT_TYPES
               and p.name not in ("token_embd.weight", "output.weight")]
    if missing:
        log.warning("imatrix %s has no entries for %d tensor(s) quantized here: %s", path, len(missing),
                    ", ".join(missing))


# --- the GGUF header -----------------------------------------------------------------------------------------


def _gguf_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _gguf_str(key) + struct.pack("<II", GGUFValueType.UINT32, v)


def _kv_u16(key: str, v: int) -> bytes:
    return _gguf_str(key) + struct.pack("<IH", GGUFValueType.UINT16, v)


def _kv_i32(key: str, v: int) -> bytes:
    return _gguf_str(key) + struct.pack("<Ii", GGUFValueType.INT32, v)


def _kv_str(key: str, v: str) -> bytes:
    """A string override as quantize.cpp sets it (strncpy into char[128]: at most 127 bytes)."""
    return _gguf_str(key) + struct.pack("<I", GGUFValueType.STRING) + _gguf_str(v.encode("utf-8")[:127])


def _kv_name(kv: bytes) -> str:
    (n,) = struct.unpack_from("<Q", kv)
    return kv[8:8 + n].decode("utf-8")


def _metadata(reader: GGUFReader, file_type: int, imatrix_kvs: list[bytes]) -> list[bytes]:
    """The key/value pairs in llama-quantize's order: gguf_set_kv copies the input's; set_val removes a
    key and appends it (quantization_version, file_type, then the --imatrix overrides); split keys go."""
    appended = [_kv_u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION),
                _kv_u32(Keys.General.FILE_TYPE, int(file_type)), *imatrix_kvs]
    dropped = {*_SPLIT_KEYS, *(_kv_name(kv) for kv in appended)}
    kept = []
    for name, f in reader.fields.items():
        if not name.startswith("GGUF.") and name not in dropped:
            kept.append(reader.data[f.offset: f.offset + sum(p.nbytes for p in f.parts)].tobytes())
    return kept + appended


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _header(kvs: list[bytes], plans: Sequence[TensorPlan], align: int) -> bytes:
    """Magic, version, counts, key/values, tensor infos (offsets for the new types), padding."""
    infos, offset = [], 0
    for p in plans:
        ne = p.desc.ne
        infos.append(_gguf_str(p.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, p.type, offset))
        offset += _pad(_nbytes(p.type, ne), align)
    h = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(plans), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return h + bytes(_pad(len(h), align) - len(h))


def _nbytes(t: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    return policy.row_bytes(t, ne[0]) * int(np.prod(ne[1:], dtype=np.int64))


# --- tensor data ---------------------------------------------------------------------------------------------


def _report(p: TensorPlan, n_out: int) -> TensorReport:
    return TensorReport(p.name, p.desc.ne, p.desc.type, p.type, _nbytes(p.desc.type, p.desc.ne), n_out)


def _log_tensor(i: int, n: int, p: TensorPlan, r: TensorReport, dry_run: bool = False) -> None:
    """llama-quantize's line for the tensor; a dry run's is the same as llama-quantize --dry-run's."""
    shape = ", ".join(f"{d:6d}" for d in (*r.ne, *(1,) * (4 - len(r.ne))))
    head = f"[{i + 1:4d}/{n:4d}] {r.name:<36} - [{shape}], type = {ggml_type_name(r.src_type):>6}, "
    if p.converts and dry_run:
        log.info("%ssize = %8.2f MiB -> %8.2f MiB (%s)", head, r.bytes_in / 2**20, r.bytes_out / 2**20,
                 ggml_type_name(r.dst_type))
    elif p.converts:
        note = " (fallback)" if p.fallback else " (mtp_fallback)" if p.mtp_promoted else ""
        log.info("%sconverting to %s%s .. size = %8.2f MiB -> %8.2f MiB", head, ggml_type_name(r.dst_type), note,
                 r.bytes_in / 2**20, r.bytes_out / 2**20)
    else:
        log.info("%ssize = %8.3f MiB", head, r.bytes_in / 2**20)
