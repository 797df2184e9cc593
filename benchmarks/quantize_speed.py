"""Host quantizer speed: ours (NumPy) vs libggml's single-threaded ggml_quantize_chunk, side by side; with
--file, whole-file quantization: ``mtp-jax quantize`` vs llama-quantize on one GGUF.

For each type, quantizes one rows x cols float32 tensor (with an imatrix; types that ignore it get it too)
and prints MB/s of f32 input for both (best of --repeats), their ratio, and whether the bytes are identical.
Both run single-threaded in this process; MB/s is given for wall time and for process CPU time (the
latter is steadier on a shared machine; the ratio column uses it). Writes
benchmarks/results/quantize_speed.json and a bar chart of the ratios beside it (.png, needs matplotlib).
Needs libggml-base.so (tests/quant/ggml_oracle.py).

    python benchmarks/quantize_speed.py [--types Q4_K Q6_K ...] [--rows 4096] [--cols 4096] [--repeats 3]

Whole-file mode: each FTYPE at each thread count, ours (``mtp-jax quantize IN OUT FTYPE N``) and
llama-quantize (``llama-quantize IN OUT FTYPE N``, built by ../shared/tools/build-llama-cpp.sh) run one
after the other as subprocesses on the same file, same options (--imatrix for every FTYPE when given).
For each: wall time, CPU time (user + sys of the process and its children, from wait4), peak RSS as
wait4's ru_maxrss (the largest single process: what /usr/bin/time -v reports) and the peak of the sum of
RSS and of PSS over the process tree (sampled from /proc every 50 ms; PSS shares pages between processes
fairly, so it is the memory a multi-process run really holds), and whether the two outputs are the same
bytes. Writes benchmarks/results/quantize_file.json and a plot beside it (.png, needs matplotlib).

    python benchmarks/quantize_speed.py --file model.gguf --ftypes Q4_K_M Q6_K IQ4_XS [--imatrix X]
        [--threads 1 2] [--repeats 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtp_jax.quant.registry import quantize, registered
from mtp_jax.quant.stream import tune_malloc

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


# --- whole files ---------------------------------------------------------------------------------------------


def _proc_kb(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat's parent ids)."""
    parent: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parent.get(p, [])
    return out


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.05) -> dict:
    """Run cmd; wall and CPU seconds, ru_maxrss, and the sampled peak RSS / PSS sums of its process tree (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = tempfile.TemporaryFile()
    drain = threading.Thread(target=lambda: err.write(proc.stderr.read()), daemon=True)
    drain.start()
    peak_rss = peak_pss = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        pids = _tree(proc.pid)
        peak_rss = max(peak_rss, sum(_proc_kb(p, "status", "VmRSS:") for p in pids))
        peak_pss = max(peak_pss, sum(_proc_kb(p, "smaps_rollup", "Pss:") for p in pids))
        time.sleep(interval)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    drain.join()
    err.seek(0)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_MiB": ru.ru_maxrss / 1024,
            "peak_rss_sum_MiB": peak_rss / 1024, "peak_pss_sum_MiB": peak_pss / 1024}


def plot_files(rows: list[dict], path: Path, title: str) -> None:
    """Wall time and peak memory (PSS sum), ours beside llama-quantize's, per FTYPE and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['ftype']}\n{r['threads']} thr" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows)), 3.8))
    for ax, key, unit in [(axes[0], "wall_s", "wall time (s)"),
                          (axes[1], "peak_pss_sum_MiB", "peak PSS, all processes (MiB)")]:
        ax.bar(x - 0.2, [r["ours"][key] for r in rows], 0.4, label="mtp-jax quantize", color="tab:blue")
        ax.bar(x + 0.2, [r["llama"][key] for r in rows], 0.4, label="llama-quantize", color="tab:gray")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(unit)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def file_mode(args: argparse.Namespace) -> None:
    from mtp_jax.llama_cpp import bin_dir

    llama = bin_dir() / "llama-quantize"
    if not llama.exists():
        sys.exit(f"{llama} not found (run ../shared/tools/build-llama-cpp.sh)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ours = [sys.executable, "-c", "import sys; from mtp_jax.cli import main; sys.exit(main())", "quantize"]
    im = ["--imatrix", str(args.imatrix)] if args.imatrix else []
    size = args.file.stat().st_size
    workdir = Path(tempfile.mkdtemp(prefix="quantize-bench-", dir=args.workdir))
    print(f"{args.file} ({size / 1e6:.0f} MB){', imatrix ' + str(args.imatrix) if args.imatrix else ''}; "
          f"best of {args.repeats}; outputs in {workdir}")
    print(f"{'ftype':8s} {'thr':>3s} {'ours s':>7s} {'llama s':>7s} {'ratio':>6s} {'ours cpu':>8s} "
          f"{'llama cpu':>9s} {'ours RSS':>8s} {'llama RSS':>9s} {'ours PSS':>8s} {'llama PSS':>9s}  same bytes")
    rows = []
    try:
        for ftype in args.ftypes:
            for n in args.threads:
                a, b = workdir / f"ours-{ftype}.gguf", workdir / f"llama-{ftype}.gguf"
                runs = {"llama": [], "ours": []}
                for _ in range(args.repeats):  # llama first: it also warms the page cache for both
                    runs["llama"].append(measure([str(llama), *im, str(args.file), str(b), ftype, str(n)]))
                    runs["ours"].append(measure([*ours, *im, str(args.file), str(a), ftype, str(n)], env))
                best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
                same = filecmp.cmp(a, b, shallow=False)
                a.unlink()
                b.unlink()
                r = {"ftype": ftype, "threads": n, **best, "identical": same,
                     "ratio_wall": best["llama"]["wall_s"] / best["ours"]["wall_s"],
                     "ratio_peak_pss": best["ours"]["peak_pss_sum_MiB"] / best["llama"]["peak_pss_sum_MiB"]}
                rows.append(r)
                o, ll = r["ours"], r["llama"]
                print(f"{ftype:8s} {n:3d} {o['wall_s']:7.1f} {ll['wall_s']:7.1f} {r['ratio_wall']:5.2f}x "
                      f"{o['cpu_s']:8.1f} {ll['cpu_s']:9.1f} {o['maxrss_MiB']:8.0f} {ll['maxrss_MiB']:9.0f} "
                      f"{o['peak_pss_sum_MiB']:8.0f} {ll['peak_pss_sum_MiB']:9.0f}  {same}", flush=True)
    finally:
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()
    meta = {
        "file": str(args.file), "file_MB": size / 1e6, "imatrix": str(args.imatrix) if args.imatrix else None,
        "repeats": args.repeats, "python": platform.python_version(), "numpy": np.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "llama_quantize": str(llama),
        "columns": "wall_s, cpu_s (user+sys incl. children, wait4), maxrss_MiB (wait4 ru_maxrss: largest single "
                   "process), peak_rss_sum_MiB / peak_pss_sum_MiB (sum over the process tree, sampled every 50 ms); "
                   "ratio_wall = llama / ours (> 1: ours faster); ratio_peak_pss = ours / llama",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    try:
        plot_files(rows, args.out.with_suffix(".png"), f"{args.file.name} ({size / 1e6:.0f} MB): mtp-jax quantize "
                   f"vs llama-quantize{', imatrix' if args.imatrix else ''}")
        print(f"wrote {args.out.with_suffix('.png')}")
    except ImportError:
        print("matplotlib not installed: no plot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", help="ggml type names (default: every registered type)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=None, help="best of N (default 3; whole files: 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/quantize_speed.json, with --file quantize_file.json)")
    ap.add_argument("--file", type=Path, help="whole-file mode: the GGUF to quantize")
    ap.add_argument("--ftypes", nargs="+", default=["Q4_K_M", "Q6_K", "IQ4_XS"], help="whole-file mode: file types")
    ap.add_argument("--imatrix", type=Path, help="whole-file mode: importance matrix, for every FTYPE")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="whole-file mode: thread counts")
    ap.add_argument("--workdir", type=Path, help="whole-file mode: where outputs go (default: the temp dir)")
    args = ap.parse_args()
    if args.file is not None:
        args.repeats = args.repeats or 1
        args.out = args.out or RESULTS / "quantize_file.json"
        file_mode(args)
        return
    args.repeats = args.repeats or 3
    args.out = args.out or RESULTS / "quantize_speed.json"
    tune_malloc()  # as the quantize command runs (mtp_jax.quant.stream)
    from tests.quant.ggml_oracle import ggml_lib_path, ggml_quantize

    names = args.types or sorted(t.name for t in registered())
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
