"""The quantizer interface and registry.

Every ggml type is one class (in the manner of gguf-py's ``quants.py``) with ``quantize_rows``:
rows are the unit because ggml quantizes row by row and some imatrix variants use whole-row
statistics (the legacy types' sigma^2). Blocks are vectorized across the row axis; within a block the
float32 operations follow the C source order (shared/notes/gguf-quantization-spec.md section 1).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256


class QuantError(ValueError):
    """Input that a ggml quantizer cannot take (bad shapes, non-finite values, missing imatrix)."""


class QuantType:
    """One ggml quantization type. Subclasses set ``qtype`` and implement ``quantize_rows``.

    ``imatrix``: "ignored" (ggml drops it), "optional" (two algorithms: ``*_ref`` without,
    ``*_impl`` with), or "required" (the IQ types for which llama-quantize demands one).
    """

    qtype: GGMLQuantizationType
    imatrix: str = "optional"

    @classmethod
    def block_size(cls) -> int:
        return GGML_QUANT_SIZES[cls.qtype][0]

    @classmethod
    def type_size(cls) -> int:
        return GGML_QUANT_SIZES[cls.qtype][1]

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """rows: f32[R, N] with N % block_size == 0; imatrix: f32[N] or None -> u8[R, N/bs*ts]."""
        raise NotImplementedError


REGISTRY: dict[GGMLQuantizationType, type[QuantType]] = {}


def register(cls: type[QuantType]) -> type[QuantType]:
    REGISTRY[cls.qtype] = cls
    return cls
