"""The llama.cpp peer: the tree vendored in the llama-cpp-python 0.3.36 sdist and the tools that
../shared/tools/build-llama-cpp.sh builds from it, under ($MTP_JAX_CACHE or ~/.cache/mtp-jax)/llama-cpp-python-0.3.36.

* ``run(tool, *args)``: a built binary (llama-completion, llama-speculative-simple, llama-tokenize, ...);
* ``logits(model, ids)``: llama.cpp's logits at every position, through the sdist's ctypes bindings loaded against
  our libllama.so (LLAMA_CPP_LIB_PATH; nothing is compiled), f32 KV cache, flash attention off, in a subprocess
  (``python -m tests.io.llama_cpp_peer logits MODEL OUT.npy ID...``);
* ``convert_hf(src, dst, outtype)``: the vendored convert_hf_to_gguf.py.

Everything runs on one thread (``-t 1``): on busy cores llama.cpp's OpenMP workers spin and two threads run a
tiny model a hundred times slower than one.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

from mtp_jax.llama_cpp import VERSION, bin_dir, root

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("llama-completion", "llama-speculative-simple", "llama-tokenize")


def sdist() -> Path:
    return root() / "src" / f"llama_cpp_python-{VERSION}"


def tree() -> Path:
    return sdist() / "vendor" / "llama.cpp"


def missing() -> str | None:
    """Why the peer cannot run here, or None."""
    need = [bin_dir() / t for t in TOOLS] + [bin_dir() / "libllama.so", tree() / "convert_hf_to_gguf.py",
                                              sdist() / "llama_cpp" / "llama_cpp.py"]
    absent = [str(p) for p in need if not p.exists()]
    return f"llama.cpp peer not built ({', '.join(absent)}); run ../shared/tools/build-llama-cpp.sh" if absent else None


def run(tool: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """A built tool; stdout as bytes (generated text need not be UTF-8), stderr as text. Not checked."""
    p = subprocess.run([str(bin_dir() / tool), *map(str, args)], capture_output=True, timeout=timeout, check=False)
    p.stderr = p.stderr.decode(errors="replace")
    return p


def run_until(tool: str, *args: object, ok, tries: int = 3) -> subprocess.CompletedProcess:
    """Run until ``ok(proc)``: llama.cpp's asynchronous logger sometimes loses the tail of its output at exit."""
    for _ in range(tries):
        p = run(tool, *args)
        if p.returncode == 0 and ok(p):
            return p
    raise AssertionError(f"{tool} {' '.join(map(str, args))}: rc={p.returncode}, output incomplete after {tries} "
                         f"tries; stderr tail:\n{p.stderr[-3000:]}")


def tokenize(model: Path, text: str, parse_special: bool = False, tmp: Path | None = None) -> list[int]:
    """llama-tokenize --ids on ``text`` verbatim (from a file, escapes off); it parses special tokens by default."""
    f = (tmp or model.parent) / "prompt.txt"
    f.write_bytes(text.encode())
    args = ["-m", model, "-f", f, "--ids", "--no-escape", "--log-disable",
            *([] if parse_special else ["--no-parse-special"])]
    p = run_until("llama-tokenize", *args, ok=lambda p: p.stdout.strip().startswith(b"["))
    return [int(x) for x in p.stdout.strip().splitlines()[-1].strip(b"[]").split(b",") if x.strip()]


def logits(model: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), V] for one sequence at positions 0.. (subprocess, see _logits_main)."""
    out = model.with_suffix(".logits.npy")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(bin_dir()), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "tests.io.llama_cpp_peer", "logits", str(model), str(out),
                        *map(str, ids)], capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
                       check=False)
    if p.returncode:
        raise AssertionError(f"llama.cpp logits failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return np.load(out)


def convert_hf(src: Path, dst: Path, outtype: str) -> subprocess.CompletedProcess:
    """The vendored convert_hf_to_gguf.py (with its own gguf-py). Our tiny test tokenizers have no entry in
    its table of known pre-tokenizer hashes (get_vocab_base_pre), so the driver answers "glm4", the name it
    gives GLM-4.5's tokenizer."""
    driver = (
        "import sys, runpy\n"
        "tree = sys.argv[1]\n"
        "sys.path[:0] = [tree, tree + '/gguf-py']\n"
        "sys.argv = [tree + '/convert_hf_to_gguf.py', *sys.argv[2:]]\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'glm4'\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", driver, str(tree()), str(src), "--outfile", str(dst),
                           "--outtype", outtype], capture_output=True, text=True, timeout=300, check=False)


# ---- subprocess side ---------------------------------------------------------------------------------------------


def _bindings():
    """llama_cpp.llama_cpp (the ctypes API) without llama_cpp/__init__, whose high-level API pulls in diskcache,
    jinja2 and more."""
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(sdist() / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(bin_dir()))
    return importlib.import_module("llama_cpp.llama_cpp")


def _logits_main(model: str, out: str, ids: list[int]) -> None:
    L = _bindings()
    L.llama_backend_init()
    m = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    assert m, f"llama.cpp could not load {model}"
    cp = L.llama_context_default_params()
    n = len(ids)
    cp.n_ctx, cp.n_batch, cp.n_ubatch = max(n, 16), n, n
    cp.n_threads = cp.n_threads_batch = 1
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # CPU flash attention accumulates in f16
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    ctx = L.llama_init_from_model(m, cp)
    batch = L.llama_batch_init(n, 0, 1)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"
    V = L.llama_vocab_n_tokens(L.llama_model_get_vocab(m))
    np.save(out, np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(V,)).copy()
                           for i in range(n)]))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(m)


if __name__ == "__main__":
    if sys.argv[1:2] != ["logits"]:
        sys.exit("usage: python -m tests.io.llama_cpp_peer logits MODEL OUT.npy ID...")
    _logits_main(sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4:]])
