"""Speed of one weight matmul x[M, K] @ W[K, N] on CPU: the kernel reading GGUF-quantized weights in place
(mtp_jax.qweight.QuantWeight through mtp_jax.linear) against the float kernel (F16/BF16/F32 weights as [N, K]
rows, the layout a GGUF's float matrices load in; --kn: also as [K, N] arrays), and, with --xla, XLA's
dequantize + dot (the path without the kernel).

Decoding at batch 1 is bound by reading the weights, so each type is timed on a stack of layers larger than the
last-level cache (--min-mb, default 96 MiB), walked one layer per matmul inside one compiled loop (as a decode
step walks the layers), and reported as GB/s of the weight's own bytes (quantized bytes for a quantized type)
and as the time per matmul. ``--hot`` also times layer 0 read over and over (cache resident when it fits: the
kernel's compute bound). Each case: the best of --repeats calls in each of --rounds rounds over all cases.
Writes benchmarks/results/qlinear_speed.json.

    python benchmarks/qlinear_speed.py [--k 2048] [--n 2048] [--m 1 4] [--types F16 Q8_0 Q4_K] [--xla] [--hot]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import kernels
from mtp_jax.linear import linear
from mtp_jax.qweight import DEQUANTIZERS, FLOAT_TYPES, QuantWeight, block
from mtp_jax.timing import best_seconds

RESULTS = Path(__file__).resolve().parent / "results"
# byte offsets of each block's f16 scales (set to sane values; every other byte of a block is random)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
              "TQ2_0": [64]}


def random_rows(qtype: str, lead: tuple[int, ...], k: int, rng: np.random.Generator) -> np.ndarray:
    """u8 [*lead, k / bs * ts]: random blocks of a ggml type with finite f16 scales."""
    bs, ts = block(qtype)
    b = rng.integers(0, 256, (*lead, k // bs, ts), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        d = (rng.standard_normal((*lead, k // bs)) * 0.01).astype(np.float16)
        b[..., o: o + 2] = d[..., None].view(np.uint8)
    return b.reshape(*lead, -1)


def weight(qtype: str, layers: int, k: int, n: int, rng: np.random.Generator, kn: bool = False):
    """(weight in the layout linear() takes with layer=i, its bytes per layer). A float type is a QuantWeight
    of [N, K] rows (as a GGUF's float matrices load for the CPU kernel), or with ``kn`` a [K, N] array."""
    if qtype in FLOAT_TYPES:
        shape = (layers, k, n) if kn else (layers, n, k)
        w = jnp.asarray((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(FLOAT_TYPES[qtype])
        nbytes = w.nbytes // layers
        return (w if kn else QuantWeight((w,), (qtype,), (layers, k, n), 1, 1)), nbytes
    rows = jnp.asarray(random_rows(qtype, (layers, n), k, rng))
    return QuantWeight((rows,), (qtype,), (layers, k, n), 1, 1), rows.nbytes // layers


def compiled_loop(w, loop: int, m: int, k: int, xla: bool, hot: bool):
    """A compiled loop of ``loop`` matmuls, one per layer of the stack (``hot``: all of layer 0); the weights are
    an argument, as a model's parameters are."""

    def run(x, w):
        def step(i, x):
            y = linear(x, w, 0 if hot else i)
            return x + 1e-30 * y.sum(-1, keepdims=True)  # a data dependence: one matmul after the other

        return jax.lax.fori_loop(0, loop, step, x)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    with kernels.disabled() if xla else contextlib.nullcontext():
        f = jax.jit(run).lower(x, w).compile()
    f(x, w).block_until_ready()
    return lambda: f(x, w).block_until_ready()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=2048, help="inputs (a multiple of 256 for the K-quants)")
    ap.add_argument("--n", type=int, default=2048, help="outputs")
    ap.add_argument("--m", type=int, nargs="+", default=[1], help="rows of x (1 = a decode step)")
    ap.add_argument("--types", nargs="+", default=["F16", "BF16", "F32", *DEQUANTIZERS])
    ap.add_argument("--min-mb", type=float, default=96, help="the stack holds at least this many MiB per type")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all the cases; each case reports its best call of all rounds (on a shared "
                         "machine, a busy moment then costs every case alike)")
    ap.add_argument("--xla", action="store_true", help="also time the XLA path (dequantize + dot) of each type")
    ap.add_argument("--kn", action="store_true",
                    help="also time the float types in the [K, N] layout (random-init / HF / orbax weights)")
    ap.add_argument("--hot", action="store_true",
                    help="also time the kernel on layer 0 read 64 times over (cache resident when it fits)")
    ap.add_argument("--out", default=str(RESULTS / "qlinear_speed.json"))
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not available here (MTP_JAX_KERNELS=0, or no compiler)")
    rng = np.random.default_rng(0)
    cases = []  # (row, call)
    types = [(t, False) for t in args.types]
    types += [(t, True) for t in args.types if t in FLOAT_TYPES and args.kn]
    for qtype, kn in types:
        per_layer = weight(qtype, 1, args.k, args.n, rng)[1]
        layers = max(1, int(np.ceil(args.min_mb * 2**20 / per_layer)))
        w, _ = weight(qtype, layers, args.k, args.n, rng, kn)
        for m in args.m:
            # XLA hoists a loop-invariant dequantization out of the loop: no hot case for it
            for mode, path in [("cold", "kernel"), ("cold", "xla"), ("hot", "kernel")]:
                if (path == "xla" and not args.xla) or (mode == "hot" and not args.hot):
                    continue
                loop = 64 if mode == "hot" else layers
                call = compiled_loop(w, loop, m, args.k, path == "xla", mode == "hot")
                cases.append(({"type": qtype + ("/kn" if kn else ""), "m": m, "mode": mode, "path": path,
                               "matmuls": loop,
                               "bytes_per_matrix": per_layer}, call))
    best = [float("inf")] * len(cases)
    for _ in range(args.rounds):
        for i, (row, call) in enumerate(cases):
            best[i] = min(best[i], best_seconds(call, args.repeats) / row["matmuls"])
    rows = []
    for (row, _), s in zip(cases, best):
        row = {**row, "us_per_matmul": s * 1e6, "gb_s": row["bytes_per_matrix"] / s / 1e9,
               "gvalues_s": args.k * args.n / s / 1e9}
        rows.append(row)
        print(f"{row['type']:8s} M={row['m']:<3d} {row['mode']:4s} {row['path']:6s} {s * 1e6:9.1f} us  "
              f"{row['gb_s']:7.2f} GB/s  {row['gvalues_s']:6.2f} Gvalues/s")
    meta = {"k": args.k, "n": args.n, "min_mb": args.min_mb, "repeats": args.repeats, "rounds": args.rounds,
            "jax": jax.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": _cpu_name(), "threads": os.environ.get("MTP_JAX_THREADS", "all")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
