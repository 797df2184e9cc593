"""Logical axes -> mesh axes (``data``, ``model``, ``expert``) and sharded parameter placement.

A logical axis maps to its mesh axis only when the dimension divides evenly by that mesh axis' size and the
mesh axis is not already used by another dimension of the same array; otherwise that dimension is
replicated. So one rules table serves every model size and mesh shape.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax import params as P
from mtp_jax.config import ModelConfig

# logical axis -> mesh axis (None = replicated)
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "moe_mlp": "model",
    "experts": "expert",
    "layers": None,
    "norm": None,
}


def make_mesh(data: int = 1, model: int = 1, expert: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    n = data * model * expert
    if n > len(devices):
        raise ValueError(f"mesh data={data} x model={model} x expert={expert} needs {n} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[:n]).reshape(data, model, expert), ("data", "model", "expert"))


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh,
             rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, axes):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis and mesh_axis not in used and dim % mesh.shape[mesh_axis] == 0:
            out.append(mesh_axis)
            used.add(mesh_axis)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> Any:
    """NamedSharding per leaf, same tree as the params."""
    return jax.tree.map(lambda i: NamedSharding(mesh, spec_for(i.shape, i.axes, mesh, rules)),
                        P.abstract(cfg), is_leaf=lambda x: isinstance(x, P.ArrayInfo))


def shard_params(params: P.Params, cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> P.Params:
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def sharded_fraction(params: P.Params) -> float:
    """Share of parameter bytes that are split across devices (a quick check that sharding took effect)."""
    leaves = jax.tree.leaves(params)
    total = sum(math.prod(x.shape) for x in leaves)
    split = sum(math.prod(x.shape) for x in leaves if not x.sharding.is_fully_replicated)
    return split / total
