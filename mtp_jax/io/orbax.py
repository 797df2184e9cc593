"""(ModelConfig, Params[, Tokenizer]) <-> an orbax checkpoint directory, exactly (dtypes and bits kept).

Layout: ``config.json`` (ModelConfig.to_dict), ``params/`` (orbax StandardCheckpointer of a flat
{"moe_layers.attn.wq": array, "nextn.0.eh_proj": array, ...} dict of host arrays, so a checkpoint restores on
any device count), and ``tokenizer.json`` (Tokenizer.to_dict) when there is a tokenizer. The directory is
written under a temporary name and renamed on success.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.io.tokenizer import Tokenizer

CONFIG = "config.json"
PARAMS = "params"
TOKENIZER = "tokenizer.json"


class OrbaxError(ValueError):
    """A directory that is not an mtp_jax orbax checkpoint; the message names it."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / PARAMS).is_dir()


def save_orbax(path: str | os.PathLike, cfg: ModelConfig, params: P.Params, tokenizer: Tokenizer | None = None) -> Path:
    path = Path(path)
    if path.exists():
        raise OrbaxError(f"{path}: already exists")
    template = tree.template_of(cfg, params)
    try:
        tree.check_shapes(template, params, path)
    except ValueError as e:
        raise OrbaxError(str(e)) from None
    flat = {tree.key(leaf): np.asarray(tree.get(params, leaf)) for leaf in tree.leaf_paths(template)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(json.dumps(tokenizer.to_dict()))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((tmp / PARAMS).absolute(), flat)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_orbax(path: str | os.PathLike, dtype: str | None = None,
               load_mtp: bool = True) -> tuple[ModelConfig, P.Params, Tokenizer | None]:
    """-> (cfg, params of jax arrays, tokenizer or None). ``dtype`` None keeps the saved dtype."""
    path = Path(path)
    if not is_checkpoint(path):
        raise OrbaxError(f"{path}: not an mtp_jax checkpoint (needs {CONFIG} and {PARAMS}/)")
    cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    with ocp.StandardCheckpointer() as ckpt:
        flat = ckpt.restore((path / PARAMS).absolute())
    present = {k for k in tree.NEXTN_OPTIONAL if f"nextn.0.{k}" in flat}
    template = tree.template(cfg, present, load_mtp)
    leaves = []
    for leaf in tree.leaf_paths(template):
        k, want = tree.key(leaf), tree.get(template, leaf).shape
        if k not in flat or tuple(flat[k].shape) != want:
            raise OrbaxError(f"{path}: param {k} has shape {None if k not in flat else tuple(flat[k].shape)}, "
                             f"the config needs {want}")
        leaves.append(jax.device_put(np.asarray(flat[k], cfg.dtype)))
    tok_path = path / TOKENIZER
    tok = Tokenizer.from_dict(json.loads(tok_path.read_text())) if tok_path.is_file() else None
    return cfg, tree.build(template, leaves), tok
