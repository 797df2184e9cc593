"""Plan a model on a device mesh without allocating it: lower and compile the speculative loop ahead of time on
fake devices and read XLA's memory analysis.

``make_plan(cfg, mesh, batch, ctx, ...)`` builds every input of ``speculative._spec_loop`` as a
``jax.ShapeDtypeStruct`` carrying its ``NamedSharding`` (weights by their logical axes and ``sharding.RULES``,
KV caches with rows on ``data`` and KV heads on ``model``), compiles the loop (XLA's dots, not the CPU
kernels: the plan is for accelerators) and reports per-device bytes of weights, caches and temporaries, the
collectives the partitioned program runs, and which named devices it fits. Nothing the size of the model is
ever allocated, so a 671 B model plans on a laptop.

XLA:CPU has no 16-bit dots: it converts every bf16/f16 weight stack to an f32 temporary (the buffer assignment
of a bf16 GLM-4.5-Air plan showed 80 GB of such copies against 4.4 GB of real temporaries). So the loop is
compiled in float32: weights and caches are reported at the config's dtype (the per-leaf shard sizes, which XLA's
float32 argument bytes confirm at twice the size), temporaries as XLA computes them in float32, an upper bound
for the 16-bit activations an accelerator keeps.
"""

from __future__ import annotations

import collections
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax import drafter, kernels, sharding
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import KVCache
from mtp_jax.sampling import Sampling

# name -> (label, bytes of device memory)
DEVICES = {"h100": ("H100 80 GB", 80e9), "h200": ("H200 141 GB", 141e9), "v5p": ("TPU v5p 95 GB", 95e9),
           "v5e": ("TPU v5e 16 GB", 16e9)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass
class Plan:
    config: str
    devices: int
    mesh: dict[str, int]
    batch: int
    ctx: int
    prompt: int
    num_draft: int
    dtype: str
    weight_bytes: int  # per device at ``dtype``, from the shardings (the largest shard of each leaf)
    weight_bytes_total: int  # unsharded
    kv_bytes: int  # per device at ``dtype``: trunk cache
    kv_bytes_draft: int  # per device: the drafter's cache
    compiled_dtype: str  # what XLA compiled (float32: see the module docstring)
    argument_bytes: int  # XLA memory analysis, per device, at compiled_dtype
    output_bytes: int
    temp_bytes: int  # XLA memory analysis at compiled_dtype
    compile_seconds: float
    collectives: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Weights and caches at ``dtype`` (donated caches alias their outputs) plus temporaries."""
        return self.weight_bytes + self.kv_bytes + self.kv_bytes_draft + self.temp_bytes

    def fits(self) -> dict[str, bool]:
        return {label: self.total_bytes <= cap for label, cap in DEVICES.values()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total_bytes": self.total_bytes, "fits": self.fits()}


def _shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec, mesh: Mesh) -> int:
    parts = [1 if a is None else mesh.shape[a] for a in spec] + [1] * (len(shape) - len(spec))
    return math.prod(-(-d // p) for d, p in zip(shape, parts)) * jnp.dtype(dtype).itemsize


def _abstract(shape, dtype, mesh: Mesh, spec: PartitionSpec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> tuple[Any, int, int]:
    """(Params of sharded ShapeDtypeStructs, per-device bytes, total bytes)."""
    infos = P.abstract(cfg)
    dt = jnp.dtype(cfg.dtype)
    per, total = [0], [0]

    def leaf(i: P.ArrayInfo) -> jax.ShapeDtypeStruct:
        spec = sharding.spec_for(i.shape, i.axes, mesh)
        per[0] += _shard_bytes(i.shape, dt, spec, mesh)
        total[0] += math.prod(i.shape) * dt.itemsize
        return _abstract(i.shape, dt, mesh, spec)

    tree = jax.tree.map(leaf, infos, is_leaf=lambda x: isinstance(x, P.ArrayInfo))
    return tree, per[0], total[0]


def abstract_cache(cache: KVCache, mesh: Mesh) -> tuple[KVCache, int]:
    """A cache's leaves as sharded ShapeDtypeStructs: [L, B, S, heads, dims] with rows on data, heads on model
    (a quantized stack's blocks and scales alike)."""
    per = [0]

    def leaf(x):
        spec = sharding.spec_for(x.shape, sharding.CACHE_AXES, mesh)
        per[0] += _shard_bytes(x.shape, x.dtype, spec, mesh)
        return _abstract(x.shape, x.dtype, mesh, spec)

    lengths = _abstract(cache.lengths.shape, cache.lengths.dtype, mesh,
                        sharding.spec_for(cache.lengths.shape, ("batch",), mesh))
    return KVCache(jax.tree.map(leaf, cache.k), jax.tree.map(leaf, cache.v), lengths), per[0]


def make_plan(cfg: ModelConfig, mesh_sizes: dict[str, int], batch: int = 1, ctx: int = 4096, prompt: int = 512,
              num_draft: int = 3, name: str | None = None) -> Plan:
    """Compile the speculative loop for ``cfg`` on a mesh of the first prod(mesh_sizes) devices."""
    from mtp_jax import generate as plain  # noqa: PLC0415
    from mtp_jax import kvcache, speculative  # noqa: PLC0415

    n = math.prod(mesh_sizes.values())
    if n > len(jax.devices()):
        raise ValueError(f"the mesh needs {n} devices, {len(jax.devices())} are visible "
                         f"(mtp-jax plan --devices {n} makes fake CPU devices)")
    if not 0 < prompt < ctx:
        raise ValueError(f"--prompt {prompt} must be in [1, --ctx {ctx})")
    if not cfg.has_mtp:
        raise ValueError(f"{name or cfg.name}: the config has no NextN layer; nothing to draft with")
    mesh = sharding.make_mesh(**mesh_sizes)
    K = num_draft
    target = cfg.dtype
    scale = jnp.dtype(target).itemsize / 4  # shard sizes scale exactly with the element size
    cfg = cfg.replace(dtype="float32")
    with kernels.disabled():
        params, w_per, w_total = abstract_params(cfg, mesh)
        trunk, kv = abstract_cache(jax.eval_shape(lambda: kvcache.init_trunk_cache(cfg, batch, ctx)), mesh)
        draft, kv_d = abstract_cache(jax.eval_shape(lambda: drafter.of(cfg).init_cache(batch, ctx)), mesh)
        rows = lambda shape, dt: _abstract(shape, dt, mesh, sharding.spec_for(shape, ("batch",), mesh))  # noqa: E731
        rep = lambda x: _abstract(x.shape, x.dtype, mesh, PartitionSpec())  # noqa: E731
        stops = np.asarray(plain.stop_array(cfg, None, None))
        args = (params, rows((batch, prompt), jnp.int32), rows((batch,), jnp.int32), trunk, draft,
                rep(jax.eval_shape(lambda: jax.random.key(0))), rows((batch,), jnp.int32),
                rep(jax.ShapeDtypeStruct(stops.shape, stops.dtype)), rep(jax.ShapeDtypeStruct((2, K + 2), jnp.float32)),
                (rep(jax.ShapeDtypeStruct((K,), jnp.int32)),) * 2)
        c = speculative._Static(cfg, Sampling(), K, ctx - prompt - K - 1, False, False)
        t0 = time.perf_counter()
        compiled = speculative._spec_loop.lower(*args, c=c).compile()
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    coll = collections.Counter(m for m in re.findall(r"= [^=]*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", text))
    return Plan(config=name or cfg.name, devices=n, mesh=mesh_sizes, batch=batch, ctx=ctx, prompt=prompt,
                num_draft=K, dtype=target, weight_bytes=round(w_per * scale), weight_bytes_total=round(w_total * scale),
                kv_bytes=round(kv * scale), kv_bytes_draft=round(kv_d * scale), compiled_dtype=cfg.dtype,
                argument_bytes=int(mem.argument_size_in_bytes),
                output_bytes=int(mem.output_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                compile_seconds=round(seconds, 1), collectives=dict(coll))


def describe(p: Plan) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    fits = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in p.fits().items())
    coll = ", ".join(f"{k} x{v}" for k, v in sorted(p.collectives.items())) or "none"
    return "\n".join([
        f"{p.config} on {p.devices} devices (mesh {mesh}), batch {p.batch}, context {p.ctx}, prompt {p.prompt}, "
        f"K={p.num_draft}, {p.dtype}; compiled in {p.compile_seconds} s",
        f"  per device: weights {gb(p.weight_bytes)} (of {gb(p.weight_bytes_total)}), KV cache {gb(p.kv_bytes)} "
        f"+ MTP {gb(p.kv_bytes_draft)}, temporaries {gb(p.temp_bytes)} (XLA, {p.compiled_dtype}), "
        f"total {gb(p.total_bytes)}",
        f"  collectives: {coll}",
        f"  fits: {fits}",
    ])
