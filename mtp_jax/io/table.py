"""The tensor table: one ``Spec`` per tensor, tying a parameter leaf to its GGUF name, HF name and layout.

Each family lists its specs (``Family.top_specs``, ``layer_specs``, ``nextn_specs``); ``plan`` walks a model's
tensors in file order from them. GGUF, HF and orbax I/O, imatrix names and the quantizer read this table.

Layout: numpy shape = ggml ``ne`` reversed, so a GGUF weight is [out, in] like HF's ``nn.Linear``; our leaves
are [in..., out...] with heads split. HF tensors have the GGUF layout (routed experts: one tensor per expert,
``{e}`` in the HF name, or transformers 5's fused ``gate_up_proj`` / ``down_proj``; see io/hf.py), except where a
``Part`` says that llama.cpp's converter cuts one HF tensor into several GGUF tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType

T = MODEL_TENSOR
HF_BLOCK = "model.layers.{bid}"  # an HF decoder block's prefix (the NextN blocks follow the trunk's)


@dataclass(frozen=True)
class Part:
    """A GGUF tensor that is a slice of one HF matrix: the HF [groups * width, in] viewed [groups, width, in],
    rows [start, stop) of each group, swapped to [groups, in, stop - start] when ``transpose``. DeepSeek's
    kv_b_proj -> attn_k_b (transposed) and attn_v_b: convert_hf_to_gguf DeepseekV2Model.modify_tensors."""

    groups: int
    width: int
    start: int
    stop: int
    transpose: bool = False

    def take(self, hf: np.ndarray) -> np.ndarray:
        """HF matrix -> this GGUF tensor (numpy layout)."""
        y = hf.reshape(self.groups, self.width, -1)[:, self.start: self.stop]
        return y.swapaxes(1, 2) if self.transpose else y

    def put(self, y: np.ndarray, hf: np.ndarray | None) -> np.ndarray:
        """Write this GGUF tensor into the HF matrix (a new one of zeros when ``hf`` is None); returns it."""
        y = y.swapaxes(1, 2) if self.transpose else y
        if hf is None:
            hf = np.zeros((self.groups * self.width, y.shape[-1]), y.dtype)
        hf.reshape(self.groups, self.width, -1)[:, self.start: self.stop] = y
        return hf


@dataclass(frozen=True)
class Spec:
    """One tensor and the leaf it fills. ``n_in`` None: a vector (norm, bias), stored flat, or with ``table``
    an embedding table [rows, D], stored as is; an int k: a linear map whose first k dims (after ``batch``
    leading dims) are its inputs, stored [*batch, out, in]. ``hf``: the HF name, relative to the block prefix
    for block tensors (None: HF has no such tensor); ``hf_part``: this tensor is a Part of that HF tensor;
    ``hf_offset``: added to the HF values."""

    tensor: MODEL_TENSOR
    path: tuple[str, ...]  # attribute path inside a Layer / NextN / Params
    n_in: int | None = None
    batch: int = 0
    suffix: str = "weight"
    table: bool = False
    hf: str | None = None
    hf_part: Part | None = None
    hf_offset: float = 0.0  # GGUF value = HF value + this (Step-3.5's (1 + w) norms: its converter adds 1)

    def name(self, bid: int | None = None) -> str:
        return TENSOR_NAMES[self.tensor].format(bid=bid) + "." + self.suffix

    @property
    def key(self) -> str:
        """The leaf path as statistics and orbax name it ("attn.wq", "ffn.gate")."""
        return ".".join(self.path)

    def gguf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.n_in is None:
            return ours if self.table else (math.prod(ours),)
        b, rest = ours[: self.batch], ours[self.batch:]
        return (*b, math.prod(rest[self.n_in:]), math.prod(rest[: self.n_in]))

    def to_gguf(self, x: np.ndarray) -> np.ndarray:
        """Our layout -> GGUF numpy layout (a view when x is contiguous)."""
        if self.n_in is None:
            return x.reshape(self.gguf_shape(x.shape))
        b, rest = x.shape[: self.batch], x.shape[self.batch:]
        return x.reshape(*b, math.prod(rest[: self.n_in]), math.prod(rest[self.n_in:])).swapaxes(-1, -2)

    def from_gguf(self, y: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        """GGUF numpy layout (contiguous) -> a view in our layout."""
        if self.n_in is None:
            return y.reshape(ours)
        b, rest = ours[: self.batch], ours[self.batch:]
        ins, outs = rest[: self.n_in], rest[self.n_in:]
        v = y.reshape(*b, *outs, *ins)
        nb, no = len(b), len(outs)
        return v.transpose(*range(nb), *range(nb + no, v.ndim), *range(nb, nb + no))

    def ggml_type(self, name: str, n_dims: int, outtype: GGMLQuantizationType) -> GGMLQuantizationType:
        """convert_hf_to_gguf prepare_tensors' rule: 1-D tensors, norms, biases and the router stay F32."""
        f32 = (n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
               or self.tensor == MODEL_TENSOR.FFN_GATE_INP)
        return GGMLQuantizationType.F32 if f32 else outtype


@dataclass(frozen=True)
class Slot:
    """Where one tensor goes: the Params leaf (attribute path), the layer index inside a stack, its block."""

    name: str
    spec: Spec
    leaf: tuple[Any, ...]
    index: int | None  # row of a stacked leaf, None for unstacked leaves
    block: int | None = None  # GGUF / HF block number (None: outside the blocks)

    @property
    def hf_name(self) -> str | None:
        if self.spec.hf is None:
            return None
        return self.spec.hf if self.block is None else f"{HF_BLOCK.format(bid=self.block)}.{self.spec.hf}"


def decoder_stacks(cfg: Any) -> list[tuple[str, tuple[int, ...], bool]]:
    """GLM-4.5 / DeepSeek-V3: the dense lead layers, then the MoE layers."""
    nd, n = cfg.num_dense_layers, cfg.num_hidden_layers
    return [("dense_layers", tuple(range(nd)), False), ("moe_layers", tuple(range(nd, n)), True)]


def stacks(cfg: Any) -> list[tuple[str, tuple[int, ...], bool]]:
    """The trunk's layer stacks: (Params attribute, the GGUF / HF block id of each stacked layer, MoE)."""
    from mtp_jax import families

    return (families.of(cfg).stacks or decoder_stacks)(cfg)


def plan(cfg: Any, template: Any) -> Iterator[Slot]:
    """Every tensor of a model shaped like ``template`` (None leaves skipped): the top tensors' first (the
    embedding), the blocks in order (the NextN blocks last), then the rest of the top tensors. llama.cpp looks
    tensors up by name; this order is convert_hf_to_gguf's."""
    from mtp_jax import families

    fam = families.of(cfg)
    top = [s for s in fam.top_specs(cfg) if _get(template, s.path) is not None]
    yield from (Slot(s.name(), s, s.path, None) for s in top[:1])
    blocks = sorted((bid, attr, j, moe) for attr, bids, moe in stacks(cfg) if getattr(template, attr) is not None
                    for j, bid in enumerate(bids))
    for bid, attr, j, moe in blocks:
        for s in fam.layer_specs(cfg, moe):
            if _get(getattr(template, attr), s.path) is not None:
                yield Slot(s.name(bid), s, (attr, *s.path), j, bid)
    for n, nn in enumerate(template.nextn if isinstance(template.nextn, tuple) else ()):  # (not an assistant's)
        b = cfg.num_hidden_layers + n
        moe = getattr(nn.layer.ffn, "router", None) is not None  # a head's block may have a dense MLP (step35)
        for s in fam.layer_specs(cfg, moe):
            if _get(nn.layer, s.path) is not None:
                yield Slot(s.name(b), s, ("nextn", n, "layer", *s.path), None, b)
        for s in fam.nextn_specs(cfg):
            if _get(nn, s.path) is not None:
                yield Slot(s.name(b), s, ("nextn", n, *s.path), None, b)
    yield from (Slot(s.name(), s, s.path, None) for s in top[1:])


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj
