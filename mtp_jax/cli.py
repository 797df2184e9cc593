"""The ``mtp-jax`` command: generate, params, quantize (more subcommands register here as they land)."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_CONFIG = "glm4moe-tiny"


def _parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> [[1,2,3]]; several prompts separated by ';' -> a batch."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    return rows


def _load_model(args):
    """(cfg, params) from --config with random weights (seeded by --weights-seed)."""
    import jax

    from mtp_jax import params as P
    from mtp_jax.config import load_config

    cfg = load_config(args.config)
    return cfg, P.init(jax.random.key(args.weights_seed), cfg)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="model config: a YAML file, an HF config.json, or a name in configs/ "
                        f"(default: {DEFAULT_CONFIG}); weights are random, seeded by --weights-seed")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (default 0)")


def _timed(fn, repeats: int):
    """Warm up once (compiles), then the best wall time of ``repeats`` calls -> (result, seconds)."""
    fn()
    best = None
    for _ in range(repeats):
        res = fn()
        best = res if best is None or res.seconds < best.seconds else best
    return best


def cmd_generate(args) -> int:
    from mtp_jax import generate as plain
    from mtp_jax import speculative
    from mtp_jax.sampling import Sampling

    cfg, params = _load_model(args)
    prompts = args.prompt_ids or [[1, 2, 3]]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    k = args.num_draft if cfg.has_mtp else 0
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    res = _timed(lambda: speculative.generate(params, cfg, prompts, num_draft=k, trace=args.trace, **common),
                 args.repeats)
    for i, toks in enumerate(res.tokens):
        print(f"[{i}] prompt {prompts[i]} -> {toks}")
    mode = f"MTP speculative, K={k}" if k else "plain"
    print(f"{mode}: {res.num_tokens} tokens in {res.seconds * 1e3:.1f} ms = {res.num_tokens / res.seconds:.1f} tok/s "
          f"(compiled, batch {len(prompts)})")
    if k:
        s = res.stats
        rates = " ".join(f"{r:.2f}" for r in s["accept_rate_per_pos"])
        print(f"mean accepted drafts/step {s['mean_accepted']:.2f} of {k}, tokens/step {s['mean_tokens_per_step']:.2f}, "
              f"acceptance by position [{rates}], histogram {s['accept_hist']}, trunk forwards {s['trunk_forwards']}")
    if args.compare:
        base = _timed(lambda: plain.generate(params, cfg, prompts, **common), args.repeats)
        print(f"plain baseline: {base.num_tokens} tokens in {base.seconds * 1e3:.1f} ms = "
              f"{base.num_tokens / base.seconds:.1f} tok/s; speedup {base.seconds / res.seconds * res.num_tokens / base.num_tokens:.2f}x"
              f"{'; outputs identical' if base.tokens == res.tokens else ''}")
    return 0


def cmd_params(args) -> int:
    from mtp_jax import params as P
    from mtp_jax.config import load_config

    cfg = load_config(args.config)
    counts = P.param_counts(cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        for k, v in counts.items():
            print(f"{k:>24}: {v:>16,d}  ({v / 1e9:.3f} B)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtp-jax",
        description="Multi-Token-Prediction (NextN) heads in JAX: speculative decoding, MTP-aware importance "
                    "matrices, and a bit-exact GGUF quantizer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate tokens from prompts",
                       description="Generate from token-id prompts with MTP speculative decoding (draft with the "
                                   "NextN head, verify with the trunk, all in one compiled loop); prints the tokens, "
                                   "tokens/s (after a warm-up call that compiles) and acceptance statistics.")
    _add_model_args(g)
    g.add_argument("--prompt-ids", type=_parse_ids, default=None,
                   help="prompt token ids, comma-separated; ';' separates the rows of a batch (default 1,2,3)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per row (default 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--num-draft", "-K", type=int, default=3,
                   help="tokens drafted per step by the NextN head (0 = plain decoding; default 3)")
    g.add_argument("--compare", action="store_true",
                   help="also run plain decoding in the same process and print its tokens/s and the speedup")
    g.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the best is reported")
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="write an NDJSON line per row per speculative step (also: env MTP_JAX_TRACE)")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("params", help="parameter counts of a config (no allocation)",
                       description="Total and per-token active parameter counts, the NextN layer separate, "
                                   "computed with jax.eval_shape (nothing is allocated).")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config YAML, HF config.json, or a name in configs/")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"mtp-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
