"""quantize()/dequantize() for any registered ggml type, on tensors of any rank."""

from __future__ import annotations

import importlib

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from mtp_jax.quant.base import REGISTRY, QuantError, QuantType

# the modules whose classes register the types, imported on the first lookup they may answer: a quantizer process
# (and each of its workers) imports only what its types need (the grid types' module is ~3 MB of RSS)
_MODULES = ["legacy", "kquants", "iq4", "ternary", "iqgrid"]


def _import_until(qtype: GGMLQuantizationType | None) -> None:
    """Import the quantizer modules in turn until ``qtype`` is registered (None: all of them)."""
    while _MODULES and (qtype is None or qtype not in REGISTRY):
        importlib.import_module(f"mtp_jax.quant.{_MODULES.pop(0)}")


def registered() -> dict[GGMLQuantizationType, type[QuantType]]:
    """Every type with a quantizer."""
    _import_until(None)
    return dict(REGISTRY)


def quant_type(qtype: GGMLQuantizationType | str) -> type[QuantType]:
    if isinstance(qtype, str):
        try:
            qtype = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise QuantError(f"unknown ggml type {qtype!r}") from None
    _import_until(qtype)
    if qtype not in REGISTRY:
        raise QuantError(f"no quantizer for ggml type {qtype.name}; have {sorted(t.name for t in registered())}")
    return REGISTRY[qtype]


def quantize(data: np.ndarray, qtype: GGMLQuantizationType | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """f32[..., N] (+ imatrix f32[N]) -> u8[..., N/bs*ts], the bytes ggml_quantize_chunk writes."""
    cls = quant_type(qtype)
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[-1]
    if n % cls.block_size():
        raise QuantError(f"{cls.qtype.name}: row size {n} is not a multiple of the block size {cls.block_size()}")
    if not np.isfinite(data).all():
        raise QuantError(f"{cls.qtype.name}: tensor has non-finite values")
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise QuantError(f"{cls.qtype.name}: imatrix has shape {imatrix.shape}, expected ({n},)")
        if not np.isfinite(imatrix).all():
            raise QuantError(f"{cls.qtype.name}: imatrix has non-finite values")
        if cls.imatrix == "ignored":
            imatrix = None
    elif cls.imatrix == "required":
        raise QuantError(f"{cls.qtype.name} requires an importance matrix")
    rows = data.reshape(-1, n)
    out = cls.quantize_rows(rows, imatrix)
    return out.reshape(*data.shape[:-1], out.shape[-1])


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType | str) -> np.ndarray:
    """u8[..., row_bytes] -> f32[..., N] (gguf-py's dequantizers)."""
    cls = quant_type(qtype) if not isinstance(qtype, GGMLQuantizationType) else None
    qt = cls.qtype if cls else qtype
    return gguf_quants.dequantize(np.asarray(data, dtype=np.uint8), qt).astype(np.float32)
