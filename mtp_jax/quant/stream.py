"""Tensor data for quantize_gguf, streamed: pieces of rows read from the memory-mapped input, converted, released.

A tensor is cut into pieces of whole rows, each inside one expert (an expert has its own imatrix slice) and of
at most PIECE_ELEMENTS values where the rows allow it. A piece is read from a read-only memory map of its input
file, dequantized to f32 and checked, converted, and its pages are then dropped from the process (MADV_DONTNEED:
they stay in the page cache), as llama-quantize unmaps each weight after use. So a process holds a few pieces at
a time, never the file. With ``threads`` > 1, ``threads - 1`` worker processes (forked, sharing this process's
imports, where no jax runs here: its threads make fork unsafe, and then spawned, importing only the quantizers;
they map the input themselves) convert pieces too, and this process converts every ``threads``-th
large piece, and any piece of its own while it waits, as llama-quantize's main thread works beside its workers.
At most 2 * threads + 2 pieces are in flight; the results come back in file order.
"""

from __future__ import annotations

import functools
import gc
import mmap
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from mtp_jax.quant import registry
from mtp_jax.quant.base import QK_K, QuantError
from mtp_jax.quant.policy import FLOAT_TYPES, row_bytes

_MALLOC = ((-3, 32 << 20), (-1, 64 << 20))  # glibc mallopt: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@functools.cache
def tune_malloc() -> None:
    """Keep freed piece temporaries in the heap (glibc; elsewhere nothing): with its default, dynamic thresholds
    glibc returns the grid types' ~1-16 MB temporaries to the kernel after every piece and page-faults them back
    in the next (IQ1_M: ~100K faults, ~25% of its time). Set once per process (cached); the peak RSS stays
    that of one piece's working set, which is what is kept."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for param, value in _MALLOC:
            libc.mallopt(param, value)
    except (OSError, AttributeError):
        pass


PIECE_ELEMENTS = 1 << 20  # values per piece (4 MiB as f32): the quantizers run at full speed from ~400K values
POOL_MIN_ELEMENTS = 1 << 16  # smaller pieces are converted in this process (sending them would cost more)


@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0 + nrows) of one tensor, inside one expert."""

    name: str
    file: int  # which input file (the splits of a split model, in order)
    offset: int  # of the tensor's data in that file
    src: GGMLQuantizationType
    dst: GGMLQuantizationType
    n_per_row: int
    row0: int
    nrows: int
    imatrix: np.ndarray | None  # f32[n_per_row], the expert's slice

    @property
    def converts(self) -> bool:
        return self.src != self.dst

    @property
    def elements(self) -> int:
        return self.nrows * self.n_per_row


def _rows_per_piece(n_per_row: int, per_expert: int, max_elements: int) -> int:
    """Equal pieces of an expert's rows, each of at most max_elements values (one row at least)."""
    k = -(-per_expert // max(1, max_elements // n_per_row))
    return -(-per_expert // k)


def count(ne: Sequence[int], max_elements: int | None = None) -> int:
    """How many pieces ``pieces`` cuts a tensor of shape ``ne`` into (max_elements: PIECE_ELEMENTS)."""
    per_expert = ne[1] if len(ne) > 1 else 1
    n_mat = int(np.prod(ne[2:], dtype=np.int64))
    return n_mat * -(-per_expert // _rows_per_piece(ne[0], per_expert, max_elements or PIECE_ELEMENTS))


def pieces(name: str, file: int, offset: int, src: GGMLQuantizationType, dst: GGMLQuantizationType,
           ne: Sequence[int], imatrix: np.ndarray | None, max_elements: int | None = None) -> Iterator[Piece]:
    """A tensor's pieces in file order. ``imatrix``: f32[n_mat * ne[0]] (one slice per expert) or None;
    max_elements: PIECE_ELEMENTS."""
    n, per_expert = ne[0], ne[1] if len(ne) > 1 else 1
    n_mat = int(np.prod(ne[2:], dtype=np.int64))
    step = _rows_per_piece(n, per_expert, max_elements or PIECE_ELEMENTS)
    for e in range(n_mat):
        im = None if imatrix is None else imatrix[e * n:(e + 1) * n]
        for r in range(0, per_expert, step):
            yield Piece(name, file, offset, src, dst, n, e * per_expert + r, min(step, per_expert - r), im)


class Source:
    """The input files, each memory-mapped read-only on first use."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self._maps: dict[int, mmap.mmap] = {}

    def _map(self, i: int) -> mmap.mmap:
        mm = self._maps.get(i)
        if mm is None:
            with open(self.paths[i], "rb") as f:
                mm = self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def _range(self, p: Piece) -> tuple[int, int]:
        size = row_bytes(p.src, p.n_per_row)
        return p.offset + p.row0 * size, p.nrows * size

    def convert(self, p: Piece) -> bytes:
        """The piece's output bytes; its pages are dropped from this process afterwards. Float data, and
        quantized data that is converted, is checked as llama_model_loader::load_data_range does
        (check_tensors); quantized data that is copied is not. Errors name the input file."""
        start, size = self._range(p)
        mm = self._map(p.file)
        try:
            raw = np.frombuffer(mm, np.uint8, size, start)
            out = _convert(raw, p)
            del raw  # the map's exported buffer, before the map can be closed
            return out
        except QuantError as e:  # llama-quantize's message, and the file
            raise QuantError(f"{e} in {self.paths[p.file]}") from None
        finally:
            release(mm, start, size)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still held (by a traceback): the map closes when it goes
                pass
        self._maps.clear()


_FAULT_AROUND = 1 << 20  # > the kernel's fault-around window (64 KiB), which maps cached pages next to a fault


def release(mm: mmap.mmap, start: int, size: int) -> None:
    """Drop the pages of [start, start + size) from this process (they stay in the page cache), and those
    within _FAULT_AROUND of it: a fault maps cached pages around it too, which would otherwise stay."""
    if size <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo = max(0, start - _FAULT_AROUND) // page * page
    hi = min(-(-(start + size + _FAULT_AROUND) // page) * page, len(mm))
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _convert(raw: np.ndarray, p: Piece) -> bytes:
    if not p.converts and p.src not in FLOAT_TYPES:
        return raw.tobytes()
    # f32[nrows, n_per_row]; quantized rows as llama_tensor_dequantize_impl's to_float
    x = gguf_quants.dequantize(raw.reshape(p.nrows, -1), p.src).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise QuantError(f"tensor '{p.name}' has invalid data (NaN or Inf)")
    if not p.converts:
        return raw.tobytes()
    if p.dst in FLOAT_TYPES:
        return gguf_quants.quantize(x, p.dst).tobytes()
    return registry.quantize(x, p.dst, p.imatrix).tobytes()


def start_method() -> str:
    """How workers start: fork where this process runs no jax (XLA's threads would make a forked child unsafe),
    else spawn. A forked worker shares this process's pages (numpy, gguf, the quantizers: ~35 MB it would import
    again) and, unlike spawn, needs no multiprocessing resource tracker process (~15 MB): quantizing bench-l to
    Q4_K_M at 2 threads, the PSS summed over the process tree was 111 MB spawned, 87 MB forked (llama-quantize
    66 MB)."""
    return "fork" if "jax" not in sys.modules and "fork" in get_all_start_methods() else "spawn"


_SOURCE: Source | None = None  # the input in a worker process


def _init_worker(paths: Sequence[str]) -> None:
    global _SOURCE
    tune_malloc()
    _SOURCE = Source(paths)


def _worker(p: Piece) -> bytes:
    return _SOURCE.convert(p)


class _Entry:
    __slots__ = ("piece", "future", "result", "error")

    def __init__(self, piece: Piece, future: Future | None):
        self.piece, self.future, self.result, self.error = piece, future, None, None

    @property
    def pending(self) -> bool:
        return self.result is None and self.error is None

    def run(self, source: Source) -> None:
        try:
            self.result = source.convert(self.piece)
        except QuantError as e:  # raised when the entry's turn comes: errors in file order
            self.error = e

    def collect(self) -> None:
        try:
            self.result = self.future.result()
        except QuantError as e:
            self.error = e


def prepare(types: Iterable[tuple[GGMLQuantizationType, bool]]) -> None:
    """Build the one-time tables of these quantizers (dst type, with an imatrix?), e.g. a grid type's grid and
    neighbour lists, by converting one small row: built here before workers fork, their pages are shared
    rather than built again in every worker."""
    row = np.sin(np.arange(QK_K, dtype=np.float32) * np.float32(0.7))  # generic values, no zero blocks
    for qtype, with_imatrix in sorted(set(types)):
        if qtype not in FLOAT_TYPES and (with_imatrix or registry.quant_type(qtype).imatrix != "required"):
            registry.quantize(row[None], qtype, np.ones_like(row) if with_imatrix else None)


def _fork_pool(workers: int, paths: Sequence[str]) -> ProcessPoolExecutor:
    """A pool of ``workers`` started now. Forked workers start with gc.freeze(): a collection in a worker then
    leaves the objects inherited from this process alone, so their pages stay shared instead of being copied
    (Python's gc docs: freeze right before fork())."""
    method = start_method()
    pool = ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_init_worker,
                               initargs=(paths,))
    if method == "fork":
        gc.freeze()
        try:
            pool.submit(int).result()  # forks every worker (a fork pool starts them all at once)
        finally:
            gc.unfreeze()
    return pool


def convert(stream: Iterable[Piece], paths: Sequence[str], threads: int = 1,
            types: Iterable[tuple[GGMLQuantizationType, bool]] = ()) -> Iterator[tuple[Piece, bytes]]:
    """(piece, output bytes) for every piece of ``stream``, in order; ``paths``: the input files. ``types``:
    the (dst type, with an imatrix?) the pieces use, whose tables are built before workers start (prepare)."""
    tune_malloc()
    source = Source(paths)
    pool: ProcessPoolExecutor | None = None
    window, n_large = 2 * threads + 2, 0
    pending: deque[_Entry] = deque()
    it = iter(stream)
    try:
        while True:
            while len(pending) < window and (p := next(it, None)) is not None:
                future = None
                if threads > 1 and p.converts and p.elements >= POOL_MIN_ELEMENTS:
                    if n_large % threads:
                        if pool is None:
                            prepare(types)
                            pool = _fork_pool(threads - 1, source.paths)
                        future = pool.submit(_worker, p)
                    n_large += 1
                pending.append(_Entry(p, future))
            if not pending:
                return
            head = pending[0]
            if head.pending:
                if head.future is None:
                    head.run(source)
                elif not head.future.done():
                    # while a worker has the head, convert the next piece of this process's own
                    mine = next((e for e in pending if e.future is None and e.pending), None)
                    if mine is not None:
                        mine.run(source)
                        continue
                    head.collect()
                else:
                    head.collect()
            pending.popleft()
            if head.error is not None:
                raise head.error
            yield head.piece, head.result
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        pending.clear()
        source.close()
