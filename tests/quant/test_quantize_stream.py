"""quantize_gguf at scale: split models in and out (llama-gguf-split's format), pieces of rows, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from mtp_jax.quant import stream
from mtp_jax.quant.gguf_quantize import keep_split_prefix, quantize_gguf
from tests.quant.tiny_glm4moe import SMALL, run_tool, write_tiny_glm4moe

ROOT = Path(__file__).resolve().parents[2]
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def quantize(*args, **kw):
    return quantize_gguf(*args, progress=False, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_glm4moe(tmp_path_factory.mktemp("stream") / "model.gguf", SMALL, "f16")


def _copy(src: Path, dst: Path, split_max_tensors: int = 0) -> list[Path]:
    """src rewritten by gguf-py, in splits of at most ``split_max_tensors`` tensors (0: one file); the files."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents(), split_max_tensors=split_max_tensors)
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(dst.parent.glob(dst.stem + "-0*-of-*.gguf")) if split_max_tensors else [dst]


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict:
    return {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


# --- split models, gguf-py's splits (no llama.cpp needed) ----------------------------------------------------


def test_split_input_and_keep_split(model, tmp_path):
    """A split input quantizes to the bytes of the one-file input; --keep-split writes one file per split with
    llama.cpp's split keys, which read back as the same model."""
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    one = _copy(model, tmp_path / "one" / "m.gguf")
    splits = _copy(model, tmp_path / "split" / "m.gguf", 30)
    assert [p.name for p in splits] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    quantize(one[0], tmp_path / "a.gguf", "Q4_K_M", threads=1)
    s = quantize(splits[0], tmp_path / "b.gguf", "Q4_K_M", threads=2)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert s.out_paths == (tmp_path / "b.gguf",)

    s = quantize(splits[0], tmp_path / "k.gguf", "Q4_K_M", threads=1, keep_split=True)
    outs = [tmp_path / f"k-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert s.out_paths == tuple(outs) and s.out_path == outs[0] and "3 split files" in s.describe()
    for i, (out, src) in enumerate(zip(outs, splits)):
        md = _fields(out)
        assert [md[k] for k in SPLIT_KEYS] == [i, 3, 80]
        assert list(_tensors(out)) == [t.name for t in gguf.GGUFReader(src).tensors]  # split and file order
        types = {f.name: f.types[0] for f in gguf.GGUFReader(out).fields.values() if f.name in SPLIT_KEYS}
        assert types == {"split.no": GGUFValueType.UINT16, "split.count": GGUFValueType.UINT16,
                         "split.tensors.count": GGUFValueType.INT32}
        if i:
            assert set(md) == set(SPLIT_KEYS)
    assert {k: v for k, v in _fields(outs[0]).items() if k not in SPLIT_KEYS} == _fields(tmp_path / "a.gguf")
    merged = {k: v for out in outs for k, v in _tensors(out).items()}
    assert merged == _tensors(tmp_path / "a.gguf")
    # the split output is itself a split model: COPY reads it back
    quantize(outs[0], tmp_path / "c.gguf", "COPY", threads=1)
    assert _tensors(tmp_path / "c.gguf") == _tensors(tmp_path / "a.gguf")


def test_keep_split_names():
    """llama-quantize's names: OUT less its last five characters when ".gguf" occurs in it."""
    assert keep_split_prefix("/d/out.gguf") == "/d/out"
    assert keep_split_prefix("/d/out") == "/d/out"
    assert keep_split_prefix("/d/x.gguf.d/out") == "/d/x.gguf."  # quantize.cpp's test, as it is


def test_pieces():
    """Pieces cover every row once, in order, never across an expert, within the element budget."""
    for ne, budget in [((256, 10, 3), 1024), ((256, 10, 3), 256 * 7), ((512, 3), 1 << 20), ((32,), 8),
                       ((288, 1000), 4096), ((256, 1, 5), 100)]:
        im = np.arange(ne[0] * (ne[2] if len(ne) > 2 else 1), dtype=np.float32)
        ps = list(stream.pieces("t", 0, 0, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, ne, im,
                                budget))
        assert len(ps) == stream.count(ne, budget)
        per_expert = ne[1] if len(ne) > 1 else 1
        assert [r for p in ps for r in range(p.row0, p.row0 + p.nrows)] == list(range(int(np.prod(ne[1:]))))
        for p in ps:
            e = p.row0 // per_expert
            assert (p.row0 + p.nrows - 1) // per_expert == e and p.imatrix[0] == e * ne[0]
            assert p.nrows == 1 or p.elements <= budget


def test_many_pieces_in_two_processes(model, tmp_path, monkeypatch):
    """Tensors cut into many pieces of uneven sizes, half of them converted by a spawned worker (as in a process
    that runs jax): the same bytes."""
    quantize(model, tmp_path / "one.gguf", "Q6_K", threads=1)
    monkeypatch.setattr(stream, "start_method", lambda: "spawn")
    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 256 * 13)  # ~1000 pieces, 1 to 13 rows
    monkeypatch.setattr(stream, "POOL_MIN_ELEMENTS", 0)
    quantize(model, tmp_path / "two.gguf", "Q6_K", threads=2)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


_FORKED = """
import sys
from mtp_jax.quant import stream
from mtp_jax.quant.gguf_quantize import quantize_gguf
stream.PIECE_ELEMENTS, stream.POOL_MIN_ELEMENTS = 256 * 13, 0
assert stream.start_method() == "fork", stream.start_method()
quantize_gguf(sys.argv[1], sys.argv[2], "Q6_K", threads=2, progress=False)
assert "jax" not in sys.modules
"""


def test_forked_workers_give_the_same_bytes(model, tmp_path):
    """Where no jax runs (the quantize command, in a fresh process here), workers are forked
    (stream.start_method), sharing the parent's imports. Forked, ~1000 pieces: the same bytes."""
    quantize(model, tmp_path / "one.gguf", "Q6_K", threads=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _FORKED, str(model), str(tmp_path / "two.gguf")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


_PREPARED = """
import sys
from gguf import GGMLQuantizationType as T
from mtp_jax.quant import iqgrid, registry, stream
types = [(t, True) for t in registry.registered()] + [(t, False) for t in registry.registered()] + [(T.F16, False)]
stream.prepare(types)  # no error for any type, with or without an imatrix (IQ2_XXS without one: skipped)
assert iqgrid._grid.cache_info().currsize == 6 and iqgrid._tiles.cache_info().currsize == 6, iqgrid._grid.cache_info()
assert "jax" not in sys.modules
"""


def test_prepare_builds_the_grid_tables():
    """stream.prepare, run before workers fork, builds the grid types' one-time tables (iq2xxs, iq2xs, iq2s,
    iq3xxs, iq3s, iq1s: each grid and its neighbour tiles) in this process, for every registered type with and
    without an imatrix, without raising for a type that requires one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _PREPARED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- peak memory -----------------------------------------------------------------------------------------------

_BIG_ROWS, _BIG_COLS, _BIG_TENSORS = 4096, 3072, 8  # 8 F16 tensors of 24 MiB: a 192 MiB file

_MEASURE = """
import gc, json, os, sys, threading, time
from mtp_jax.quant.gguf_quantize import quantize_gguf

def kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split(key + ":")[1].split()[0])

workers = {}
def watch():  # the workers' own high-water marks (VmHWM starts afresh at their exec)
    me = f"PPid:\\t{os.getpid()}\\n"
    while True:
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/status") as f:
                    st = f.read()
                if me in st:
                    workers[d] = max(workers.get(d, 0), int(st.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
        time.sleep(0.05)

small, big, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
quantize_gguf(small, out, "Q8_0", threads=threads, progress=False)  # every import, once
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = kb("self", "VmRSS")
threading.Thread(target=watch, daemon=True).start()
quantize_gguf(big, out, "Q8_0", threads=threads, progress=False)
print(json.dumps({"base": base, "peak": kb("self", "VmHWM"), "workers": max(workers.values(), default=0)}))
"""


def _big_model(path: Path) -> Path:
    """A "llama" GGUF of _BIG_TENSORS random F16 matrices, written one tensor at a time."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(_BIG_TENSORS)
    names = [f"blk.{i}.ffn_up.weight" for i in range(_BIG_TENSORS)]
    for name in names:
        w.add_tensor_info(name, (_BIG_ROWS, _BIG_COLS), np.dtype(np.float16), _BIG_ROWS * _BIG_COLS * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _ in names:
        w.write_tensor_data(rng.standard_normal((_BIG_ROWS, _BIG_COLS), np.float32).astype(np.float16))
    w.close()
    return path


@pytest.mark.parametrize("threads", [1, 2])
def test_peak_memory_is_a_few_pieces(tmp_path_factory, model, threads):
    """Quantizing a 192 MiB F16 file raises the peak RSS of the process by less than 32 MiB over its RSS before
    (a piece is <= 2 MiB of F16 read, 4 MiB as f32, 1 MiB of Q8_0 out, with up to 2 * threads + 2 pieces'
    results in flight; the file's mapped pages are dropped piece by piece), and a worker process peaks below
    96 MiB (it imports numpy, gguf and the quantizers, ~45 MiB, and holds a few pieces). Before streaming,
    the peak rose by the whole file (the mapped pages stayed resident). Measured in a fresh interpreter that
    has quantized a small model first (every import done): the rise of VmHWM after resetting it
    (/proc/self/clear_refs), the workers' VmHWM sampled every 50 ms."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    d = tmp_path_factory.getbasetemp() / "big"
    if not (d / "big.gguf").exists():
        d.mkdir(exist_ok=True)
        _big_model(d / "big.gguf")
    assert (d / "big.gguf").stat().st_size > 192 * 2**20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(model), str(d / "big.gguf"),
                           str(d / f"out-{threads}.gguf"), str(threads)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kb = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = (kb["peak"] - kb["base"]) / 1024
    assert grew < 32, f"peak RSS grew by {grew:.0f} MiB quantizing a 192 MiB file ({kb})"
    if threads > 1:
        assert 0 < kb["workers"] < 96 * 1024, kb
    reader = gguf.GGUFReader(d / f"out-{threads}.gguf")
    assert len(reader.tensors) == _BIG_TENSORS
    assert all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in reader.tensors)


# --- against llama.cpp's tools ---------------------------------------------------------------------------------


def _gguf_split(model: Path, directory: Path, max_tensors: int = 30) -> list[Path]:
    directory.mkdir()
    proc = run_tool("llama-gguf-split", "--split", "--split-max-tensors", max_tensors, model, directory / "m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted(directory.glob("m-0*-of-*.gguf"))


def _merge(first: Path, out: Path) -> Path:
    proc = run_tool("llama-gguf-split", "--merge", first, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.peer
def test_split_input_equals_merged_input(model, tmp_path, monkeypatch):
    """Splits made by llama-gguf-split --split-max-tensors quantize to the bytes of the llama-gguf-split --merge
    of them, of the original file, and of llama-quantize's output for the original (worker processes on)."""
    splits = _gguf_split(model, tmp_path / "split")
    assert len(splits) == 3
    merged = _merge(splits[0], tmp_path / "merged.gguf")
    monkeypatch.setattr(stream, "POOL_MIN_ELEMENTS", 0)
    for src, name in [(splits[0], "from-split.gguf"), (merged, "from-merged.gguf"), (model, "from-model.gguf")]:
        quantize(src, tmp_path / name, "Q4_K_M", threads=2)
    ref = tmp_path / "llama.gguf"
    proc = run_tool("llama-quantize", model, ref, "Q4_K_M", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = ref.read_bytes()
    for name in ("from-split.gguf", "from-merged.gguf", "from-model.gguf"):
        assert (tmp_path / name).read_bytes() == want, name


@pytest.mark.peer
def test_keep_split_equals_llama_quantize(model, tmp_path):
    """--keep-split writes llama-quantize --keep-split's files byte for byte (the Q4_K_M mixture follows the
    split order there); llama-gguf-split --merge joins them to the merge of llama-quantize's, which holds the
    tensors of the one-file output."""
    splits = _gguf_split(model, tmp_path / "split")
    quantize(splits[0], tmp_path / "ours.gguf", "Q4_K_M", threads=1, keep_split=True)
    proc = run_tool("llama-quantize", "--keep-split", splits[0], tmp_path / "llama.gguf", "Q4_K_M", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in (1, 2, 3):
        name = f"-0000{i}-of-00003.gguf"
        assert (tmp_path / f"ours{name}").read_bytes() == (tmp_path / f"llama{name}").read_bytes(), name
    ours = _merge(tmp_path / "ours-00001-of-00003.gguf", tmp_path / "ours-merged.gguf")
    theirs = _merge(tmp_path / "llama-00001-of-00003.gguf", tmp_path / "llama-merged.gguf")
    assert ours.read_bytes() == theirs.read_bytes()
    quantize(model, tmp_path / "one.gguf", "Q4_K_M", threads=1)
    assert _tensors(ours) == _tensors(tmp_path / "one.gguf")
    assert {k: v for k, v in _fields(ours).items() if k not in SPLIT_KEYS} == _fields(tmp_path / "one.gguf")
