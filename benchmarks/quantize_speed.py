"""Host quantizer speed: ours (NumPy) vs libggml's single-threaded ggml_quantize_chunk, side by side.

For each type, quantizes one rows x cols float32 tensor (with an imatrix; types that ignore it get it too)
and prints MB/s of f32 input for both (best of --repeats), their ratio, and whether the bytes are identical.
Both run single-threaded in this process; MB/s is given for wall time and for process CPU time (the
latter is steadier on a shared machine; the ratio column uses it). Writes
benchmarks/results/quantize_speed.json and a bar chart of the ratios beside it (.png, needs matplotlib).
Needs libggml-base.so (tests/quant/ggml_oracle.py).

    python benchmarks/quantize_speed.py [--types Q4_K Q6_K ...] [--rows 4096] [--cols 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtp_jax.quant.base import REGISTRY
from mtp_jax.quant.registry import quantize
from tests.quant.ggml_oracle import ggml_lib_path, ggml_quantize

RESULTS = ROOT / "benchmarks" / "results"


def best_time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """(best wall seconds, best CPU seconds, last output) over ``repeats`` calls."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of ggml CPU time / ours per type (> 1: ours faster), a line at parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["type"] for r in rows]
    ratios = [r["ratio_cpu"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 3.6))
    ax.bar(names, ratios, color=["tab:green" if v >= 1 else "tab:gray" for v in ratios])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("libggml CPU time / ours")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", help="ggml type names (default: every registered type)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "quantize_speed.json")
    args = ap.parse_args()

    names = args.types or sorted(t.name for t in REGISTRY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)) * np.exp(0.5 * rng.standard_normal((args.rows, 1)))
    x = x.astype(np.float32)
    imatrix = rng.gamma(0.7, 2.0, args.cols).astype(np.float32)
    mb = x.nbytes / 1e6

    print(f"tensor {args.rows}x{args.cols} f32 ({mb:.1f} MB), imatrix, best of {args.repeats}; lib {ggml_lib_path()}")
    print(
        f"{'type':8s} {'ours MB/s':>10s} {'ggml MB/s':>10s} {'ours cpu':>10s} {'ggml cpu':>10s} {'ratio':>7s}  bit-exact"
    )
    rows = []
    for name in names:
        qtype = GGMLQuantizationType[name]
        w_ours, c_ours, ours = best_time(lambda q=qtype: quantize(x, q, imatrix), args.repeats)
        w_ggml, c_ggml, ref = best_time(lambda q=qtype: ggml_quantize(x, q, imatrix), args.repeats)
        r = {
            "type": name,
            "ours_wall_s": w_ours,
            "ggml_wall_s": w_ggml,
            "ours_cpu_s": c_ours,
            "ggml_cpu_s": c_ggml,
            "ours_MBps": mb / w_ours,
            "ggml_MBps": mb / w_ggml,
            "ours_cpu_MBps": mb / c_ours,
            "ggml_cpu_MBps": mb / c_ggml,
            "ratio_cpu": c_ggml / c_ours,
            "ratio_wall": w_ggml / w_ours,
            "bit_exact": bool(np.array_equal(ours, ref)),
        }
        rows.append(r)
        print(
            f"{name:8s} {r['ours_MBps']:10.1f} {r['ggml_MBps']:10.1f} {r['ours_cpu_MBps']:10.1f} "
            f"{r['ggml_cpu_MBps']:10.1f} {r['ratio_cpu']:6.2f}x  {r['bit_exact']}",
            flush=True,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "shape": [args.rows, args.cols],
        "imatrix": True,
        "repeats": args.repeats,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "ggml": "libggml-base.so ggml_quantize_chunk, one thread",
        "ratio": "ggml time / ours time (> 1: ours faster)",
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    try:
        plot(rows, args.out.with_suffix(".png"), f"NumPy quantizer vs libggml, {args.rows}x{args.cols}, imatrix, 1 thread")
        print(f"wrote {args.out.with_suffix('.png')}")
    except ImportError:  # matplotlib is in the bench extra
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
