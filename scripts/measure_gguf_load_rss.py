"""Peak host memory of loading a ~1 GB f16 glm4moe GGUF with mtp_jax.io.gguf.read_gguf (target: < 1.5x its size).

Writes a random-weight f16 GGUF (NextN layer included) of about --size-gb, then loads it in a fresh Python process
and reports that process's peak RSS (VmHWM) before and after the load:

    python scripts/measure_gguf_load_rss.py [--size-gb 1.0] [--dir /tmp] [--keep]

The loaded params are float16 like the file; mapped file pages count in RSS while a tensor is copied and are
released right after, so the peak is about the parameters plus one tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
MEASURE = """
import json, re, sys, time
import jax, numpy as np
from mtp_jax.io.gguf import read_gguf
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
jax.block_until_ready(jax.device_put(np.zeros(8)))  # backend up before the baseline
base = hwm()
t0 = time.perf_counter()
cfg, params = read_gguf(sys.argv[1])
jax.block_until_ready(params)
dt = time.perf_counter() - t0
peak = hwm()
n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "param_bytes": n, "load_seconds": dt, "dtype": cfg.dtype}))
"""


def config(size_bytes: float):
    """A glm4moe shape (64-dim heads, 32 experts, one NextN layer) with at least size_bytes of f16 weights."""
    import jax

    from mtp_jax import params as P
    from mtp_jax.families.glm4moe import Glm4MoeConfig

    def make(n_layers: int) -> Glm4MoeConfig:
        return Glm4MoeConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=n_layers, num_attention_heads=16,
                           num_key_value_heads=4, head_dim=64, intermediate_size=4096, moe_intermediate_size=512,
                           n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                           attention_bias=True, num_nextn_predict_layers=1, dtype="float16", name="rss-probe")

    def nbytes(cfg: Glm4MoeConfig) -> int:
        leaves = jax.tree.leaves(P.abstract(cfg), is_leaf=lambda x: isinstance(x, P.ArrayInfo))
        return 2 * sum(math.prod(i.shape) for i in leaves)

    n = 1
    while nbytes(make(n)) < size_bytes:
        n += 1
    return make(n)


def write_model(path: Path, size_bytes: float) -> None:
    import jax

    from mtp_jax import params as P
    from mtp_jax.io.gguf import write_gguf

    cfg = config(size_bytes)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda i: (0.02 * rng.standard_normal(i.shape, np.float32)).astype(np.float16),
                          P.abstract(cfg), is_leaf=lambda x: isinstance(x, P.ArrayInfo))
    write_gguf(path, cfg, params, outtype="f16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="approximate GGUF size in GB (default 1.0)")
    ap.add_argument("--dir", default=None, help="where to write the GGUF (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "rss-probe-f16.gguf"
        t0 = time.perf_counter()
        write_model(path, args.size_gb * 1e9)
        size = path.stat().st_size
        print(f"wrote {path} ({size / 1e9:.3f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r |= {"file_bytes": size, "peak_over_file": r["peak_rss"] / size,
              "load_increment_over_file": (r["peak_rss"] - r["baseline_rss"]) / size}
        print(json.dumps(r, indent=1))
        print(f"peak RSS {r['peak_rss'] / 1e9:.3f} GB = {r['peak_over_file']:.3f} x the file "
              f"(baseline {r['baseline_rss'] / 1e9:.3f} GB of Python + JAX; the load itself adds "
              f"{r['load_increment_over_file']:.3f} x); loaded in {r['load_seconds']:.1f} s")
        if args.keep:
            kept = Path(args.dir or ".") / path.name
            path.rename(kept)
            print(f"kept {kept}")
        return 0 if r["peak_over_file"] < 1.5 else 2


if __name__ == "__main__":
    sys.exit(main())
