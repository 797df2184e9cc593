"""Fuzz (issue 13): deterministic mutants of a tiny glm4moe GGUF and of an imatrix for it, each through every
reading entry point: ``info`` (describe), model loading (load_model), quantize (a real run and a dry run) for the
model; read_imatrix and quantize --imatrix for the imatrix.

Each call must succeed or raise one of the project's error classes, within a time limit (no hang); a quantize that
fails leaves nothing at its output path; the mutants that damage what a reader relies on (truncated data, huge
counts, bad dims, types and offsets, duplicate names, missing tensors, bad metadata, NaN weights, negative or
foreign imatrix entries) must fail where they are read; and the unmutated files pass everywhere.
"""

from __future__ import annotations

import os
import signal
import struct
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from mtp_jax.io.cli import describe
from mtp_jax.io.gguf import GGUFError
from mtp_jax.io.imatrix_gguf import ImatrixError, read_imatrix, write_imatrix_gguf
from mtp_jax.io.load import load_model
from mtp_jax.io.tokenizer import TokenizerError
from mtp_jax.quant.base import QuantError
from mtp_jax.quant.gguf_quantize import quantize_gguf
from tests.helpers import tiny_config
from tests.io.gguf_mutants import anatomy, drop, info_pos, nan_at, put, rewrite, value_pos
from tests.quant.tiny_glm4moe import tiny_imatrix, write_tiny_glm4moe

ALLOWED = (GGUFError, ImatrixError, QuantError, TokenizerError)
LIMIT_S = 20.0  # per call; the slowest good call takes well under a second
MODEL_POINTS = ("info", "load", "quantize", "dry-run")
IMATRIX_POINTS = ("read", "quantize-imatrix")
ALL, DATA = frozenset(MODEL_POINTS), frozenset({"load", "quantize"})
IM_ALL, IM_MODEL = frozenset(IMATRIX_POINTS), frozenset({"quantize-imatrix"})
NONE: frozenset[str] = frozenset()


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def on_alarm(*_):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config()
    model = write_tiny_glm4moe(root / "model.gguf", cfg, "f16")
    imatrix = write_imatrix_gguf(tiny_imatrix(cfg), root / "imatrix.gguf")
    return SimpleNamespace(root=root, cfg=cfg, model=model, imatrix=imatrix, m=anatomy(model), im=anatomy(imatrix))


def entry_points(path: Path, target: str, base, out_dir: Path) -> dict[str, Callable[[], object]]:
    out = out_dir / "out.gguf"
    if target == "model":
        return {"info": lambda: describe(str(path)), "load": lambda: load_model(path),
                "quantize": lambda: quantize_gguf(path, out, "Q8_0", threads=1, progress=False),
                "dry-run": lambda: quantize_gguf(path, None, "Q4_K_M", dry_run=True, progress=False)}
    return {"read": lambda: read_imatrix(path),
            "quantize-imatrix": lambda: quantize_gguf(base.model, out, "Q4_0", imatrix=path, threads=1,
                                                      progress=False)}


def run_all(path: Path, target: str, base, out_dir: Path) -> dict[str, BaseException | None]:
    """Each entry point's outcome: None (success) or the project error it raised; anything else propagates."""
    outcomes = {}
    for point, call in entry_points(path, target, base, out_dir).items():
        try:
            with time_limit(LIMIT_S):
                call()
            outcomes[point] = None
        except ALLOWED as e:
            outcomes[point] = e
            assert not list(out_dir.glob("*out.gguf*")), f"{point}: output left after {e}"
        for f in out_dir.glob("*out.gguf*"):
            f.unlink()
    return outcomes


# ---- the mutants: name -> fn(base, rng, tmp) -> (bytes, entry points that must fail) ---------------------------


def _flip(region: str, target: str):
    def make(b, rng, tmp):
        a = b.m if target == "model" else b.im
        lo, hi = {"header": (0, 24), "kv": (a.kv_start, a.info_start), "info": (a.info_start, a.data_start),
                  "data": (a.data_start, a.data_end)}[region]
        pos = int(rng.integers(lo, hi))
        return put(a.data, pos, "<B", a.data[pos] ^ int(rng.integers(1, 256))), NONE
    return make


def _truncate(target: str):
    def make(b, rng, tmp):
        a = b.m if target == "model" else b.im
        cut = int(rng.integers(0, a.data_end))
        return a.data[:cut], ALL if target == "model" else IM_ALL
    return make


def _set(target: str, where: Callable, fmt: str, v: int, fails: bool = True):
    """Overwrite a field found by where(anatomy, rng) -> offset."""
    def make(b, rng, tmp):
        a = b.m if target == "model" else b.im
        return put(a.data, where(a, rng), fmt, v), (ALL if target == "model" else IM_ALL) if fails else NONE
    return make


def _array_len(key: str):
    return lambda a, rng: value_pos(a, key) + 8  # type u32, item type u32, then the length


def _tensor_field(field: str, offset: int = 0):
    def where(a, rng):
        name = sorted(a.infos)[int(rng.integers(len(a.infos)))]
        return info_pos(a, name)[field] + offset
    return where


def _shift_offset(delta: int):
    def make(b, rng, tmp):
        a = b.m
        name = sorted(a.infos, key=a.infos.get)[int(rng.integers(1, len(a.infos)))]
        pos = info_pos(a, name)["offset"]
        return put(a.data, pos, "<Q", struct.unpack_from("<Q", a.data, pos)[0] + delta), ALL
    return make


def _relabel(to: Q, source: Q = Q.F16):
    def make(b, rng, tmp):
        a = b.m
        names = sorted(n for n, (_, t) in a.tensor_data.items() if t == source)
        name = names[int(rng.integers(len(names)))]
        return put(a.data, info_pos(a, name)["type"], "<I", int(to)), ALL
    return make


def _duplicate(kind: str):
    """Give a key (tensor) the name of another one of the same length."""
    def make(b, rng, tmp):
        a = b.m
        where = a.keys if kind == "key" else a.infos
        by_len: dict[int, list[str]] = {}
        for n in sorted(where):
            by_len.setdefault(len(n.encode()), []).append(n)
        pairs = [v for v in by_len.values() if len(v) > 1]
        first, second = pairs[int(rng.integers(len(pairs)))][:2]
        return put(a.data, where[second] + 8, f"{len(first.encode())}s", first.encode()), ALL
    return make


def _rewritten(target: str, fails: frozenset, **kw):
    def make(b, rng, tmp):
        src = b.model if target == "model" else b.imatrix
        return rewrite(src, tmp / "rewritten.gguf", **kw).read_bytes(), fails
    return make


def _nan(name: str, index: int = 3):
    return lambda b, rng, tmp: (nan_at(b.m, name, index), DATA)


def _imatrix_value(suffix: str, v: float):
    def make(b, rng, tmp):
        a = b.im
        names = sorted(n for n in a.tensor_data if n.endswith(suffix))
        off, _ = a.tensor_data[names[int(rng.integers(len(names)))]]
        return put(a.data, off, "<f", v), IM_ALL
    return make


def _imatrix_data(fails: frozenset, edit: Callable):
    def make(b, rng, tmp):
        data = tiny_imatrix(b.cfg)
        edit(data)
        return write_imatrix_gguf(data, tmp / "edited.gguf").read_bytes(), fails
    return make


def _wrong_length(d):
    k = "blk.1.ffn_up_exps.weight"
    d.in_sum2[k], d.counts[k] = d.in_sum2[k][:1], d.counts[k][:1]


def _foreign_name(d):
    d.in_sum2["blk.9.attn_q.weight"] = d.in_sum2.pop("blk.0.attn_q.weight")
    d.counts["blk.9.attn_q.weight"] = d.counts.pop("blk.0.attn_q.weight")


def _partial(d):
    del d.in_sum2["blk.3.nextn.eh_proj.weight"], d.counts["blk.3.nextn.eh_proj.weight"]


def _to_f16(suffix: str):
    def edit(n, d, t):
        return (d.astype(np.float16), Q.F16) if n.endswith(suffix) and n.startswith("blk.0.attn_q") else (d, t)
    return edit


def _kv(key: str, *spec):
    return _rewritten("model", ALL, kv={key: spec or None})


GLM = "glm4moe."
U32, STR, F32, ARR, I32 = V.UINT32, V.STRING, V.FLOAT32, V.ARRAY, V.INT32
N_TENSORS, N_KV = (lambda a, rng: 8), (lambda a, rng: 16)
MUTANTS: dict[str, tuple[str, Callable, int]] = {  # name -> (target, maker, how many seeds)
    "truncate": ("model", _truncate("model"), 30),
    "flip-header": ("model", _flip("header", "model"), 10),
    "flip-kv": ("model", _flip("kv", "model"), 50),
    "flip-info": ("model", _flip("info", "model"), 40),
    "flip-data": ("model", _flip("data", "model"), 20),
    "magic": ("model", _set("model", lambda a, rng: 0, "<I", 0x4C4D4747), 1),
    "version-1": ("model", _set("model", lambda a, rng: 4, "<I", 1), 1),
    "version-4": ("model", _set("model", lambda a, rng: 4, "<I", 4), 1),
    "version-byte-swapped": ("model", _set("model", lambda a, rng: 4, ">I", 3), 1),
    "version-2": ("model", _set("model", lambda a, rng: 4, "<I", 2, fails=False), 1),
    "n-tensors-huge": ("model", _set("model", N_TENSORS, "<Q", 2**62), 1),
    "n-tensors-2^32": ("model", _set("model", N_TENSORS, "<Q", 2**32 + 70), 1),
    "n-tensors-0": ("model", _set("model", N_TENSORS, "<Q", 0), 1),
    "n-tensors-plus-1": ("model", _set("model", N_TENSORS, "<Q", 71), 1),
    "n-tensors-minus-1": ("model", _set("model", N_TENSORS, "<Q", 69), 1),
    "n-kv-huge": ("model", _set("model", N_KV, "<Q", 2**62), 1),
    "n-kv-plus-1": ("model", _set("model", N_KV, "<Q", 2**20), 1),
    **{f"array-length-{k}-{n}": ("model", _set("model", _array_len(f"tokenizer.ggml.{k}"), "<Q", n), 1)
       for k in ("tokens", "token_type", "merges") for n in (2**62, 2**40, 2**31)},
    **{f"array-length-{k}-plus": ("model", _set("model", _array_len(f"tokenizer.ggml.{k}"), "<Q", 513,
                                                fails=False), 1) for k in ("tokens", "token_type")},
    "key-length-huge": ("model", _set("model", lambda a, rng: a.kv_start, "<Q", 2**62), 1),
    "string-length-huge": ("model", _set("model", lambda a, rng: value_pos(a, "general.name") + 4, "<Q", 2**62),
                           1),
    "tensor-name-length-huge": ("model", _set("model", lambda a, rng: a.info_start, "<Q", 2**62), 1),
    "n-dims-0": ("model", _set("model", _tensor_field("n_dims"), "<I", 0), 4),
    "n-dims-5": ("model", _set("model", _tensor_field("n_dims"), "<I", 5), 2),
    "n-dims-huge": ("model", _set("model", _tensor_field("n_dims"), "<I", 2**31), 2),
    "dim-0": ("model", _set("model", _tensor_field("dims"), "<Q", 0), 3),
    "dim-huge": ("model", _set("model", _tensor_field("dims"), "<Q", 2**40), 3),
    "dim-negative": ("model", _set("model", _tensor_field("dims"), "<q", -64), 2),
    "dim-overflow": ("model", _set("model", _tensor_field("dims", 8), "<Q", 2**62), 2),
    "type-99": ("model", _set("model", _tensor_field("type"), "<I", 99), 2),
    "type-removed-q4-2": ("model", _set("model", _tensor_field("type"), "<I", 4), 2),
    "relabel-q8-0": ("model", _relabel(Q.Q8_0), 4),
    "relabel-iq2-xxs": ("model", _relabel(Q.IQ2_XXS), 4),
    "relabel-f32": ("model", _relabel(Q.F32), 3),
    "relabel-f32-as-f16": ("model", _relabel(Q.F16, Q.F32), 3),
    "offset-plus-1": ("model", _shift_offset(1), 3),
    "offset-plus-alignment": ("model", _shift_offset(32), 3),
    "offset-minus-alignment": ("model", _shift_offset(-32), 3),
    "offset-huge": ("model", _shift_offset(2**60), 2),
    "duplicate-key": ("model", _duplicate("key"), 3),
    "duplicate-tensor": ("model", _duplicate("tensor"), 3),
    "missing-ffn-up-exps": ("model", _rewritten("model", ALL, tensors=drop("blk.1.ffn_up_exps.weight")), 1),
    "missing-output-norm": ("model", _rewritten("model", ALL, tensors=drop("output_norm.weight")), 1),
    "missing-token-embd": ("model", _rewritten("model", ALL, tensors=drop("token_embd.weight")), 1),
    "missing-eh-proj": ("model", _rewritten("model", ALL, tensors=drop("blk.3.nextn.eh_proj.weight")), 1),
    "missing-enorm": ("model", _rewritten("model", ALL, tensors=drop("blk.3.nextn.enorm.weight")), 1),
    "missing-attn-bias": ("model", _rewritten("model", ALL, tensors=drop("blk.2.attn_q.bias")), 1),
    "tied-output": ("model", _rewritten("model", NONE, tensors=drop("output.weight")), 1),
    "trunk-only": ("model", _rewritten("model", NONE, tensors=lambda n, d, t: None if n.startswith("blk.3.")
                                       else (d, t)), 1),
    "nan-expert": ("model", _nan("blk.1.ffn_up_exps.weight"), 1),
    "nan-norm": ("model", _nan("blk.0.attn_norm.weight"), 1),
    "nan-output": ("model", _nan("output.weight", 1000), 1),
    "inf-embedding": ("model", lambda b, rng, tmp: (put(b.m.data, b.m.tensor_data["token_embd.weight"][0],
                                                        "<H", 0x7C00), DATA), 1),
    "arch-llama": ("model", _rewritten("model", frozenset({"load"}), arch="llama"), 1),
    "block-count-string": ("model", _kv(GLM + "block_count", "4", STR), 1),
    "block-count-float": ("model", _kv(GLM + "block_count", 4.0, F32), 1),
    "block-count-array": ("model", _kv(GLM + "block_count", [4, 4], ARR, U32), 1),
    "block-count-huge": ("model", _kv(GLM + "block_count", 2**31, U32), 1),
    "block-count-0": ("model", _kv(GLM + "block_count", 0, U32), 1),
    "block-count-3": ("model", _kv(GLM + "block_count", 3, U32), 1),
    "block-count-5": ("model", _kv(GLM + "block_count", 5, U32), 1),
    "block-count-missing": ("model", _kv(GLM + "block_count"), 1),
    "head-count-0": ("model", _kv(GLM + "attention.head_count", 0, U32), 1),
    "head-count-8": ("model", _kv(GLM + "attention.head_count", 8, U32), 1),
    "head-count-strings": ("model", _kv(GLM + "attention.head_count", ["4"], ARR, STR), 1),
    "head-count-per-layer": ("model", _kv(GLM + "attention.head_count", [4, 8, 4, 4], ARR, U32), 1),
    "key-length": ("model", _kv(GLM + "attention.key_length", 32, U32), 1),
    "nextn-0": ("model", _kv(GLM + "nextn_predict_layers", 0, U32), 1),
    "nextn-2": ("model", _kv(GLM + "nextn_predict_layers", 2, U32), 1),
    "nextn-4": ("model", _kv(GLM + "nextn_predict_layers", 4, U32), 1),
    "eps-nan": ("model", _kv(GLM + "attention.layer_norm_rms_epsilon", float("nan"), F32), 1),
    "eps-0": ("model", _kv(GLM + "attention.layer_norm_rms_epsilon", 0.0, F32), 1),
    "eps-negative": ("model", _kv(GLM + "attention.layer_norm_rms_epsilon", -1e-5, F32), 1),
    "rope-base-inf": ("model", _kv(GLM + "rope.freq_base", float("inf"), F32), 1),
    "rope-dims-0": ("model", _kv(GLM + "rope.dimension_count", 0, U32), 1),
    "context-0": ("model", _kv(GLM + "context_length", 0, U32), 1),
    "experts-0": ("model", _kv(GLM + "expert_count", 0, U32), 1),
    "experts-huge": ("model", _kv(GLM + "expert_count", 10**6, U32), 1),
    "experts-16": ("model", _kv(GLM + "expert_count", 16, U32), 1),
    "experts-used-9": ("model", _kv(GLM + "expert_used_count", 9, U32), 1),
    "gating-softmax": ("model", _kv(GLM + "expert_gating_func", 1, U32), 1),
    "alignment-3": ("model", _kv("general.alignment", 3, U32), 1),
    "alignment-0": ("model", _kv("general.alignment", 0, U32), 1),
    "alignment-string": ("model", _kv("general.alignment", "32", STR), 1),
    "token-types-strings": ("model", _kv("tokenizer.ggml.token_type", ["1"] * 512, ARR, STR), 1),
    "tokens-ints": ("model", _kv("tokenizer.ggml.tokens", [1, 2, 3], ARR, I32), 1),
    "eos-outside-vocab": ("model", _kv("tokenizer.ggml.eos_token_id", 10**6, U32), 1),
    "bos-negative": ("model", _kv("tokenizer.ggml.bos_token_id", -1, I32), 1),
    # the imatrix
    "im-truncate": ("imatrix", _truncate("imatrix"), 15),
    "im-flip-header": ("imatrix", _flip("header", "imatrix"), 5),
    "im-flip-kv": ("imatrix", _flip("kv", "imatrix"), 15),
    "im-flip-info": ("imatrix", _flip("info", "imatrix"), 20),
    "im-flip-data": ("imatrix", _flip("data", "imatrix"), 10),
    "im-magic": ("imatrix", _set("imatrix", lambda a, rng: 0, "<I", 0x4C4D4747), 1),
    "im-n-tensors-huge": ("imatrix", _set("imatrix", N_TENSORS, "<Q", 2**62), 1),
    "im-n-kv-huge": ("imatrix", _set("imatrix", N_KV, "<Q", 2**62), 1),
    "im-datasets-length-huge": ("imatrix", _set("imatrix", _array_len("imatrix.datasets"), "<Q", 2**62), 1),
    "im-negative-count": ("imatrix", _imatrix_value(".counts", -3.0), 2),
    "im-negative-sum": ("imatrix", _imatrix_value(".in_sum2", -1.0), 2),
    "im-nan-sum": ("imatrix", _imatrix_value(".in_sum2", float("nan")), 2),
    "im-inf-count": ("imatrix", _imatrix_value(".counts", float("inf")), 1),
    "im-wrong-length": ("imatrix", _imatrix_data(IM_MODEL, _wrong_length), 1),
    "im-another-model": ("imatrix", _imatrix_data(IM_MODEL, _foreign_name), 1),
    "im-partial": ("imatrix", _imatrix_data(NONE, _partial), 1),
    "im-chunk-count-string": ("imatrix", _rewritten("imatrix", IM_ALL, kv={"imatrix.chunk_count": ("3", STR)}), 1),
    "im-chunk-size-negative": ("imatrix", _rewritten("imatrix", IM_ALL, kv={"imatrix.chunk_size": (-1, I32)}), 1),
    "im-datasets-ints": ("imatrix", _rewritten("imatrix", IM_ALL, kv={"imatrix.datasets": ([1, 2], ARR, I32)}), 1),
    "im-missing-counts": ("imatrix", _rewritten("imatrix", IM_ALL,
                                                tensors=drop("blk.0.attn_q.weight.counts")), 1),
    "im-f16-sums": ("imatrix", _rewritten("imatrix", IM_ALL, tensors=_to_f16(".in_sum2")), 1),
}
CASES = [(name, i) for name, (_, _, n) in MUTANTS.items() for i in range(n)]
def test_there_are_enough_mutants():
    assert len(CASES) >= 300


def test_good_files_pass_everywhere(base, tmp_path):
    for path, target in ((base.model, "model"), (base.imatrix, "imatrix")):
        assert run_all(path, target, base, tmp_path) == dict.fromkeys(entry_points(path, target, base, tmp_path))


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_non_regular_files_are_refused_without_hanging(base, tmp_path, kind):
    path = {"fifo": tmp_path / "fifo.gguf", "device": Path("/dev/zero"), "directory": tmp_path / "dir.gguf"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    for target in ("model", "imatrix"):
        outcomes = run_all(path, target, base, tmp_path)
        assert all(isinstance(e, ALLOWED) and "expected a regular file" in str(e) for e in outcomes.values()), \
            outcomes


@pytest.mark.parametrize("name,seed", [pytest.param(n, i, id=f"{n}-{i}") for n, i in CASES])
def test_mutant(base, tmp_path, name, seed):
    target, make, _ = MUTANTS[name]
    data, must_fail = make(base, np.random.default_rng([zlib.crc32(name.encode()), seed]), tmp_path)
    path = tmp_path / "mutant.gguf"
    path.write_bytes(data)
    outcomes = run_all(path, target, base, tmp_path)
    accepted = sorted(p for p in must_fail if outcomes[p] is None)
    assert not accepted, f"{name}-{seed} accepted by {accepted}"
    for point, e in outcomes.items():
        if e is not None:
            assert "\n" not in str(e) and (str(path) in str(e) or point == "quantize-imatrix" and
                                           str(base.model) in str(e)), f"{point}: {e}"
