"""One entry point for every model source: GGUF file, HF directory, orbax checkpoint, or YAML config."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax

from mtp_jax import kernels, qweight, sharding
from mtp_jax import params as P
from mtp_jax.config import ModelConfig, load_config
from mtp_jax.io.gguf import GGUFError, read_gguf, read_tokenizer
from mtp_jax.io.hf import read_hf
from mtp_jax.io.orbax import is_checkpoint, load_orbax
from mtp_jax.io.tokenizer import Tokenizer, TokenizerError
from mtp_jax.io.validate import regular_file

log = logging.getLogger(__name__)


def source_kind(spec: str | os.PathLike) -> str:
    """'gguf' | 'hf' | 'orbax' | 'config' (a YAML file, an HF config.json, or a bundled config name). A path that
    exists but is neither a regular file nor a directory (a FIFO, a device) is refused before it is opened, and
    so is a *.gguf path that is not a GGUF file (it is not read as a config)."""
    path = Path(spec)
    if path.suffix == ".gguf" or (path.exists() and not path.is_dir()):
        with open(regular_file(path), "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        if path.suffix == ".gguf":
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        return "config"
    if path.is_dir():
        if is_checkpoint(path):
            return "orbax"
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return "hf"
        raise ValueError(f"{path}: neither an HF checkpoint (config.json + *.safetensors) nor an mtp_jax "
                         f"orbax checkpoint (config.json + params/)")
    return "config"


def attach_head(cfg: ModelConfig, params: P.Params, head_cfg: ModelConfig, head: P.Params,
                where: str | os.PathLike) -> tuple[ModelConfig, P.Params]:
    """A trunk's params with the NextN blocks of another model file (``--mtp-head``): its config must describe the
    same trunk. The head file's config (it declares the NextN layers) becomes the model's."""
    if head.nextn is None:
        raise ValueError(f"{where}: holds no NextN (MTP) blocks")
    if head_cfg.trunk_only().replace(name=cfg.name, dtype=cfg.dtype) != cfg.trunk_only():
        raise ValueError(f"{where}: its config describes a different trunk than the model's "
                         f"({head_cfg.family} {head_cfg.name})")
    return head_cfg.replace(name=cfg.name, dtype=cfg.dtype), dataclasses.replace(params, nextn=head.nextn)


def load_model(spec: str | os.PathLike | ModelConfig, dtype: str | None = None, load_mtp: bool = True,
               seed: int = 0, check_finite: bool = True, quantized: str = "keep",
               mtp_head: str | os.PathLike | None = None, mesh: Any = None,
               placement: Any = ()) -> tuple[ModelConfig, P.Params, Tokenizer | None]:
    """(cfg, params, tokenizer or None) from a GGUF file, an HF directory, an orbax checkpoint, or a config
    (ModelConfig, YAML, HF config.json, or a bundled config name) with random weights drawn with ``seed``.

    ``dtype`` None keeps the source's float type (the config's for random weights); ``load_mtp=False`` leaves
    params.nextn None (the config still describes the NextN layer), as llama.cpp does without MTP.
    ``check_finite`` refuses a GGUF with NaN/Inf weights (GGUFError naming the tensor). ``quantized``: "keep" a
    GGUF's quantized weights in their block format (mtp_jax.qweight) or "dequantize" them to ``dtype`` at load.
    ``mtp_head``: take the NextN blocks from this model file instead (e.g. an MTP-only GGUF beside a trunk-only
    one, as llama.cpp's converter writes them with --mtp / --no-mtp); ignored when ``load_mtp`` is False.
    ``mesh`` (a Mesh, or a function of the config returning one or None) places the params on it
    (sharding.param_shardings with ``placement``): a GGUF or orbax checkpoint is read straight into each
    device's shards, so no process holds the whole model (a GGUF's quantized weights in their blocks with
    ``quantized`` "keep"); other sources are placed after loading. On one device with the CPU kernels and
    ``quantized`` "keep", every source's float matrices come as GGUF rows (qweight.float_rows), as a GGUF's do."""
    if mtp_head is not None and load_mtp:
        cfg, params, tok = load_model(spec, dtype, False, seed, check_finite, quantized, mesh=mesh,
                                      placement=placement)
        from mtp_jax import families

        fam = families.of(cfg)
        if fam.read_head is not None:  # a drafter model of its own (Gemma-4's assistant)
            cfg, head = fam.read_head(mtp_head, cfg.trunk_only(), cfg.dtype, check_finite)
            return cfg, ready_params(dataclasses.replace(params, nextn=head), cfg, mesh, placement, quantized), tok
        head_cfg, head, _ = load_model(mtp_head, cfg.dtype, True, seed, check_finite, quantized, mesh=mesh,
                                       placement=placement)
        return (*attach_head(cfg, params, head_cfg, head, mtp_head), tok)
    kind = "config" if isinstance(spec, ModelConfig) else source_kind(spec)
    if kind == "gguf":
        cfg, params = read_gguf(spec, dtype=dtype, load_mtp=load_mtp, check_finite=check_finite, quantized=quantized,
                                float_rows=kernels.use_cpu_kernels(), mesh=mesh, placement=placement)
        return cfg, params, _gguf_tokenizer(spec)
    if kind == "orbax":
        cfg, params, tok = load_orbax(spec, dtype=dtype, load_mtp=load_mtp, mesh=mesh, placement=placement)
        on_mesh = sharding.mesh_for_config(mesh, cfg) is not None  # restored into its shards already
        return cfg, params if on_mesh else ready_params(params, cfg, None, (), quantized), tok
    if kind == "hf":
        cfg, params = read_hf(spec, dtype=dtype, load_mtp=load_mtp)
        has_tok = (Path(spec) / "tokenizer.json").is_file()
        return cfg, ready_params(params, cfg, mesh, placement, quantized), Tokenizer.from_hf(spec) if has_tok else None
    cfg = spec if isinstance(spec, ModelConfig) else load_config(spec)
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    params = P.init(jax.random.key(seed), cfg)
    params = params if load_mtp else dataclasses.replace(params, nextn=None)
    return cfg, ready_params(params, cfg, mesh, placement, quantized), None


def ready_params(params: P.Params, cfg: ModelConfig, mesh: Any, placement: Any, quantized: str) -> P.Params:
    """params on the mesh (``mesh`` as load_model takes it); on one device with the CPU kernels and ``quantized``
    "keep", in the layout the kernels read fastest (``float_rows``), as a GGUF's load gives them."""
    mesh = sharding.mesh_for_config(mesh, cfg)
    if mesh is not None:
        return sharding.shard_params(params, cfg, mesh, placement=placement)
    return qweight.float_rows(cfg, params) if kernels.use_cpu_kernels() and quantized == "keep" else params


def _gguf_tokenizer(path) -> Tokenizer | None:
    """The GGUF's tokenizer; None (with a warning) for a kind we do not implement (e.g. Gemma 4's 'gemma4'
    SentencePiece model): the model still decodes token ids. A damaged vocabulary stays an error."""
    try:
        return read_tokenizer(path)
    except TokenizerError as e:
        if "unsupported" not in str(e):
            raise
        log.warning("%s; without a tokenizer the model takes token ids (--prompt-ids)", e)
        return None
