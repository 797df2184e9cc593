"""Gemma 4's assistant drafter: full-vocabulary vs centroid-shortlist drafting, side by side in one run.

For a Gemma-4-style config with an assistant (default configs/gemma4-bench.yaml: 8 target layers, vocabulary
32768, a 4-layer assistant of width 256 whose centroid head scores 32 of 2048 clusters = 512 tokens), weights built
to draft (gemma4_assistant_graph.drafting_params: the assistant drafts the trunk's next token on a fraction ``--accept``
of the tokens; each centroid is the mean table row of its cluster), batch 1, greedy, it prints and writes to JSON:

* our plain decode tokens/s, and per head (full vocabulary, centroids) and per K: MTP tokens/s, the speedup over
  plain, tokens per step, acceptance by position, whether the output equals plain greedy's;
* the cost of one assistant draft step as a fraction of one target decode (autodraft.time_piece: compiled loops
  of the piece alone, best of 3), and the same for a verify of K + 1 tokens.

    python benchmarks/gemma4_assistant.py [--config gemma4-bench] [--accept 0.8] [--k 1 2 3] [--tokens 64]

Writes benchmarks/results/gemma4-assistant.json and, with matplotlib, gemma4-assistant.png (else says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from mtp_jax import autodraft, speculative
from mtp_jax.config import load_config
from mtp_jax.families import gemma4_assistant_graph as GA
from mtp_jax.generate import best_of, generate

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gemma4-bench")
    ap.add_argument("--accept", type=float, default=0.8, help="the fraction of tokens the assistant drafts right")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "gemma4-assistant.json"))
    args = ap.parse_args(argv)
    base = load_config(args.config)
    if base.assistant is None:
        raise SystemExit(f"{args.config}: the config has no assistant")
    prompts = [np.random.default_rng(0).integers(1, base.vocab_size, 16).tolist()]
    common = dict(max_new_tokens=args.tokens, eos_ids=[])
    rows, plain_ref = [], None
    for head in ("full vocabulary", "centroids"):
        acfg = dataclasses.replace(base.assistant, use_ordered_embeddings=head == "centroids")
        cfg, params = GA.drafting_params(base.replace(assistant=acfg), args.accept)
        plain = best_of(lambda: generate(params, cfg, prompts, **common), args.repeats)
        plain_ref = plain_ref or plain.tokens
        assert plain.tokens == plain_ref  # the trunk is the same in both runs
        decode = autodraft.time_piece(params, cfg, 1, 1, head=False, ctx=64)
        draft = autodraft.time_piece(params, cfg, 1, 1, head=True, ctx=64)
        row = {"head": head, "plain_tok_s": args.tokens / plain.seconds, "draft_step_in_decodes": draft / decode,
               "verify_in_decodes": {}, "k": {}}
        for K in args.k:
            row["verify_in_decodes"][K] = autodraft.time_piece(params, cfg, 1, K + 1, head=False, ctx=64) / decode
            r = best_of(lambda: speculative.generate(params, cfg, prompts, num_draft=K, **common), args.repeats)
            row["k"][K] = {"tok_s": args.tokens / r.seconds, "speedup": plain.seconds / r.seconds,
                           "tokens_per_step": r.stats["mean_tokens_per_step"],
                           "accept_rate_per_pos": r.stats["accept_rate_per_pos"],
                           "equals_plain_greedy": r.tokens == plain.tokens}
            print(f"{head:15s} K={K}: {row['k'][K]['tok_s']:7.1f} tok/s = {row['k'][K]['speedup']:.2f}x plain "
                  f"({row['plain_tok_s']:.1f} tok/s), tokens/step {row['k'][K]['tokens_per_step']:.2f}, acceptance "
                  f"{np.round(row['k'][K]['accept_rate_per_pos'], 2).tolist()}, draft step "
                  f"{row['draft_step_in_decodes']:.3f} decodes, verify {row['verify_in_decodes'][K]:.2f} decodes, "
                  f"equal to plain: {row['k'][K]['equals_plain_greedy']}", flush=True)
        rows.append(row)
    out = {"config": args.config, "accept": args.accept, "tokens": args.tokens, "batch": 1, "greedy": True,
           "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    _plot(rows, Path(args.out).with_suffix(".png"))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        ks = sorted(row["k"])
        ax[0].plot(ks, [row["k"][k]["speedup"] for k in ks], "o-", label=row["head"])
        ax[1].plot(ks, [row["k"][k]["tokens_per_step"] for k in ks], "o-", label=row["head"])
    ax[0].axhline(1.0, color="gray", lw=0.5)
    ax[0].set(xlabel="K", ylabel="speedup over plain decoding", title="MTP with the assistant")
    ax[1].set(xlabel="K", ylabel="tokens per step", title="acceptance")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
