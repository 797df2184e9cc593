"""Native CPU kernels, compiled on first use and called through ``jax.ffi``.

``cpu_linear.cc`` is built with the machine's C++ compiler (``-O3 -march=native``) against the XLA FFI headers
that jaxlib ships, into ``~/.cache/mtp-jax/kernels/`` (keyed by source, flags, jaxlib version and CPU), and
registered as the custom calls ``mtp_linear`` (mtp_jax/linear.py) and ``mtp_attend`` (attention over a KV-cache
layer read in place, mtp_jax/layers.py). Without a compiler, or with ``MTP_JAX_KERNELS=0``, ``available()``
is False and callers use plain XLA ops (correct, several times slower on CPU: see mtp_jax/linear.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("cpu_linear.cc")
TARGET = "mtp_linear"
ATTEND = "mtp_attend"  # attention over a KV-cache layer read in place (layers.attention)
# -ffp-contract=off: a quantized weight is dequantized with separate f32 multiplies and adds, as gguf-py does
# (GCC would otherwise fuse an intrinsic multiply and subtract into one FMA, with another rounding)
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]


def cache_dir() -> Path:
    return Path(os.environ.get("MTP_JAX_CACHE", Path.home() / ".cache" / "mtp-jax")) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(cxx: str) -> Path:
    """Compile once per (source, flags, jaxlib, CPU); concurrent builders wait on a lock, output renamed."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), jax.__version__.encode(), cxx.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    out = cache_dir() / f"mtp_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            os.replace(tmp, out)
    return out


@cache
def available() -> bool:
    """True when the CPU kernels are built and registered (and not disabled by MTP_JAX_KERNELS=0)."""
    if os.environ.get("MTP_JAX_KERNELS", "1") == "0" or sys.platform == "win32":
        return False
    cxx = _compiler()
    if cxx is None:
        warnings.warn("mtp_jax: no C++ compiler found; CPU matmuls fall back to XLA (slow for f16/bf16 weights)")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MtpLinear), platform="cpu")
        jax.ffi.register_ffi_target(ATTEND, jax.ffi.pycapsule(lib.MtpAttend), platform="cpu")
    except (RuntimeError, OSError) as e:
        warnings.warn(f"mtp_jax: CPU kernels unavailable, falling back to XLA: {e}")
        return False
    return True


_DISABLED = [0]  # > 0 inside ``disabled()``


@contextlib.contextmanager
def disabled():
    """Trace with XLA's dots instead of the CPU kernels (``mtp-jax plan`` lowers for accelerators on fake CPU
    devices; the kernels are single-device CPU code)."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def use_cpu_kernels() -> bool:
    """Kernels apply when tracing for the CPU backend and they could be built (and are not ``disabled()``)."""
    return not _DISABLED[0] and jax.default_backend() == "cpu" and available()
