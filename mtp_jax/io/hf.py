"""HF checkpoints (config.json + safetensors, transformers naming) <-> (ModelConfig, Params), and HF -> GGUF with
the tensor names, shapes and types llama.cpp's converter writes, for every registered family.

Names and layouts come from the family's tensor table (``mtp_jax.io.table``; HF tensors have the GGUF layout).
Routed experts are read in either layout: one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, as
real checkpoints ship them) or transformers 5's fused ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate first) and
``mlp.experts.down_proj`` [E, D, F]; ``to_hf`` writes either. The MTP blocks ``model.layers.{num_hidden_layers
+ i}`` are required whenever the config announces them (unless load_mtp=False). Safetensors are read through
the ``safetensors`` library's flax backend, which, unlike its numpy one, handles bfloat16.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.io.table import Slot, plan
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.tokenizer import Tokenizer

_DTYPES = ("float32", "float16", "bfloat16")


class HFError(ValueError):
    """An HF checkpoint directory that cannot be read as a model of a registered family; the message names the
    directory."""


class _Safetensors(Mapping):
    """name -> numpy array over every *.safetensors file of a directory, each tensor read on access."""

    def __init__(self, files: list[Path]):
        self._handles = [safe_open(str(f), framework="flax") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (not a dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._where[key].get_tensor(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _config(path: Path, dtype: str | None) -> ModelConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise HFError(f"{path}: no config.json")
    hf = json.loads(cfg_path.read_text())
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    try:
        return ModelConfig.from_hf_dict(hf, dtype=dtype if dtype in _DTYPES else "float32")
    except (KeyError, ValueError) as e:
        raise HFError(f"{path}/config.json: {type(e).__name__}: {e}") from None


def _fused(name: str) -> str | None:
    """The transformers 5 fused name of a per-expert HF name (None for other tensors)."""
    if ".{e}.gate_proj." in name or ".{e}.up_proj." in name:
        return name.split("{e}.")[0] + "gate_up_proj"
    if ".{e}.down_proj." in name:
        return name.split("{e}.")[0] + "down_proj"
    return None


def to_hf(params: P.Params, cfg: ModelConfig, fused_experts: bool = True, with_mtp: bool = True) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (float32 numpy). ``fused_experts``: the transformers 5 layout."""
    import dataclasses

    params = params if with_mtp else dataclasses.replace(params, nextn=None)
    sd: dict[str, np.ndarray] = {}
    for slot in plan(cfg, tree.template_of(cfg, params)):
        name = slot.hf_name
        if name is None:
            continue
        x = np.asarray(tree.get(params, slot.leaf), np.float32)
        y = slot.spec.to_gguf(x if slot.index is None else x[slot.index])
        if slot.spec.hf_offset:  # (only then: adding 0 would turn -0.0 into +0.0)
            y = y - np.float32(slot.spec.hf_offset)
        fused = _fused(name)
        if slot.spec.hf_part is not None:  # one of several GGUF tensors cut from this HF tensor
            sd[name] = slot.spec.hf_part.put(y, sd.get(name))
        elif fused is None:
            sd[name] = np.ascontiguousarray(y)
        elif not fused_experts:
            sd |= {name.format(e=e): np.ascontiguousarray(y[e]) for e in range(y.shape[0])}
        elif fused.endswith("gate_up_proj"):  # gate comes first in the plan, up right after it
            sd[fused] = np.ascontiguousarray(np.concatenate([sd[fused], y], axis=1) if fused in sd else y)
        else:
            sd[fused] = np.ascontiguousarray(y)
    return sd


def _hf_tensor(sd: Mapping[str, np.ndarray], slot: Slot, n_experts: int) -> np.ndarray:
    """One slot's tensor in GGUF layout, from either expert layout; KeyError naming what is missing."""
    name = slot.hf_name
    fused = _fused(name)
    if fused is not None and fused in sd:
        y = np.asarray(sd[fused], np.float32)
        if fused.endswith("gate_up_proj"):
            half = y.shape[1] // 2
            y = y[:, :half] if ".{e}.gate_proj." in name else y[:, half:]
        return y
    if fused is not None:
        keys = [name.format(e=e) for e in range(n_experts)]
        for k in keys:
            if k not in sd:
                raise KeyError(f"missing tensor {k} (nor the fused {fused})")
        return np.stack([np.asarray(sd[k], np.float32) for k in keys])
    if name not in sd:
        raise KeyError(f"missing tensor {name}")
    y = np.asarray(sd[name], np.float32)
    part = slot.spec.hf_part
    if part is not None:
        if y.ndim != 2 or y.shape[0] != part.groups * part.width:
            raise KeyError(f"tensor {name} has shape {list(y.shape)}, expected [{part.groups * part.width}, ...]")
        y = part.take(y)
    return y


def from_hf(sd: Mapping[str, np.ndarray], cfg: ModelConfig, load_mtp: bool = True) -> P.Params:
    """HF state dict (either expert layout) -> Params of float32 numpy arrays, shaped by the family's table.

    Raises KeyError naming the first missing tensor; the MTP blocks are required when cfg has them and
    ``load_mtp``; their optional tensors (shared head, embedding) are taken when present."""
    from mtp_jax import families

    first = f"model.layers.{cfg.num_hidden_layers}."
    present = {s.path[0] for s in families.of(cfg).nextn_specs(cfg) if s.hf and first + s.hf in sd}
    template = tree.template(cfg, present, load_mtp and cfg.has_mtp)
    bufs = {leaf: np.empty(tree.get(template, leaf).shape, np.float32) for leaf in tree.leaf_paths(template)}
    for slot in plan(cfg, template):
        dst = bufs[slot.leaf] if slot.index is None else bufs[slot.leaf][slot.index]
        y = _hf_tensor(sd, slot, cfg.n_routed_experts)
        if slot.spec.hf_offset:  # (only then: adding 0 would turn -0.0 into +0.0)
            y = y + np.float32(slot.spec.hf_offset)
        want = slot.spec.gguf_shape(dst.shape)
        if y.shape != want:
            raise KeyError(f"tensor {slot.hf_name} has shape {list(y.shape)}, expected {list(want)}")
        dst[...] = slot.spec.from_gguf(np.ascontiguousarray(y), dst.shape)
    return tree.build(template, [bufs[leaf] for leaf in tree.leaf_paths(template)])


def read_hf(path: str | os.PathLike, dtype: str | None = None, load_mtp: bool = True) -> tuple[ModelConfig, P.Params]:
    """An HF GLM-4.5 directory -> (ModelConfig, Params of jax arrays). ``dtype`` None: config.json's dtype.

    Either routed-expert layout is read; with ``load_mtp`` the MTP block must be there (a checkpoint that
    dropped it is an error, not a silently MTP-less model)."""
    path = Path(path)
    cfg = _config(path, dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFError(f"{path}: no *.safetensors files")
    try:
        params = from_hf(_Safetensors(files), cfg, load_mtp=load_mtp)
    except KeyError as e:
        msg = str(e.args[0])
        msg = msg if msg.startswith(("missing", "tensor")) else f"missing tensor {msg}"
        if f"model.layers.{cfg.num_hidden_layers}." in msg:
            msg += f" (config.json announces {cfg.num_nextn_predict_layers} MTP layer(s); pass load_mtp=False to skip)"
        raise HFError(f"{path}: {msg}") from None
    dt = jnp.dtype(cfg.dtype)
    return cfg, jax.tree.map(lambda x: jnp.asarray(x, dt), params)


def write_hf(path: str | os.PathLike, cfg: ModelConfig, params: P.Params, fused_experts: bool = False,
             dtype: str | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """An HF directory (config.json, model.safetensors, optional tokenizer files) as GLM-4.5 ships it:
    per-expert weights unless ``fused_experts`` (the transformers 5 layout). Written to a temporary sibling
    directory and renamed on success."""
    path = Path(path)
    dtype = dtype or cfg.dtype
    if dtype not in _DTYPES:
        raise HFError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if path.exists():
        raise HFError(f"{path}: already exists")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        sd = to_hf(params, cfg, fused_experts=fused_experts)
        save_file({k: jnp.asarray(v, dtype) for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = cfg.to_hf_dict() | {"dtype": dtype, "torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def hf_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str = "bf16") -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py --outtype {outtype}`` for a GLM-4.5 directory: same tensor names,
    shapes and types (weights are read in float32, so the only rounding is to ``outtype``; the whole model is
    held in memory in float32). The tokenizer is taken from the directory's tokenizer.json when there is one."""
    src = Path(src)
    cfg, params = read_hf(src, dtype="float32")
    tok = Tokenizer.from_hf(src) if (src / "tokenizer.json").is_file() else None
    return write_gguf(dst, cfg, params, outtype=outtype, tokenizer=tok)
