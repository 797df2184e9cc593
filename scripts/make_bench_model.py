"""Write a benchmark GGUF (F16) whose NextN head agrees with the trunk at a chosen rate (mtp_jax/synthetic.py).

    python scripts/make_bench_model.py --config bench-l --accept 0.8 -o /tmp/bench-l-a0.8.gguf

The file carries a small byte-level BPE vocabulary padded to vocab_size, so llama.cpp loads it, tokenizes and
drafts with it (llama-bench, llama-speculative-simple --spec-type draft-mtp).
"""

from __future__ import annotations

import argparse
import sys
import time

from mtp_jax.config import load_config
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.tokenizer import tiny_bpe
from mtp_jax.synthetic import constructed_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench-m", help="config name or YAML (default bench-m)")
    ap.add_argument("--accept", type=float, default=0.8, help="fraction of tokens where head and trunk agree")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16"])
    ap.add_argument("-o", "--out", required=True, help="output GGUF path")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    t0 = time.time()
    params, _, _ = constructed_params(cfg, args.accept, args.seed)
    write_gguf(args.out, cfg, params, outtype=args.outtype, tokenizer=tiny_bpe())
    print(f"wrote {args.out} ({cfg.name}, accept {args.accept}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
