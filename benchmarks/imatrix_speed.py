"""imatrix collection speed: ours with and without the MTP head, and llama-imatrix, on one model and text.

The three runs use the same GGUF, the same text, the same chunk size and chunk count. Ours is timed after a
warm-up (the first call compiles); llama-imatrix is timed as a whole process (model load included) and also by
the "seconds per pass" it logs. The MTP pass should cost about one extra decoder block per trunk pass, i.e.
~1/n_layer (plus the head's share of the output projection). Writes benchmarks/results/imatrix_speed.json.

    python benchmarks/imatrix_speed.py [--model M.gguf] [--chunk-size 256] [--chunks 8] [--batch 1]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import jax

from mtp_jax import imatrix as IM
from mtp_jax import llama_cpp
from mtp_jax.cli import default_model
from mtp_jax.io.load import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def stdlib_text(min_chars: int) -> str:
    """Python standard-library source, present on every machine."""
    import argparse as a, collections, email.message, json.decoder, logging, pathlib, shutil, subprocess as s  # noqa
    mods = [a, collections, email.message, json.decoder, logging, pathlib, shutil, s]
    text = "".join(inspect.getsource(m) for m in mods)
    return (text * (min_chars // len(text) + 1))[:min_chars]


def time_ours(params, cfg, chunks, mtp: bool, batch: int) -> dict:
    IM.Collector(params, cfg, mtp=mtp, batch=batch).add(chunks[:batch])  # compile
    col = IM.Collector(params, cfg, mtp=mtp, batch=batch)
    t0 = time.perf_counter()
    col.add(chunks)
    dt = time.perf_counter() - t0
    n = chunks.size
    return {"seconds": dt, "tok_s": n / dt, "perplexity": col.perplexity, "tensors": len(col.sums)}


def time_llama(model: str, text_file: Path, chunk: int, n_chunks: int, threads: int) -> dict | None:
    exe = llama_cpp.bin_dir() / "llama-imatrix"
    if not exe.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([str(exe), "-m", model, "-f", str(text_file), "-o", f"{d}/i.gguf", "-c", str(chunk),
                            "-b", str(chunk), "--chunks", str(n_chunks), "-t", str(threads), "--no-ppl",
                            "--no-repack"], capture_output=True, text=True, timeout=1800)
        dt = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"llama-imatrix failed: {p.stderr[-2000:]}")
    per_pass = re.search(r"([0-9.]+) seconds per pass", p.stderr)
    n = chunk * n_chunks
    out = {"seconds_process": dt, "tok_s_process": n / dt}
    if per_pass:
        out["seconds_per_pass"] = float(per_pass.group(1))
        out["tok_s_per_pass"] = chunk / float(per_pass.group(1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF with a tokenizer (default: the embedded model)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama-imatrix threads (default 1: on busy cores its OpenMP workers spin, and 2 threads "
                         "run a small model far slower than 1)")
    ap.add_argument("--out", default=str(RESULTS / "imatrix_speed.json"))
    args = ap.parse_args(argv)
    model = args.model or default_model()
    if not str(model).endswith(".gguf"):
        raise SystemExit("this benchmark needs a GGUF model (the embedded model or --model)")
    cfg, params, tok = load_model(model)
    text = stdlib_text(args.chunk_size * (args.chunks + 1) * 8)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    bos = tok.bos_id if tok.add_bos else None
    chunks = IM.make_chunks(tok.encode(text, add_special=True), args.chunk_size, bos, args.chunks)
    rows = {"ours_trunk": time_ours(params, cfg, chunks, False, args.batch),
            "ours_mtp": time_ours(params, cfg, chunks, True, args.batch),
            "llama_imatrix": time_llama(model, Path(f.name), args.chunk_size, len(chunks), args.threads)}
    Path(f.name).unlink()
    mtp_cost = rows["ours_mtp"]["seconds"] / rows["ours_trunk"]["seconds"] - 1
    print(f"{len(chunks)} chunks x {args.chunk_size} tokens, batch {args.batch}, {cfg.name} "
          f"({cfg.num_hidden_layers} trunk layers + {cfg.num_nextn_predict_layers} NextN)")
    print(f"  ours, trunk only : {rows['ours_trunk']['tok_s']:9.0f} tok/s  ({rows['ours_trunk']['tensors']} tensors)")
    print(f"  ours, with MTP   : {rows['ours_mtp']['tok_s']:9.0f} tok/s  ({rows['ours_mtp']['tensors']} tensors); "
          f"MTP pass costs {100 * mtp_cost:.1f}% (1/n_layer = {100 / cfg.num_hidden_layers:.1f}%)")
    if rows["llama_imatrix"]:
        li = rows["llama_imatrix"]
        print(f"  llama-imatrix    : {li['tok_s_process']:9.0f} tok/s whole process"
              + (f", {li['tok_s_per_pass']:.0f} tok/s by its first pass" if "tok_s_per_pass" in li else "")
              + f"; ours(MTP) / llama = {rows['ours_mtp']['tok_s'] / li['tok_s_process']:.2f}x")
    meta = dict(model=str(model), chunk_size=args.chunk_size, chunks=len(chunks), batch=args.batch,
                device=str(jax.devices()[0]), platform=platform.platform(), mtp_extra_cost=mtp_cost)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
