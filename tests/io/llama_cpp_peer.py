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
import re
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


def logits_agree(model: Path, cfg, params, ids: list[int], tol: float) -> np.ndarray:
    """Our trunk logits for ``ids`` equal llama.cpp's on ``model`` within ``tol`` and pick the same argmax at every
    position -> llama.cpp's [len(ids), V]."""
    import jax.numpy as jnp

    from mtp_jax.model import forward

    theirs = logits(model, ids)
    ours = np.asarray(forward(params, jnp.asarray([ids]), None, cfg)[1][0])
    assert theirs.shape == ours.shape == (len(ids), cfg.vocab_size)
    diff = np.abs(ours - theirs).max()
    assert diff < tol, f"max |logit diff| {diff:.3g} (logits up to {np.abs(ours).max():.3g})"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    return theirs


def quantize_needs_imatrix(model: Path, full, partial, tmp: Path, ftype: str = "IQ2_XXS") -> tuple[Path, str]:
    """llama-quantize ``ftype`` of ``model`` succeeds with the imatrix ``full`` and fails with ``partial``
    (io.imatrix_gguf.ImatrixData, written under ``tmp``; asserted) -> (the full imatrix's file, the failing run's
    output, for the caller to check which tensor it missed)."""
    from mtp_jax.io.imatrix_gguf import write_imatrix_gguf

    outs = {}
    for im, ok in ((full, True), (partial, False)):
        path = write_imatrix_gguf(im, tmp / f"imatrix-{ok}.gguf")
        p = run("llama-quantize", "--imatrix", path, model, tmp / f"{ftype}-{ok}.gguf", ftype, 1, timeout=300)
        outs[ok] = p.stderr + p.stdout.decode(errors="replace")
        assert (p.returncode == 0) == ok, outs[ok][-3000:]
    return tmp / "imatrix-True.gguf", outs[False]


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


# llama.cpp matching our numerics: one thread (OpenMP spins on busy cores), f32 KV caches (target and draft),
# no flash attention (its CPU kernel accumulates in f16), prompt text taken verbatim
COMMON = ["-t", 1, "-tb", 1, "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-escape", "-c", 512, "--temp", 0]


def spec_steps(stderr: str) -> list[tuple[list[int], int, int]]:
    """Per verify step of llama-speculative-simple -lv 5: (drafted ids, accepted, draft size)."""
    steps, drafts = [], []
    for line in stderr.splitlines():
        if m := re.search(r"draft candidate +0, pos +(\d+): +(\d+)", line):
            drafts.append(int(m.group(2)))
        elif m := re.search(r"accepted (\d+)/(\d+) draft tokens", line):
            n = int(m.group(2))
            steps.append((drafts[:n], int(m.group(1)), n))
            drafts = []
    return steps


def draft_mtp_agrees(path: Path, cfg, params, tok, tmp: Path, K: int = 3, n_predict: int = 48,
                     draft_model: Path | None = None) -> np.ndarray:
    """Greedy draft-mtp with K drafts, ours vs llama-speculative-simple: same text, same drafted tokens, same
    accepted count at every step (asserted). Returns the histogram of llama's accepted counts [K + 1].

    Step alignment: llama-speculative-simple evaluates the prompt but its last token, then drafts that token's
    successor with the MTP head; we prefill the whole prompt and take the first token from the trunk. So llama
    gets our prompt plus our first generated token t_N: both then draft from the pair (h_{N-1}, t_N).
    Its budget: it stops once it has generated more than -n tokens and caps each draft at n - generated - 1
    tokens (common_speculative_draft truncates); we run longer and compare its steps with ours, capped alike.
    ``draft_model``: the drafter's own file (``-md``: Gemma-4's assistant)."""
    from mtp_jax import speculative  # noqa: PLC0415
    from mtp_jax.llama_cpp import speculative_counts  # noqa: PLC0415

    prompt = "The quick brown fox jumps over the lazy dog.\n"
    ids = tok.encode(prompt)
    res = speculative.generate(params, cfg, [ids], num_draft=K, max_new_tokens=n_predict + 2 * K + 2, trace=True)
    first, rest = res.tokens[0][0], res.tokens[0][1:]
    text = prompt + tok.decode([first])
    assert tokenize(path, text, tmp=tmp) == ids + [first]  # the shifted prompt tokenizes as intended
    p = run_until(
        "llama-speculative-simple", "-m", path, *(["-md", draft_model] if draft_model else []), "-p", text,
        "-n", n_predict, "--spec-type", "draft-mtp",
        "--spec-draft-n-max", K, "--spec-draft-p-min", 0, "-ctkd", "f32", "-ctvd", "f32", "-lv", 5, *COMMON,
        ok=lambda p: "n_accept" in p.stderr and "#acc rate/pos" in p.stderr)
    theirs, ours = spec_steps(p.stderr), res.stats["trace"]
    assert len(theirs) >= n_predict // (K + 1)
    generated = 0
    for i, (drafts, acc, n) in enumerate(theirs):
        assert drafts == ours[i]["drafted"][:n], f"step {i}: drafts {drafts} vs ours {ours[i]['drafted']}"
        assert acc == min(ours[i]["accepted"], n), f"step {i}"
        generated += acc + 1
        if ours[i]["accepted"] > n:  # llama's draft was cut by its budget: the schedules part here
            assert generated >= n_predict
            break
    out = p.stdout.strip()
    assert out.startswith(text.encode())
    theirs_text = out[len(text.encode()):]
    assert theirs_text == tok.decode_bytes(rest)[: len(theirs_text)] and len(theirs_text) >= n_predict
    assert speculative_counts(p.stderr)[1] == sum(acc for _, acc, _ in theirs)
    return np.bincount([acc for _, acc, _ in theirs], minlength=K + 1)
