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

``weights="Q4_K"`` (``mtp-jax plan --weights q4_k``) plans the model as llama-quantize --pure would quantize it:
its matrices and tables are QuantWeights of GGUF rows [*lead, N, row_bytes] uint8 (qweight.pure_types, row-size
fallbacks included), split along the experts and the output rows only (sharding.quant_spec) and dequantized next
to each dot in the compiled loop; they count at their bytes. ``cache_types`` (kvquant.KVTypes, generate's
--cache-type-*) pick the caches' types; a block type counts at its bytes too.
"""

from __future__ import annotations

import collections
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax import drafter, kernels, qweight, sharding
from mtp_jax import params as P
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.kvquant import KVTypes
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
    weights: str  # the weight matrices' type: a ggml block type (``weights``) or ``dtype``
    kv_types: dict[str, str]  # trunk k, v and MTP k_draft, v_draft cache types (kvquant's names, else ``dtype``)
    weight_bytes: int  # per device (floats at ``dtype``), from the shardings (the largest shard of each leaf)
    weight_bytes_total: int  # unsharded
    weight_types: dict[str, int]  # unsharded bytes per storage type (ggml types, ``dtype`` for the float leaves)
    kv_bytes: int  # per device (floats at ``dtype``): trunk cache
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


def abstract_params(cfg: ModelConfig, mesh: Mesh, weights: str | None = None) -> tuple[Any, int, dict[str, int]]:
    """(Params of sharded ShapeDtypeStructs, per-device bytes, unsharded bytes per storage type). ``weights`` (a
    ggml type, "Q4_K"): the leaves qweight.pure_types picks are abstract QuantWeights of their GGUF rows."""
    infos = P.abstract(cfg)
    kept = qweight.pure_types(cfg, infos, weights) if weights else {}
    per, total = [0], collections.Counter()

    def count(shape, dtype, spec: PartitionSpec, kind: str) -> jax.ShapeDtypeStruct:
        per[0] += _shard_bytes(shape, dtype, spec, mesh)
        total[kind] += math.prod(shape) * jnp.dtype(dtype).itemsize
        return _abstract(shape, dtype, mesh, spec)

    def leaf(path: tuple, i: P.ArrayInfo) -> Any:
        if path not in kept:
            return count(i.shape, cfg.dtype, sharding.spec_for(i.shape, i.axes, mesh), cfg.dtype)
        qtype, n_lead, n_in = kept[path]
        rows = jax.ShapeDtypeStruct(qweight.rows_shape(i.shape, n_lead, n_in, qtype), jnp.uint8)  # [*lead, N, bytes]
        w = qweight.QuantWeight((rows,), (qtype,), i.shape, n_lead, n_in)
        return replace(w, groups=(count(rows.shape, jnp.uint8, sharding.quant_spec(w, i.axes, mesh), qtype),))

    params = tree.build(infos, [leaf(p, tree.get(infos, p)) for p in tree.leaf_paths(infos)])
    return params, per[0], dict(total.most_common())


def abstract_cache(state: Any, mesh: Mesh) -> tuple[Any, int]:
    """A decoding state (a KVCache, a drafter's state such as Step-3.5's ChainState) as sharded ShapeDtypeStructs
    placed as sharding.place_rows places them at run time: KV stacks [L, B, S, heads, dims] with rows on data and
    heads on model (a quantized stack's blocks and scales alike), every other leaf with its rows on data; and its
    bytes per device."""
    per = [0]

    def leaf(x):
        axes = sharding.CACHE_AXES if x.ndim == 5 else (("batch",) + (None,) * x.ndim)[: x.ndim]
        spec = sharding.spec_for(x.shape, axes, mesh)
        per[0] += _shard_bytes(x.shape, x.dtype, spec, mesh)
        return _abstract(x.shape, x.dtype, mesh, spec)

    return jax.tree.map(leaf, state), per[0]


def weight_type(text: str | None) -> str | None:
    """--weights: a ggml block type the compiled graph dequantizes, any case ("q4_k") -> its name ("Q4_K")."""
    if text is not None and text.upper() not in qweight.DEQUANTIZERS:
        raise ValueError(f"--weights {text}: expected one of {', '.join(t.lower() for t in qweight.DEQUANTIZERS)}")
    return None if text is None else text.upper()


def make_plan(cfg: ModelConfig, mesh_sizes: dict[str, int], batch: int = 1, ctx: int = 4096, prompt: int = 512,
              num_draft: int = 3, name: str | None = None, weights: str | None = None,
              cache_types: KVTypes = KVTypes()) -> Plan:
    """Compile the speculative loop for ``cfg`` on a mesh of the first prod(mesh_sizes) devices; ``weights``: a
    ggml block type (``weight_type``) for the matrices llama-quantize --pure would quantize, None: ``cfg.dtype``."""
    from mtp_jax import generate as plain  # noqa: PLC0415
    from mtp_jax import kvcache, speculative  # noqa: PLC0415

    weights = weight_type(weights)
    n = math.prod(mesh_sizes.values())
    if n > len(jax.devices()):
        raise ValueError(f"the mesh needs {n} devices, {len(jax.devices())} are visible "
                         f"(mtp-jax plan --devices {n} makes fake CPU devices)")
    if not 0 < prompt < ctx:
        raise ValueError(f"--prompt {prompt} must be in [1, --ctx {ctx})")
    if not cfg.has_mtp:
        raise ValueError(f"{name or cfg.name}: the config has no NextN layer; nothing to draft with")
    mesh = sharding.make_mesh(**mesh_sizes)
    K, ct = num_draft, cache_types
    target = cfg  # bytes are counted at its dtype, the loop compiled in float32 (module docstring)
    cfg = cfg.replace(dtype="float32")

    def caches(c: ModelConfig) -> tuple[Any, Any]:  # the trunk's and the drafter's, abstract
        return (jax.eval_shape(lambda: kvcache.init_trunk_cache(c, batch, ctx, ct.k, ct.v)),
                jax.eval_shape(lambda: drafter.of(c).init_cache(batch, ctx, ct.k_draft, ct.v_draft)))

    with kernels.disabled():
        params = abstract_params(cfg, mesh, weights)[0]
        trunk, draft = (abstract_cache(x, mesh)[0] for x in caches(cfg))
        _, w_per, w_types = abstract_params(target, mesh, weights)
        kv, kv_d = (abstract_cache(x, mesh)[1] for x in caches(target))
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
                num_draft=K, dtype=target.dtype, weights=weights or target.dtype,
                kv_types={k: t or target.dtype for k, t in asdict(ct).items()}, weight_bytes=w_per,
                weight_bytes_total=sum(w_types.values()), weight_types=w_types, kv_bytes=kv, kv_bytes_draft=kv_d,
                compiled_dtype=cfg.dtype,
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
        f"  weights {p.weights} ({', '.join(f'{t} {gb(b)}' for t, b in p.weight_types.items())}), KV cache "
        + ", ".join(f"{k} {t}" for k, t in p.kv_types.items()),
        f"  per device: weights {gb(p.weight_bytes)} (of {gb(p.weight_bytes_total)}), KV cache {gb(p.kv_bytes)} "
        f"+ MTP {gb(p.kv_bytes_draft)}, temporaries {gb(p.temp_bytes)} (XLA, {p.compiled_dtype}), "
        f"total {gb(p.total_bytes)}",
        f"  collectives: {coll}",
        f"  fits: {fits}",
    ])
