"""The imatrix file formats (mtp_jax.io.imatrix_gguf) against llama-imatrix / llama-quantize."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFReader

from mtp_jax.io.imatrix_gguf import ImatrixData, ImatrixError, combine, read_imatrix, to_quant_weights, \
    write_imatrix_gguf
from tests.quant.tiny_glm4moe import SMALL, run_tool, tiny_imatrix, write_tiny_glm4moe


def _data(seed=0, experts=4, names=("blk.0.attn_q.weight", "blk.1.ffn_up_exps.weight"), dataset="a.txt"):
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for name in names:
        n = experts if "exps" in name else 1
        counts[name] = rng.integers(0, 3000, n).astype(np.float32)
        sums[name] = (rng.random((n, 256), dtype=np.float32) * counts[name][:, None]).astype(np.float32)
    chunk_count = int(max(c.max() for c in counts.values())) // 512  # what llama-imatrix would store
    return ImatrixData(sums, counts, datasets=[dataset], chunk_count=chunk_count, chunk_size=512)


def _equal(a: ImatrixData, b: ImatrixData) -> bool:
    return (sorted(a.in_sum2) == sorted(b.in_sum2)
            and all(np.array_equal(a.in_sum2[k], b.in_sum2[k]) and np.array_equal(a.counts[k], b.counts[k])
                    for k in a.in_sum2)
            and (a.datasets, a.chunk_count, a.chunk_size, a.legacy) == (b.datasets, b.chunk_count, b.chunk_size,
                                                                      b.legacy))


def _legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunk_count: int, dataset: str) -> bytes:
    """A .dat file as IMatrixCollector::save_imatrix_legacy writes it: name -> (ncall, f32 values)."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, v) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size)
        out += v.astype("<f4").tobytes()
    return out + struct.pack("<ii", chunk_count, len(dataset)) + dataset.encode()


def test_round_trip_is_exact(tmp_path):
    d = _data()
    d.metadata = {"mtp.layers": 1, "mtp.note": "nextn active", "mtp.flag": True}
    path = write_imatrix_gguf(d, tmp_path / "im.gguf")
    r = read_imatrix(path)
    assert _equal(d, r) and r.metadata == d.metadata
    # the layout llama-imatrix writes: sorted names, [K, n_mat] sums, [1, n_mat] counts (1-D when n_mat = 1)
    g = GGUFReader(path)
    assert [t.name for t in g.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                           "blk.1.ffn_up_exps.weight.in_sum2", "blk.1.ffn_up_exps.weight.counts"]
    shapes = {t.name: t.shape.tolist() for t in g.tensors}
    assert shapes == {"blk.0.attn_q.weight.in_sum2": [256], "blk.0.attn_q.weight.counts": [1],
                      "blk.1.ffn_up_exps.weight.in_sum2": [256, 4], "blk.1.ffn_up_exps.weight.counts": [1, 4]}
    assert [k for k in g.fields if not k.startswith("GGUF.")][:4] == [
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]


def test_to_quant_weights():
    d = ImatrixData({"a.weight": np.array([[2.0, 4.0]], np.float32),
                     "e.weight": np.array([[1.0, 3.0], [5.0, 7.0], [9.0, 9.0]], np.float32)},
                    {"a.weight": np.array([4.0], np.float32), "e.weight": np.array([2.5, 0.0, 0.4], np.float32)})
    w = to_quant_weights(d)
    assert w["a.weight"].dtype == np.float32 and w["a.weight"].tolist() == [0.5, 1.0]
    # counts are lround-ed (2.5 -> 3, 0.4 -> 0); an expert with count 0 gets ones
    expect = np.concatenate([np.float32([1, 3]) / np.float32(3), np.ones(4, np.float32)])
    np.testing.assert_array_equal(w["e.weight"], expect)


def test_legacy_dat(tmp_path):
    v = np.arange(1, 9, dtype=np.float32) * 0.25
    path = tmp_path / "im.dat"
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (4, v), "blk.0.attn_k.weight": (0, v[:4])}, 7, "wiki.txt"))
    d = read_imatrix(path)
    assert d.legacy and d.chunk_count == 7 and d.datasets == ["wiki.txt"] and d.chunk_size == 0
    np.testing.assert_array_equal(d.in_sum2["blk.0.attn_q.weight"], v[None])
    w = to_quant_weights(d)
    np.testing.assert_array_equal(w["blk.0.attn_q.weight"], v / np.float32(4))
    np.testing.assert_array_equal(w["blk.0.attn_k.weight"], v[:4])  # ncall 0: as stored
    with pytest.raises(ImatrixError, match="legacy"):
        write_imatrix_gguf(d, tmp_path / "x.gguf")
    # as llama-imatrix --in-file x.dat: raw sums = values * chunk_size, counts = ncall * chunk_size
    c = combine([d], chunk_size=512)
    np.testing.assert_array_equal(c.in_sum2["blk.0.attn_q.weight"], v[None] * np.float32(512))
    assert c.counts["blk.0.attn_q.weight"].tolist() == [2048] and c.chunk_count == 4
    # the optional tail may be missing
    path.write_bytes(_legacy_bytes({"x.weight": (1, v)}, 0, "")[:-8])
    assert read_imatrix(path).datasets == []


def test_combine():
    a = _data(0, dataset="a.txt")
    b = _data(1, names=("blk.1.ffn_up_exps.weight", "blk.2.attn_v.weight"), dataset="b.txt")
    one = {"blk.1.ffn_up_exps.weight": np.float32([700])}  # an older file: one count for all experts
    c_ = ImatrixData({"blk.1.ffn_up_exps.weight": np.ones((1, 1024), np.float32)}, one, ["c.txt"], 1, 512)
    c = combine([c_, a, b])
    assert c.datasets == ["c.txt", "a.txt", "b.txt"] and c.chunk_size == 512
    assert sorted(c.in_sum2) == ["blk.0.attn_q.weight", "blk.1.ffn_up_exps.weight", "blk.2.attn_v.weight"]
    k = "blk.1.ffn_up_exps.weight"
    expect = (np.ones(1024, np.float32) + a.in_sum2[k].reshape(-1)) + b.in_sum2[k].reshape(-1)  # f32, file order
    np.testing.assert_array_equal(c.in_sum2[k], expect.reshape(4, 256))
    np.testing.assert_array_equal(c.counts[k], 700 + a.counts[k] + b.counts[k])
    np.testing.assert_array_equal(c.in_sum2["blk.2.attn_v.weight"], b.in_sum2["blk.2.attn_v.weight"])
    assert c.chunk_count == int(max(v.max() for v in c.counts.values())) // 512


def test_bad_inputs(tmp_path):
    a = _data(0)
    other_model = _data(1, experts=8)  # same names, another expert count
    with pytest.raises(ImatrixError, match=r"mismatched sums size for blk\.1\.ffn_up_exps\.weight.*same model"):
        combine([a, other_model])
    bad = _data(0)
    bad.in_sum2["blk.0.attn_q.weight"][0, 3] = np.nan
    with pytest.raises(ImatrixError, match=r"blk\.0\.attn_q\.weight\.in_sum2 contains non-finite value nan"):
        ImatrixData(bad.in_sum2, bad.counts)
    with pytest.raises(ImatrixError, match=r"blk\.0\.attn_q\.weight\.in_sum2 contains non-finite"):
        write_imatrix_gguf(bad, tmp_path / "nan.gguf")  # changed after construction: checked again
    assert not list(tmp_path.iterdir())
    # a NaN inside a file (patched in place)
    path = write_imatrix_gguf(a, tmp_path / "im.gguf")
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_up_exps.weight.in_sum2")
    raw = bytearray(path.read_bytes())
    raw[t.data_offset + 8: t.data_offset + 12] = struct.pack("<f", np.inf)
    path.write_bytes(bytes(raw))
    with pytest.raises(ImatrixError, match=r"blk\.1\.ffn_up_exps\.weight\.in_sum2 contains non-finite value inf"):
        read_imatrix(path)
    # not an imatrix at all
    (tmp_path / "junk.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ImatrixError, match="no data in file"):
        read_imatrix(tmp_path / "junk.bin")
    model = write_tiny_glm4moe(tmp_path / "model.gguf", SMALL)
    with pytest.raises(ImatrixError, match="missing imatrix metadata"):
        read_imatrix(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_imatrix_gguf(a, tmp_path / "missing" / "im.gguf")
    assert not (tmp_path / "missing").exists()


# --- against llama.cpp ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return write_tiny_glm4moe(tmp_path_factory.mktemp("im-model") / "model.gguf", SMALL)


def _imatrix_tool(model, tmp_path, *in_files, fmt="gguf"):
    out = tmp_path / f"llama-out.{fmt}"
    args = ["-m", model, *(a for f in in_files for a in ("--in-file", f)), "-o", out]
    proc = run_tool("llama-imatrix", *args, *(["--output-format", "dat"] if fmt == "dat" else []))
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return out


@pytest.mark.peer
def test_written_file_equals_llama_imatrix_rewrite(small_model, tmp_path):
    """llama-imatrix --in-file ours -o theirs re-saves our file byte for byte."""
    ours = write_imatrix_gguf(_data(0), tmp_path / "ours.gguf")
    assert _imatrix_tool(small_model, tmp_path, ours).read_bytes() == ours.read_bytes()


@pytest.mark.peer
def test_combine_equals_llama_imatrix(small_model, tmp_path):
    c_ = ImatrixData({"blk.1.ffn_up_exps.weight": np.full((1, 1024), 3, np.float32)},
                     {"blk.1.ffn_up_exps.weight": np.float32([1024])}, ["c.txt"], 2, 512)  # one count, 4 experts
    files = [write_imatrix_gguf(d, tmp_path / f"{i}.gguf") for i, d in enumerate(
        [c_, _data(0), _data(1, names=("blk.1.ffn_up_exps.weight", "blk.2.attn_v.weight"), dataset="b.txt")])]
    ours = write_imatrix_gguf(combine([read_imatrix(f) for f in files]), tmp_path / "ours.gguf")
    assert _imatrix_tool(small_model, tmp_path, *files).read_bytes() == ours.read_bytes()


@pytest.mark.peer
def test_legacy_dat_from_llama_imatrix(small_model, tmp_path):
    src = write_imatrix_gguf(_data(0), tmp_path / "src.gguf")
    dat = _imatrix_tool(small_model, tmp_path, src, fmt="dat")
    d = read_imatrix(dat)
    assert d.legacy and d.datasets == ["a.txt"]
    w_dat, w_gguf = to_quant_weights(d), to_quant_weights(read_imatrix(src))
    for k in w_gguf:
        np.testing.assert_allclose(w_dat[k], w_gguf[k], rtol=1e-6)
    # and back: llama-imatrix --in-file x.dat -o y.gguf == combine([x.dat], 512)
    back = _imatrix_tool(small_model, tmp_path, dat)
    assert back.read_bytes() == write_imatrix_gguf(combine([d], chunk_size=512), tmp_path / "o.gguf").read_bytes()


@pytest.mark.peer
def test_llama_quantize_accepts_our_imatrix(small_model, tmp_path):
    path = write_imatrix_gguf(tiny_imatrix(SMALL), tmp_path / "im.gguf")
    proc = run_tool("llama-quantize", "--dry-run", "--imatrix", path, small_model, "IQ2_XXS")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = len(tiny_imatrix(SMALL))
    assert f"loaded {n} importance matrix entries from {path} computed on 3 chunks" in proc.stdout
    assert "requires an imatrix" not in proc.stderr
