"""HF GLM-4.5 checkpoints (config.json + safetensors, transformers ``Glm4MoeForCausalLM`` naming) <->
(ModelConfig, Params), and HF -> GGUF with the tensor names, shapes and types llama.cpp's converter writes.

The name and layout mapping is ``mtp_jax.io.hf_names`` (both routed-expert layouts; the MTP block
``model.layers.{num_hidden_layers}`` is required whenever the config announces one). Safetensors are read
through the ``safetensors`` library's flax backend, which, unlike its numpy one, handles bfloat16.
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
from mtp_jax.io import hf_names
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.tokenizer import Tokenizer

_DTYPES = ("float32", "float16", "bfloat16")


class HFError(ValueError):
    """An HF checkpoint directory that cannot be read as a GLM-4.5 model; the message names the directory."""


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


def _template(cfg: ModelConfig) -> P.Params:
    """params.abstract(cfg) with zero-byte sliceable leaves: hf_names.from_hf only reads its structure."""
    return jax.tree.map(lambda i: np.broadcast_to(np.float32(0), i.shape), P.abstract(cfg),
                        is_leaf=lambda x: isinstance(x, P.ArrayInfo))


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
        params = hf_names.from_hf(_Safetensors(files), cfg, _template(cfg), load_mtp=load_mtp)
    except KeyError as e:
        msg = str(e.args[0])
        msg = msg if msg.startswith("missing") else f"missing tensor {msg}"
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
        sd = hf_names.to_hf(params, cfg, fused_experts=fused_experts)
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
