"""Logical axes -> mesh axes (``data``, ``model``, ``expert``) and sharded parameter placement.

A logical axis maps to its mesh axis only when the dimension divides evenly by that mesh axis' size and the
mesh axis is not already used by another dimension of the same array; otherwise that dimension is
replicated. So one rules table serves every model size and mesh shape.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax import params as P
from mtp_jax import pytree
from mtp_jax.config import ModelConfig

pytree.register_with_jax()  # (mtp_jax.pytree)

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


def parse_mesh(text: str | None, n_devices: int, cfg: ModelConfig) -> dict[str, int]:
    """"data=2,expert=4,model=1" -> sizes (missing axes 1). None: experts on as many devices as divide both
    the expert count and the device count, the rest on the model axis."""
    if text is None:
        expert = math.gcd(n_devices, max(cfg.n_routed_experts, 1))
        return {"data": 1, "expert": expert, "model": n_devices // expert}
    sizes = {"data": 1, "expert": 1, "model": 1}
    for part in text.split(","):
        name, _, val = part.partition("=")
        if name.strip() not in sizes or not val.strip().isdigit() or int(val) < 1:
            raise ValueError(f"--mesh: expected data=N,expert=N,model=N, got {part!r}")
        sizes[name.strip()] = int(val)
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"--mesh {text} uses {math.prod(sizes.values())} devices, --devices says {n_devices}")
    return sizes


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


Placement = Sequence[tuple[str, str | None]]  # (regex on the tensor name, "replicated" | None = by the rules)


def tensor_name(path: tuple) -> str:
    """The name placement patterns match: the leaf path with the MTP blocks as ``mtp.`` ("moe_layers.ffn.gate",
    "mtp.0.eh_proj", "mtp.0.layer.attn.wq")."""
    key = ".".join(str(k.idx if isinstance(k, jax.tree_util.SequenceKey) else k.name) for k in path)
    return "mtp." + key[len("nextn."):] if key.startswith("nextn.") else key


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = RULES,
                    placement: Placement = (), template: Any = None, params: Any = None) -> Any:
    r"""NamedSharding per leaf, same tree as the params. ``placement``: the first pattern that matches a tensor's
    name (``tensor_name``, re.fullmatch) decides it: "replicated", or None for the logical-axis rules; e.g.
    ``[(r"mtp\..*", "replicated")]`` keeps the MTP head whole on every device. ``template``: the tree of
    ArrayInfo to follow (default params.abstract(cfg)). ``params``: where it holds a QuantWeight, that leaf's
    sharding is the QuantWeight with a NamedSharding per group (``quant_spec``), so jax.tree.map pairs them."""
    from mtp_jax.qweight import is_quant  # noqa: PLC0415

    pats = [(re.compile(p), how) for p, how in placement]
    for _, how in placement:
        if how not in ("replicated", None):
            raise ValueError(f"placement must be 'replicated' or None, got {how!r}")

    def one(path, i: P.ArrayInfo, x: Any = None) -> Any:
        how = next((h for pat, h in pats if pat.fullmatch(tensor_name(path))), None)
        if how == "replicated":
            spec = PartitionSpec()
        elif is_quant(x):
            spec = quant_spec(x, i.axes, mesh, rules)
        else:
            spec = spec_for(i.shape, i.axes, mesh, rules)
        named = NamedSharding(mesh, spec)
        return dataclasses.replace(x, groups=(named,) * len(x.groups)) if is_quant(x) else named

    template = P.abstract(cfg) if template is None else template
    trees = (template,) if params is None else (template, params)
    return jax.tree_util.tree_map_with_path(one, *trees, is_leaf=lambda x: isinstance(x, P.ArrayInfo))


def quant_spec(w: Any, axes: tuple[str | None, ...], mesh: Mesh,
               rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """The spec of each group of a QuantWeight ([*lead, N, row_bytes], mtp_jax/qweight.py) from the logical
    ``axes`` of the float leaf it stands for, by the same rules: lead dims (experts, layers) as there, the rows N
    (the output dims merged) on the mesh axis of the outermost output dim that has one, row_bytes (the ggml blocks
    of the inputs) never split, so the mesh axis an input dim would take is left to the outputs. A stack split by
    type (``layer_map``) keeps its groups' first dim (their own layer counts) whole."""
    ins = range(w.ndim - 1, w.ndim) if w.table else range(w.n_lead, w.n_lead + w.n_in)
    spec = spec_for(w.shape, tuple(None if j in ins else a for j, a in enumerate(axes)), mesh, rules)
    rows = next((a for j, a in enumerate(spec) if j >= w.n_lead and j not in ins and a), None)
    lead = tuple(spec[: w.n_lead])
    lead = (None, *lead[1:]) if w.layer_map is not None else lead
    return PartitionSpec(*lead, rows, None)


def shard_params(params: P.Params, cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = RULES,
                 placement: Placement = ()) -> P.Params:
    """Params placed on the mesh; generate() and speculative.generate() then put rows and caches on it too."""
    from mtp_jax.io import tree  # noqa: PLC0415
    from mtp_jax.qweight import float_arrays  # noqa: PLC0415

    params = float_arrays(params)  # float matrices kept as GGUF rows for the CPU kernel: arrays, sharded as such
    shardings = param_shardings(cfg, mesh, rules, placement, tree.template_of(cfg, params), params)
    return jax.tree.map(place, params, shardings)  # a QuantWeight's groups each by its own sharding


def mesh_of(params: Any) -> Mesh | None:
    """The mesh the params are placed on (None on a single device)."""
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")  # a KV stack [L, B, S, heads, dims]


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """An array with every process holding the whole value (host or device) -> a global array with this sharding;
    each device's shard is sliced out of it (works across processes, unlike device_put of one process' array)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_rows(x: Any, mesh: Mesh | None) -> Any:
    """Per-row arrays (leading batch axis) and KV caches (``CACHE_AXES``) on the mesh, rows on ``data``."""
    if mesh is None:
        return x

    def one(a):
        axes = CACHE_AXES if a.ndim == 5 else ("batch",) + (None,) * (a.ndim - 1)
        return place(a, NamedSharding(mesh, spec_for(a.shape, axes, mesh)))

    return jax.tree.map(one, x)


def to_host(x: Any) -> Any:
    """numpy values of (possibly multi-process) global arrays: every process gets the whole value."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def sharded_fraction(params: P.Params) -> float:
    """Share of parameter bytes that are split across devices (a quick check that sharding took effect)."""
    leaves = jax.tree.leaves(params)
    total = sum(math.prod(x.shape) for x in leaves)
    split = sum(math.prod(x.shape) for x in leaves if not x.sharding.is_fully_replicated)
    return split / total


def run_synced(fn: Any, *args: Any, **static: Any) -> Any:
    """``fn(*args, **static)`` for a jitted ``fn``; in a multi-process run, every process compiles first and waits
    at a barrier before running: the first cross-process collective gives its peers only 30 s (gloo's key-value
    wait), less than one process may still spend compiling on a loaded machine."""
    if jax.process_count() == 1:
        return fn(*args, **static)
    from jax._src import distributed  # noqa: PLC0415  (the coordination client; jax's own multi-process tests use it)

    compiled = fn.lower(*args, **static).compile()
    run_synced.calls += 1
    distributed.global_state.client.wait_at_barrier(f"mtp_jax_run_{run_synced.calls}", 600_000)
    return compiled(*args)


run_synced.calls = 0


def mesh_for_config(mesh: Any, cfg: ModelConfig) -> Mesh | None:
    """A Mesh, None, or a function of the config returning one of those (a mesh chosen from the config, e.g. its
    expert count, before the model is read) -> the Mesh or None."""
    return mesh if mesh is None or isinstance(mesh, Mesh) else mesh(cfg)
