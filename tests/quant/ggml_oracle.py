"""ctypes access to libggml-base.so (built by ../shared/tools/build-llama-cpp.sh --lib-only): the oracle.

Locating the library: $MTP_JAX_GGML_LIB, else the build script's cache
($MTP_JAX_CACHE or ~/.cache/mtp-jax)/llama-cpp-python-0.3.36/build/bin/libggml-base.so.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mtp_jax import llama_cpp

def ggml_lib_path() -> Path:
    env = os.environ.get("MTP_JAX_GGML_LIB")
    return Path(env) if env else llama_cpp.bin_dir() / "libggml-base.so"


@lru_cache(maxsize=1)
def load_ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(ggml_lib_path()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """libggml's ggml_quantize_chunk on f32[R, N] (+ imatrix f32[N]) -> u8[R, N/bs*ts]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n = rows.shape
    bs, ts = GGML_QUANT_SIZES[qtype]
    out = np.zeros((nrows, n // bs * ts), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        qw = imatrix.ctypes.data
    written = load_ggml().ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, nrows, n, qw)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    return bool(load_ggml().ggml_quantize_requires_imatrix(int(qtype)))
