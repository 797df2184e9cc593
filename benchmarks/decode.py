"""Plain vs MTP speculative decoding, side by side in one process.

For each batch size and K it prints tokens/s of both loops (compiled, warm, best of --repeats), the measured
speedup, the mean accepted drafts per step, and the *ideal* speedup implied by the measured acceptance and the
measured cost of the pieces of one speculative step relative to one plain decode step:

    ideal = tokens_per_step * t(decode 1) / (t(verify K+1) + t(head K+1) + (K-1) * t(head 1))

Each piece is timed as a compiled fori_loop of in-place cache updates (as inside the real loops), so
``ideal / measured`` shows the loop overhead (sampling, bookkeeping, scatters). Writes JSON and a PNG plot
under benchmarks/results/.

    python benchmarks/decode.py [--config glm4moe-tiny | --model M.gguf] [--batch 1 4 16] [--k 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import generate as plain
from mtp_jax import llama_cpp
from mtp_jax import speculative
from mtp_jax.kvcache import init_nextn_cache, init_trunk_cache
from mtp_jax.model import forward
from mtp_jax.mtp import nextn_forward
from mtp_jax.sampling import Sampling

RESULTS = Path(__file__).resolve().parent / "results"


@partial(jax.jit, static_argnames=("cfg", "T", "head", "n"))
def _repeat_piece(params, cache, cfg, T: int, head: bool, n: int):
    """n compiled calls of one piece (trunk or head forward over T tokens) on a cache, lengths reset each time."""
    B = cache.lengths.shape[0]
    L = cache.lengths
    toks = jnp.ones((B, T), jnp.int32)
    h = jnp.zeros((B, T, cfg.hidden_size), jnp.dtype(cfg.dtype))

    def body(_, c):
        if head:
            _, lg, c, _ = nextn_forward(params, h, toks, c, cfg, logits="all")
        else:
            _, lg, c, _ = forward(params, toks, c, cfg, logits="all")
        return c.with_lengths(L + (lg[0, 0, 0] > 1e30).astype(jnp.int32))  # keep the logits live

    return jax.lax.fori_loop(0, n, body, cache).lengths


def time_piece(params, cfg, B: int, T: int, head: bool, ctx: int, n: int = 50) -> float:
    """Seconds per call of one piece at batch B with ``ctx`` cached tokens."""
    size = ctx + T + 8
    cache = (init_nextn_cache if head else init_trunk_cache)(cfg, B, size).with_lengths(jnp.full((B,), ctx))
    jax.block_until_ready(_repeat_piece(params, cache, cfg, T, head, n))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(_repeat_piece(params, cache, cfg, T, head, n))
    return (time.perf_counter() - t0) / n


def run(params, cfg, prompts_for, batches, ks, max_new: int, repeats: int, sampling: Sampling) -> list[dict]:
    rows = []
    for B in batches:
        prompts = prompts_for(B)
        ctx = int(np.mean([len(p) for p in prompts])) + max_new // 2
        base = plain.best_of(lambda: plain.generate(params, cfg, prompts, max_new_tokens=max_new, sampling=sampling,
                                              eos_ids=[]), repeats)
        plain_tps = base.num_tokens / base.seconds
        t_decode = time_piece(params, cfg, B, 1, False, ctx)
        for K in ks:
            res = plain.best_of(lambda: speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=max_new,
                                                       sampling=sampling, eos_ids=[]), repeats)
            tps = res.num_tokens / res.seconds
            t_verify = time_piece(params, cfg, B, K + 1, False, ctx)
            t_head_blk = time_piece(params, cfg, B, K + 1, True, ctx)
            t_head_1 = time_piece(params, cfg, B, 1, True, ctx) if K > 1 else 0.0
            step_cost = (t_verify + t_head_blk + (K - 1) * t_head_1) / t_decode
            tps_step = res.stats["mean_tokens_per_step"]
            row = dict(batch=B, k=K, plain_tok_s=plain_tps, mtp_tok_s=tps, speedup=tps / plain_tps,
                       mean_accepted=res.stats["mean_accepted"], tokens_per_step=tps_step,
                       accept_rate_per_pos=res.stats["accept_rate_per_pos"],
                       step_cost_in_decodes=step_cost, ideal_speedup=tps_step / step_cost,
                       t_decode_ms=t_decode * 1e3, t_verify_ms=t_verify * 1e3, t_head_block_ms=t_head_blk * 1e3,
                       t_head_1_ms=t_head_1 * 1e3, identical_to_plain=(res.tokens == base.tokens) if sampling.greedy
                       else None)
            rows.append(row)
            print(f"B={B:>3} K={K}  plain {plain_tps:9.1f} tok/s  MTP {tps:9.1f} tok/s  speedup {row['speedup']:5.2f}x  "
                  f"accepted {row['mean_accepted']:.2f}/{K}  tokens/step {tps_step:.2f}  step cost "
                  f"{step_cost:.2f} decodes  ideal {row['ideal_speedup']:5.2f}x", flush=True)
    return rows


def _llama(tool: str, *args) -> str:
    """Run a llama.cpp tool on one thread (on busy cores its OpenMP workers spin); --no-repack: its AMX
    repacking of quantized weights segfaults on this CPU. Returns stderr (its log)."""
    p = subprocess.run([str(llama_cpp.bin_dir() / tool), *map(str, args), "-t", "1", "--no-repack"], capture_output=True,
                       text=True, errors="replace", timeout=600)
    if p.returncode:
        raise RuntimeError(f"{tool} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stderr


def llama_rows(model: str, prompt: str, ks, max_new: int) -> list[dict]:
    """llama.cpp on the same GGUF at batch 1: llama-completion (plain) and llama-speculative-simple
    --spec-type draft-mtp for each K, greedy, tokens/s as the tools report them."""
    if not (llama_cpp.bin_dir() / "llama-speculative-simple").exists():
        print("llama.cpp tools not built: skipping the llama.cpp comparison")
        return []
    common = ["-m", model, "-p", prompt, "-n", max_new, "--temp", 0, "-c", 1024]
    log = _llama("llama-completion", *common, "-no-cnv", "--ignore-eos")
    plain_tps = float(re.search(r"eval time =.*?([0-9.]+) tokens per second", log.split("prompt eval time")[-1]).group(1))
    rows = []
    for K in ks:
        log = _llama("llama-speculative-simple", *common, "--spec-type", "draft-mtp", "--spec-draft-n-max", K)
        tps = float(re.search(r"decoded\s+\d+ tokens in\s+[0-9.]+ seconds, speed:\s+([0-9.]+) t/s", log).group(1))
        drafted, accepted = llama_cpp.speculative_counts(log)
        rows.append(dict(k=K, llama_plain_tok_s=plain_tps, llama_mtp_tok_s=tps, llama_speedup=tps / plain_tps,
                         llama_accept_rate=accepted / max(drafted, 1)))
        print(f"llama.cpp B=1 K={K}  plain {plain_tps:9.1f} tok/s  MTP {tps:9.1f} tok/s  speedup {tps / plain_tps:5.2f}x"
              f"  acceptance {accepted}/{drafted}", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for B in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == B]
        line, = ax.plot([r["k"] for r in rs], [r["speedup"] for r in rs], "o-", label=f"batch {B} measured")
        ax.plot([r["k"] for r in rs], [r["ideal_speedup"] for r in rs], "x--", color=line.get_color(),
                label=f"batch {B} ideal")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("K (drafted tokens per step)")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF / HF dir / orbax dir / config YAML (default: the embedded model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(argv):\n",
                    help="prompt text when the model has a tokenizer (every row gets it)")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument("--out", default=str(RESULTS / "decode"), help="output path prefix (.json and .png are added)")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    from mtp_jax.cli import default_model
    from mtp_jax.io.load import load_model

    model = args.model or default_model()
    cfg, params, tok = load_model(model)
    rng = np.random.default_rng(0)
    if tok is not None:
        ids = tok.encode(args.prompt, add_special=True)
        prompts_for = lambda B: [ids] * B  # noqa: E731
    else:
        prompts_for = lambda B: [rng.integers(1, cfg.vocab_size, args.prompt_len).tolist() for _ in range(B)]  # noqa: E731
    sampling = Sampling(temperature=args.temperature)
    t0 = time.time()
    rows = run(params, cfg, prompts_for, args.batch, args.k, args.max_new_tokens, args.repeats, sampling)
    llama = []
    if not args.no_llama and str(model).endswith(".gguf") and tok is not None:
        llama = llama_rows(str(model), args.prompt, args.k, args.max_new_tokens)
        ours = {r["k"]: r for r in rows if r["batch"] == 1}
        for lr in llama:
            o = ours.get(lr["k"])
            if o:
                print(f"ours / llama.cpp at B=1 K={lr['k']}: MTP {o['mtp_tok_s'] / lr['llama_mtp_tok_s']:.2f}x, "
                      f"plain {o['plain_tok_s'] / lr['llama_plain_tok_s']:.2f}x")
    meta = dict(model=str(model), config=cfg.name, device=str(jax.devices()[0]),
                platform=platform.platform(), jax=jax.__version__, max_new_tokens=args.max_new_tokens,
                prompt_len=args.prompt_len, temperature=args.temperature, seconds=time.time() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "llama_cpp": llama}, indent=1))
    plot(rows, out.with_suffix(".png"), f"MTP vs plain decoding, {cfg.name}, {meta['device']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
