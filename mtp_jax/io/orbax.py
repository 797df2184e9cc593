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
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtp_jax import params as P
from mtp_jax import pytree
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.io.tokenizer import Tokenizer

pytree.register_with_jax()  # (mtp_jax.pytree)

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


def load_orbax(path: str | os.PathLike, dtype: str | None = None, load_mtp: bool = True, mesh: Any = None,
               placement: Any = ()) -> tuple[ModelConfig, P.Params, Tokenizer | None]:
    """-> (cfg, params of jax arrays, tokenizer or None). ``dtype`` None keeps the saved dtype. ``mesh``: restore
    each parameter straight into its shards on the mesh (sharding.param_shardings with ``placement``), so no
    process holds a whole copy first; a function of the config may stand for the mesh."""
    path = Path(path)
    if not is_checkpoint(path):
        raise OrbaxError(f"{path}: not an mtp_jax checkpoint (needs {CONFIG} and {PARAMS}/)")
    cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    from mtp_jax import sharding  # noqa: PLC0415  (sharding imports nothing of io)

    mesh = sharding.mesh_for_config(mesh, cfg)
    with ocp.StandardCheckpointer() as ckpt:
        meta = dict(ckpt.metadata((path / PARAMS).absolute()).item_metadata)
        present = {k for k in tree.NEXTN_OPTIONAL if f"nextn.0.{k}" in meta}
        template = tree.template(cfg, present, load_mtp)
        paths = tree.leaf_paths(template)
        for leaf in paths:
            k, want = tree.key(leaf), tree.get(template, leaf).shape
            if k not in meta or tuple(meta[k].shape) != want:
                raise OrbaxError(f"{path}: param {k} has shape {None if k not in meta else tuple(meta[k].shape)}, "
                                 f"the config needs {want}")
        if mesh is None:
            flat = ckpt.restore((path / PARAMS).absolute())
            leaves = [jax.device_put(np.asarray(flat[tree.key(leaf)], cfg.dtype)) for leaf in paths]
        else:
            shardings = sharding.param_shardings(cfg, mesh, placement=placement, template=template)
            target = {tree.key(leaf): jax.ShapeDtypeStruct(meta[tree.key(leaf)].shape, meta[tree.key(leaf)].dtype,
                                                           sharding=tree.get(shardings, leaf)) for leaf in paths}
            rest = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # a head left out is still read
            target |= {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rest) for k, m in meta.items()
                       if k not in target}
            flat = ckpt.restore((path / PARAMS).absolute(), target)
            leaves = [flat[tree.key(leaf)].astype(cfg.dtype) for leaf in paths]
    tok_path = path / TOKENIZER
    tok = Tokenizer.from_dict(json.loads(tok_path.read_text())) if tok_path.is_file() else None
    return cfg, tree.build(template, leaves), tok
