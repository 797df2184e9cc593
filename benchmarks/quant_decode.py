"""Decoding with quantized weights and quantized KV caches: speed, acceptance and quality on one model, one run.

The table of the seed PR (llama.cpp's Gemma-4 MTP + TurboQuant page), for our engine: weights {F16, Q8_0, Q4_K_S,
IQ4_XS} (kept in their GGUF blocks, mtp_jax/qweight.py) x trunk KV {f16, q8_0, q4_0, turbo4, turbo3} (K and V
alike, mtp_jax/kvquant.py) x MTP-head KV {the trunk's, q4_0}. For each combination:

* plain and MTP (K = 1, 2, 3) tokens/s (compiled, warm, best of --repeats, greedy, batch 1), speedup over plain
  with the same weights and trunk cache, mean accepted drafts per step;
* perplexity of the weights + trunk KV over --text (llama-perplexity's chunking, mtp_jax/perplexity.py; the
  prompt's tokens are written through the quantized cache and read back, as llama.cpp does) and the mean KL
  divergence from F16 weights with an f32 cache;
* device bytes of the weights (the arrays as loaded) and of the trunk and head caches for --ctx tokens.

The quantized GGUFs are made from the F16 model by our quantizer (byte-identical to llama-quantize) into --work.
Writes benchmarks/results/quant_decode.json and, with matplotlib, quant_decode.png.

    python benchmarks/quant_decode.py [--model F16.gguf] [--weights F16 Q8_0 ...] [--kv f16 q4_0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = ["F16", "Q8_0", "Q4_K_S", "IQ4_XS"]
KV = ["f16", "q8_0", "q4_0", "turbo4", "turbo3"]


def model_files(src: Path, work: Path, weights: list[str]) -> dict[str, Path]:
    import logging

    from mtp_jax.quant.gguf_quantize import quantize_gguf

    logging.getLogger("mtp_jax.quant").setLevel(logging.ERROR)  # llama-quantize's fallback notes for small rows

    out = {}
    for w in weights:
        if w == "F16":
            out[w] = src
            continue
        out[w] = work / f"{src.stem}-{w}.gguf"
        if not out[w].exists():
            quantize_gguf(src, out[w], w, threads=os.cpu_count(), progress=False)
    return out


def tree_bytes(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_bytes(cfg, ctx: int, kt) -> dict[str, int]:
    """Bytes of the trunk's and the head's caches for one row of ``ctx`` slots (shapes only, nothing allocated)."""
    import jax

    from mtp_jax import drafter
    from mtp_jax.kvcache import init_trunk_cache

    trunk = jax.eval_shape(lambda: init_trunk_cache(cfg, 1, ctx, kt.k, kt.v))
    head = jax.eval_shape(lambda: drafter.of(cfg).init_cache(1, ctx, kt.k_draft, kt.v_draft))
    return {"trunk": tree_bytes(trunk), "head": tree_bytes(head)}


def quality(cfg, params, chunks, kt, base_file: Path | None, save: Path | None) -> dict:
    from mtp_jax import perplexity as PP

    base = PP.read_logits_file(base_file, cfg.vocab_size) if base_file else None
    out = open(save, "wb") if save else None
    if out:
        PP.write_header(out, cfg.vocab_size, chunks)
    nll, terms = [], []
    for score in PP.evaluate(cfg, params, chunks, n_seq=len(chunks), save=out is not None, base=base,
                             cache_types=kt):
        nll.append(score.nll)
        if out:
            out.write(score.rows.tobytes())
        if base is not None:
            terms.append(score.kld)
    if out:
        out.close()
    ppl, err = PP.ppl_estimate(np.concatenate(nll))
    res = {"ppl": ppl, "ppl_err": err}
    if terms:
        s = PP.kld_statistics({k: np.concatenate([t[k] for t in terms]) for k in terms[0]})
        res |= {"kld": s["kld"], "kld_err": s["kld_err"], "same_top": s["same_top"]}
    return res


def decode_plain(params, cfg, ids, kt, max_new: int, repeats: int):
    from mtp_jax import generate as plain

    return plain.best_of(lambda: plain.generate(params, cfg, [ids], max_new_tokens=max_new, eos_ids=[],
                                                cache_types=kt), repeats)


def decode(params, cfg, ids, kt, ks, max_new: int, repeats: int, base) -> dict:
    """MTP at each K against ``base`` (the plain run with the same weights and trunk cache)."""
    from mtp_jax import generate as plain
    from mtp_jax import speculative

    common = dict(max_new_tokens=max_new, eos_ids=[], cache_types=kt)
    row = {"plain_tok_s": base.num_tokens / base.seconds, "mtp": []}
    for K in ks:
        res = plain.best_of(lambda: speculative.generate(params, cfg, [ids], num_draft=K, **common), repeats)
        tps = res.num_tokens / res.seconds
        row["mtp"].append({"k": K, "tok_s": tps, "speedup": tps / row["plain_tok_s"],
                           "mean_accepted": res.stats["mean_accepted"], "identical_to_plain": res.tokens == base.tokens})
    return row


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['weights']}/{r['kv']}/{r['kv_draft']}" for r in rows]
    x = np.arange(len(rows))
    a1.bar(x - 0.2, [r["plain_tok_s"] for r in rows], 0.4, label="plain")
    best = [max(m["tok_s"] for m in r["mtp"]) if r["mtp"] else 0 for r in rows]
    a1.bar(x + 0.2, best, 0.4, label="MTP (best K)")
    a1.set_xticks(x, labels, rotation=90, fontsize=6)
    a1.set_ylabel("tokens/s (batch 1)")
    a1.legend(fontsize=7)
    a2.bar(x, [r.get("kld", 0) for r in rows])
    a2.set_xticks(x, labels, rotation=90, fontsize=6)
    a2.set_ylabel("mean KLD vs F16 weights, f32 cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an F16 (or F32) GGUF with an MTP head (default: the embedded model)")
    ap.add_argument("--weights", nargs="+", default=WEIGHTS, help=f"weight types (default: {' '.join(WEIGHTS)})")
    ap.add_argument("--kv", nargs="+", default=KV, help=f"trunk KV types, K and V alike (default: {' '.join(KV)})")
    ap.add_argument("--kv-draft", nargs="+", default=["same", "q4_0"],
                    help="the MTP head's KV type: 'same' as the trunk's, or a type (default: same q4_0)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(argv):\n")
    ap.add_argument("--text", default=None, help="text for perplexity (default: Python's json/decoder.py)")
    ap.add_argument("--ctx", type=int, default=256, help="perplexity chunk size and the cache size for the bytes")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--work", default=None, help="where the quantized GGUFs go (default: a temporary directory)")
    ap.add_argument("--out", default=str(RESULTS / "quant_decode"), help="output prefix (.json and .png are added)")
    args = ap.parse_args(argv)
    import warnings

    import jax

    from mtp_jax import perplexity as PP
    from mtp_jax.cli import default_model
    from mtp_jax.io.load import load_model
    from mtp_jax.kvquant import KVTypes

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    t0 = time.time()
    src = Path(args.model or default_model())
    text = Path(args.text) if args.text else Path(json_decoder_path())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quant_decode-"))
    work.mkdir(parents=True, exist_ok=True)
    files = model_files(src, work, args.weights)
    base_file = work / "base-logits.bin"
    rows = []
    cfg0, p0, tok = load_model(src, dtype="float32")
    ids = tok.encode(args.prompt, add_special=True)
    chunks = PP.make_chunks(tok.encode(text.read_text(), add_special=True), args.ctx, args.chunks)
    ref = quality(cfg0, p0, chunks, KVTypes(), None, base_file)  # F16 weights, f32 cache: the KLD base
    print(f"base: {src.name} F16 weights, f32 cache: PPL {ref['ppl']:.4f} +/- {ref['ppl_err']:.4f}", flush=True)
    del p0
    for w in args.weights:
        # F16 weights as F16; a quantized file's blocks as they are, its few float tensors (norms, router) f32
        cfg, params, _ = load_model(files[w], dtype=None if w == "F16" else "float32")
        wbytes = tree_bytes(params)
        for kv in args.kv:
            q = quality(cfg, params, chunks, KVTypes(k=kv, v=kv), base_file, None)
            base = decode_plain(params, cfg, ids, KVTypes(k=kv, v=kv), args.max_new_tokens, args.repeats)
            for kd in dict.fromkeys(kv if d == "same" else d for d in args.kv_draft):
                kt = KVTypes(k=kv, v=kv, k_draft=kd, v_draft=kd)
                row = dict(weights=w, kv=kv, kv_draft=kt.k_draft, weight_bytes=wbytes,
                           cache_bytes=cache_bytes(cfg, args.ctx, kt), **q,
                           **decode(params, cfg, ids, kt, args.k, args.max_new_tokens, args.repeats, base))
                rows.append(row)
                mtp = "  ".join(f"K={m['k']} {m['tok_s']:.0f} ({m['speedup']:.2f}x, acc {m['mean_accepted']:.2f})"
                                for m in row["mtp"])
                print(f"{w:>6} kv {kv:>6} head kv {kt.k_draft:>6}: plain {row['plain_tok_s']:7.1f} tok/s  {mtp}  "
                      f"PPL {q['ppl']:.3f} KLD {q['kld']:.5f}  weights {wbytes / 2**20:.1f} MiB  cache "
                      f"{row['cache_bytes']['trunk'] / 2**10:.0f}+{row['cache_bytes']['head'] / 2**10:.0f} KiB",
                      flush=True)
            # ~8 programs per combination: kept, XLA:CPU's JIT mappings outgrow vm.max_map_count over the grid
            jax.clear_caches()
    meta = dict(model=str(src), device=str(jax.devices()[0]), platform=platform.platform(), cpus=os.cpu_count(),
                jax=jax.__version__, max_new_tokens=args.max_new_tokens, repeats=args.repeats, ctx=args.ctx,
                chunks=len(chunks), text=str(text), base=ref, seconds=time.time() - t0, date=time.strftime("%Y-%m-%d"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.json')}; {plot(rows, out.with_suffix('.png'))}")
    return 0


def json_decoder_path() -> str:
    import json.decoder

    return json.decoder.__file__


if __name__ == "__main__":
    raise SystemExit(main())
