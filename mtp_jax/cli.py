"""The ``mtp-jax`` command: generate, params, plan, imatrix, quantize, convert, info."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "glm4moe-tiny"
EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "glm4moe-stdlib-f16.gguf"


def default_model() -> str:
    """The embedded trained model when it is installed, else the tiny config with random weights."""
    return str(EMBEDDED_MODEL) if EMBEDDED_MODEL.exists() else DEFAULT_CONFIG


def _parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> [[1,2,3]]; several prompts separated by ';' -> a batch."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    return rows


def _at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n
    parse.__name__ = f"integer >= {low}"
    return parse


def _load_model(args, mesh=None, placement=()):
    """(cfg, params, tokenizer or None) from --model (or --config: random weights seeded by --weights-seed);
    ``mesh``, ``placement``: as load_model takes them."""
    from mtp_jax.io.load import load_model

    drafting = getattr(args, "num_draft", "auto") != 0  # plain decoding never reads the MTP tensors
    return load_model(args.model or args.config or default_model(), seed=args.weights_seed, load_mtp=drafting,
                      check_finite=not args.no_check_finite, quantized="dequantize" if args.dequantize else "keep",
                      mtp_head=getattr(args, "mtp_head", None), mesh=mesh, placement=placement)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a GGUF file, an HF safetensors directory, an mtp_jax orbax checkpoint, or a config "
                        "(YAML, HF config.json, or a bundled config name such as glm-4.5: random weights); "
                        "default: the embedded trained model")
    p.add_argument("--mtp-head", "-md", default=None, metavar="FILE",
                   help="take the MTP (NextN) heads from FILE, e.g. an MTP-only GGUF (convert --mtp) beside a "
                        "trunk-only model (convert --no-mtp), or Gemma 4's assistant drafter (a gemma4-assistant "
                        "GGUF); the MTP tensors are read only when drafting")
    p.add_argument("--config", default=None, help="same as --model with a config (kept for scripts)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of random weights for a config (default 0)")
    p.add_argument("--dequantize", action="store_true",
                   help="convert a quantized GGUF's weights to floats when loading (default: keep Q8_0, Q4_K, "
                        "IQ4_XS, ... weights in their GGUF block format on the device, dequantized next to each "
                        "matmul; types the graph cannot dequantize are converted either way)")
    _add_check_finite(p)


def _add_check_finite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-check-finite", action="store_true",
                   help="skip the check that every weight of a GGUF model is finite (no NaN/Inf)")


def _num_draft(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-draft expects 'auto' or an integer >= 0, got {text!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"--num-draft expects 'auto' or an integer >= 0, got {k}")
    return k


KV_CACHE_FLAGS = {"k": "--cache-type-k", "v": "--cache-type-v", "k_draft": "--cache-type-k-draft",
                  "v_draft": "--cache-type-v-draft"}  # kvquant.KVTypes field -> generate's flag


def _cache_types(args, fields=tuple(KV_CACHE_FLAGS)):
    """kvquant.KVTypes from the --cache-type-* flags a command has (``fields``); ValueError naming the flag for an
    unknown type (checked here rather than by argparse choices: one line, and no jax import for the parser)."""
    from mtp_jax import kvquant

    for field in fields:
        kvquant.check_type(getattr(args, f"cache_type_{field}"), KV_CACHE_FLAGS[field])
    return kvquant.KVTypes(**{field: getattr(args, f"cache_type_{field}") for field in fields})


def _add_cache_type_args(p: argparse.ArgumentParser, draft: bool = True) -> None:
    kv = p.add_argument_group("KV cache types", "f32, f16, bf16, q8_0, q4_0 (ggml's blocks), turbo2, turbo3, turbo4 "
                                                "(TurboQuant, mtp_jax/kvquant.py); default: the compute dtype (f32 "
                                                "on CPU). q8_0 / q4_0 need head dims that are multiples of 32")
    kv.add_argument("--cache-type-k", "-ctk", default=None, metavar="TYPE", help="the trunk's K cache")
    kv.add_argument("--cache-type-v", "-ctv", default=None, metavar="TYPE",
                    help="the trunk's V cache (MLA models cache one latent: unset or equal to -ctk)")
    if draft:
        kv.add_argument("--cache-type-k-draft", "-ctkd", default=None, metavar="TYPE", help="the MTP head's K cache")
        kv.add_argument("--cache-type-v-draft", "-ctvd", default=None, metavar="TYPE", help="the MTP head's V cache")


def check_positions(cfg, prompts: list[list[int]], max_new_tokens: int, num_draft: int) -> None:
    """ValueError unless the prompts are valid (model.pad_prompts), the budget is >= 1, and the longest prompt, the
    budget and the K+1 slots a speculative step writes ahead fit the model's positions
    (cfg.max_position_embeddings): checked before anything is measured or compiled."""
    from mtp_jax.model import pad_prompts

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    pad_prompts(prompts, cfg)  # the generator's own checks of the prompts (empty, out of vocabulary), done early
    longest = max(map(len, prompts), default=0)
    ahead = num_draft + 1 if num_draft else 0
    room = cfg.max_position_embeddings - longest - ahead
    if max_new_tokens > room:
        raise ValueError(f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens}"
                         f"{f' + {ahead} draft slots (K+1)' if ahead else ''} needs "
                         f"{longest + max_new_tokens + ahead} positions, more than the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}; use --max-new-tokens <= {max(room, 0)}")


COMPARE_SECONDS = 2.0  # --compare: short calls are timed in more rounds, until the rounds took this long


def _progress(run, what: str, calls: int):
    """``run``, announcing each call on stderr when stderr is a terminal. The whole generation is one compiled
    call, so there is no per-token progress: a line per call, its time when it returns."""
    if not sys.stderr.isatty():
        return run
    calls_made = itertools.count(1)

    def announced():
        n = next(calls_made)
        if n > calls:  # the extra rounds of short calls (COMPARE_SECONDS) go unannounced
            return run()
        print(f"mtp-jax generate: {what}, call {n}/{calls}{' (compiles first)' if n == 1 else ''} ...", end="",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = run()
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return res

    return announced


def _start_devices(args) -> None:
    """Before JAX starts: join a multi-process run (jax.distributed) and make --devices fake CPU devices where
    there is no accelerator (the setting only affects the CPU backend)."""
    import jax

    if args.coordinator or args.num_processes:
        if not (args.coordinator and args.num_processes and args.process_id is not None):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
        if args.devices:
            jax.config.update("jax_num_cpu_devices", max(args.devices // args.num_processes, 1))
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)


def _mesh_for(args):
    """config -> the mesh of --devices devices (default: all devices of all processes), or None for one device:
    the model is read straight into its shards (load_model's ``mesh``); rows and caches follow the params."""
    import jax

    from mtp_jax import sharding

    n = args.devices or len(jax.devices())
    if n > len(jax.devices()):
        raise ValueError(f"--devices {n}: only {len(jax.devices())} devices are visible")
    return lambda cfg: None if n == 1 else sharding.make_mesh(**sharding.parse_mesh(args.mesh, n, cfg))


def cmd_generate(args) -> int:
    from mtp_jax import generate as plain
    from mtp_jax import speculative
    from mtp_jax.io.validate import output_file
    from mtp_jax.sampling import Sampling

    cache_types = _cache_types(args)
    if args.trace or os.environ.get("MTP_JAX_TRACE"):  # a trace is written after the run: check its path first
        output_file(args.trace or os.environ["MTP_JAX_TRACE"], ValueError)
    _start_devices(args)
    placement = [(pattern, "replicated") for pattern in args.replicate or ()]
    cfg, params, tok = _load_model(args, _mesh_for(args), placement)
    if args.prompt is not None:
        if tok is None:
            raise ValueError("--prompt needs a model with a tokenizer we read (a GGUF or HF model with a byte-level "
                             "BPE or SentencePiece vocabulary); use --prompt-ids")
        prompts = [tok.encode(p, add_special=True) for p in args.prompt]
    else:
        prompts = args.prompt_ids or ([tok.encode("def ", add_special=True)] if tok else [[1, 2, 3]])
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    k = args.num_draft
    if k != 0 and (params.nextn is None or not cfg.has_mtp):
        print(f"mtp-jax generate: the model has no NextN (MTP) head; decoding plain (--num-draft {k} ignored)",
              file=sys.stderr)
        k = 0
    check_positions(cfg, prompts, args.max_new_tokens, args.draft_max if k == "auto" else k)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, cache_types=cache_types)
    mode = f"MTP speculative, K={k}" if k else "plain"
    what = f"up to {args.max_new_tokens} tokens x {len(prompts)} rows"
    if k == "auto":
        print("mtp-jax generate: measuring the cost of head and verify steps for --num-draft auto ...",
              file=sys.stderr, flush=True)
    runs = [_progress(lambda: speculative.generate(params, cfg, prompts, num_draft=k, trace=args.trace,
                                                   p_min=args.draft_p_min, max_draft=args.draft_max, **common),
                      f"{mode}: {what}", args.repeats + 1)]
    if args.compare:  # timed in alternation with the run above
        runs.append(_progress(lambda: plain.generate(params, cfg, prompts, **common), f"plain: {what}",
                              args.repeats + 1))
    res, *base = plain.best_of_each(runs, args.repeats, min_seconds=COMPARE_SECONDS if args.compare else 0.0)
    for i, toks in enumerate(res.tokens):
        if tok is not None:
            print(f"[{i}] {tok.decode(prompts[i])!r} -> {tok.decode(toks)!r}")
        else:
            print(f"[{i}] prompt {prompts[i]} -> {toks}")
    print(f"{mode}: {res.num_tokens} tokens in {res.seconds * 1e3:.1f} ms = {res.num_tokens / res.seconds:.1f} tok/s "
          f"(compiled, batch {len(prompts)})")
    if k:
        s = res.stats
        rates = " ".join(f"{r:.2f}" for r in s["accept_rate_per_pos"])
        of = args.draft_max if k == "auto" else k
        print(f"mean accepted drafts/step {s['mean_accepted']:.2f} of {of}, "
              f"tokens/step {s['mean_tokens_per_step']:.2f}, acceptance by position [{rates}], "
              f"histogram {s['accept_hist']}, trunk forwards {s['trunk_forwards']}"
              f"{', plain steps ' + str(s['plain_steps']) if s['plain_steps'] else ''}")
    if base:
        base = base[0]
        speedup = base.seconds / res.seconds * res.num_tokens / base.num_tokens
        print(f"plain baseline: {base.num_tokens} tokens in {base.seconds * 1e3:.1f} ms = "
              f"{base.num_tokens / base.seconds:.1f} tok/s; speedup {speedup:.2f}x"
              f"{'; outputs identical' if base.tokens == res.tokens else ''}")
        if res.stats.get("plain_loop"):
            print("(auto decoded with the plain loop: on this model and machine a head step costs more than even a "
                  "good head's accepted drafts would save, so both runs are the same loop and the ratio is timing "
                  "noise)")
    return 0


def cmd_imatrix(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from mtp_jax import imatrix as IM
    from mtp_jax.io.imatrix_gguf import write_imatrix_gguf
    from mtp_jax.io.load import load_model
    from mtp_jax.io.validate import output_file, regular_file

    regular_file(args.file, ValueError)  # before the model is loaded, as are the outputs
    output_file(args.output, ValueError)
    if args.head_output:
        output_file(args.head_output, ValueError)
    cfg, params, tok = load_model(args.model or default_model(), check_finite=not args.no_check_finite,
                                  mtp_head=args.mtp_head)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer: imatrix needs one to tokenize {args.file}")
    head_out = args.head_output or str(Path(args.output).with_name(Path(args.output).stem + "-head.gguf"))
    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    bos = tok.bos_id if tok.add_bos else None
    chunks = IM.make_chunks(tok.encode(text, add_special=True), args.chunk_size, bos, args.chunks)
    col = IM.Collector(params, cfg, mtp=not args.no_mtp, process_output=args.process_output, batch=args.batch)
    datasets = [Path(args.file).name]

    def save():
        head = col.head_result(args.chunk_size, datasets)  # a drafter in a file of its own: an imatrix of its own
        if head is not None:
            write_imatrix_gguf(head, head_out)
        return write_imatrix_gguf(col.result(args.chunk_size, datasets, not args.no_neutral_lookups), args.output)

    t0 = time.perf_counter()
    bar = tqdm(total=len(chunks), unit="chunk", desc="imatrix", disable=args.quiet)
    for n_batches, i in enumerate(range(0, len(chunks), args.batch), start=1):
        ppl = col.add(chunks[i: i + args.batch])
        bar.update(len(ppl))
        bar.set_postfix(tok_s=f"{col.chunks * args.chunk_size / (time.perf_counter() - t0):.0f}", ppl=f"{ppl[-1]:.2f}")
        if args.save_frequency and n_batches % args.save_frequency == 0:
            save()
    bar.close()
    path = save()
    dt = time.perf_counter() - t0
    mtp = f", NextN head perplexity {col.mtp_perplexity:.3f}" if col.mtp_perplexity else ""
    head = f"; the drafter's {len(col.head_sums)} tensors -> {head_out}" if col.head_sums else ""
    rate = col.chunks * args.chunk_size / dt
    print(f"{col.chunks} chunks x {args.chunk_size} tokens in {dt:.1f} s ({rate:.0f} tok/s), "
          f"perplexity {col.perplexity:.3f}{mtp}; {len(col.sums)} tensors with statistics -> {path}{head}")
    return 0


def cmd_perplexity(args) -> int:
    import math

    import numpy as np

    from mtp_jax import perplexity as PP
    from mtp_jax.io.load import load_model
    from mtp_jax.io.validate import output_file, regular_file
    from mtp_jax.model import check_tokens

    kld, base_path = args.kl_divergence, args.kl_divergence_base
    cache_types = _cache_types(args, ("k", "v"))
    if kld and not base_path:
        raise ValueError("--kl-divergence compares with a base model's logits: give --kl-divergence-base FILE")
    if not (kld or args.file):
        raise ValueError("give the text to score with -f/--file")
    if args.ctx_size is not None and args.ctx_size < 3:
        raise ValueError(f"-c/--ctx-size {args.ctx_size}: a chunk needs at least 3 tokens")
    if args.batch_size < 1 or args.chunks == 0:
        raise ValueError("-b/--batch-size must be >= 1 and --chunks >= 1 (or negative: all)")
    text = None
    if args.file:  # checked before the model loads, as are the base file and the output directory
        raw = regular_file(args.file, ValueError).read_bytes()
        raw = raw[:-1] if raw.endswith(b"\n") else raw  # llama.cpp's -f drops one trailing newline
        if not raw:
            raise ValueError(f"{args.file}: empty text file")
        text = raw.decode("utf-8", errors="replace")
    if kld:
        regular_file(base_path, ValueError)
    elif base_path:
        output_file(base_path, ValueError)

    # the trunk only; quantized GGUF weights stay in their blocks, the rest (and so the activations) float32
    model = args.model or default_model()
    cfg, params, tok = load_model(model, dtype="float32", load_mtp=False, check_finite=not args.no_check_finite)
    if text is not None and tok is None:
        raise ValueError(f"{model} has no tokenizer: perplexity needs one to tokenize {args.file}")
    if tok is not None and tok.add_eos:
        raise ValueError(f"{model}: its vocab adds EOS to every text, which llama-perplexity refuses")
    tokens = None if text is None else check_tokens(tok.encode(text, add_special=True), cfg, f"{args.file} tokens")
    max_chunks = args.chunks if args.chunks > 0 else None
    if kld:
        base = PP.read_logits_file(base_path, cfg.vocab_size)
        if args.ctx_size not in (None, base.n_ctx):
            raise PP.LogitsFileError(f"{base_path}: computed with a context of {base.n_ctx}, not -c {args.ctx_size} "
                                     f"(leave out -c)")
        chunks = base.tokens[:max_chunks]
        if tokens is not None and not np.array_equal(tokens[:base.tokens.size], base.tokens.ravel()):
            raise PP.LogitsFileError(f"{base_path}: its tokens are not those of {args.file}")
    else:
        base = None
        chunks = PP.make_chunks(tokens, args.ctx_size or 512, max_chunks)
    n_chunk, n_ctx = chunks.shape
    if args.batch_size >= n_ctx and args.batch_size % n_ctx:
        raise ValueError(f"-b/--batch-size {args.batch_size} must be below -c {n_ctx} or a multiple of it "
                         f"(as llama-perplexity)")
    n_seq = min(max(1, args.batch_size // n_ctx), n_chunk)
    if n_ctx > cfg.max_position_embeddings:
        print(f"mtp-jax perplexity: warning: the model was trained on only {cfg.max_position_embeddings} context "
              f"tokens ({n_ctx} specified)", file=sys.stderr)
    bos = tok.bos_id if tok is not None and tok.add_bos else None
    out = open(base_path, "wb") if base_path and not kld else None
    if out is not None:
        PP.write_header(out, cfg.vocab_size, chunks)
    print(f"mtp-jax perplexity: {'KL divergence' if kld else 'perplexity'} over {n_chunk} chunks, n_ctx={n_ctx}, "
          f"batch_size={args.batch_size}, n_seq={n_seq}", file=sys.stderr, flush=True)
    nll, terms = [], []
    t0 = time.perf_counter()
    try:
        for i, score in enumerate(PP.evaluate(cfg, params, chunks, n_seq, bos, save=out is not None, base=base,
                                              cache_types=cache_types)):
            if i == 0:
                dt = time.perf_counter() - t0
                print(f"mtp-jax perplexity: {dt:.2f} seconds per pass (compilation included) - ETA "
                      f"{dt * (math.ceil(n_chunk / n_seq) - 1) / 60:.2f} minutes", file=sys.stderr, flush=True)
                if kld:
                    print(PP.KLD_TABLE_HEAD)
            if out is not None:
                out.write(score.rows.tobytes())
            nll.append(score.nll)
            if kld:
                terms.append(score.kld)
                so_far = {k: np.concatenate([t[k] for t in terms]) for k in terms[0]}
                print(PP.kld_chunk_line(i + 1, PP.kld_statistics(so_far)), flush=True)
            else:
                print(f"[{i + 1}]{math.exp(np.concatenate(nll).mean()):.4f},", end="", flush=True)
    finally:
        if out is not None:
            out.close()
    print()
    dt = time.perf_counter() - t0
    n_tok = n_chunk * n_ctx
    print(f"mtp-jax perplexity: {n_chunk} chunks x {n_ctx} tokens in {dt:.1f} s ({n_tok / dt:.0f} tok/s)"
          f"{f'; logits saved to {base_path}' if out is not None else ''}", file=sys.stderr)
    if not kld:
        ppl, err = PP.ppl_estimate(np.concatenate(nll))
        print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    elif so_far["nll"].size < 100:
        print("mtp-jax perplexity: fewer than 100 scored tokens: no statistics (as llama-perplexity)",
              file=sys.stderr)
    else:
        print("\n".join(PP.kld_report(so_far)))
    return 0


def cmd_params(args) -> int:
    from mtp_jax import params as P
    from mtp_jax.config import load_config

    cfg = load_config(args.config or DEFAULT_CONFIG)
    counts = P.param_counts(cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        for k, v in counts.items():
            print(f"{k:>24}: {v:>16,d}  ({v / 1e9:.3f} B)")
    return 0


def cmd_plan(args) -> int:
    import dataclasses

    import jax

    from mtp_jax import kvquant, plan  # importing starts no backend: the device count is set after the checks

    if args.devices < 1 or args.batch < 1:
        raise ValueError("--devices and --batch must be >= 1")
    weights = plan.weight_type(args.weights)
    kvquant.check_type(args.cache_type, "--cache-type")
    kvquant.check_type(args.cache_type_draft, "--cache-type-draft")
    draft = args.cache_type_draft or args.cache_type
    shorthand = {"k": args.cache_type, "v": args.cache_type, "k_draft": draft, "v_draft": draft}
    types = _cache_types(args)  # -ctk / -ctv / -ctkd / -ctvd win over the shorthands
    types = kvquant.KVTypes(**{f: t or shorthand[f] for f, t in dataclasses.asdict(types).items()})
    jax.config.update("jax_platforms", "cpu")  # fake CPU devices stand in for the accelerators
    jax.config.update("jax_num_cpu_devices", args.devices)
    from mtp_jax import sharding
    from mtp_jax.config import load_config

    cfg = load_config(args.config)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    mesh = sharding.parse_mesh(args.mesh, args.devices, cfg)
    print(f"mtp-jax plan: compiling the speculative loop of {args.config} on {args.devices} fake devices ...",
          file=sys.stderr, flush=True)
    p = plan.make_plan(cfg, mesh, batch=args.batch, ctx=args.ctx, prompt=args.prompt, num_draft=args.num_draft,
                       name=args.config, weights=weights, cache_types=types)
    print(json.dumps(p.to_dict()) if args.json else plan.describe(p))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mtp_jax.io.cli import add_io_parsers
    from mtp_jax.quant.cli import add_quantize_parser

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
    g.add_argument("--prompt", "-p", action="append", default=None,
                   help="prompt text (repeat for a batch); needs a model with a tokenizer")
    g.add_argument("--prompt-ids", type=_parse_ids, default=None,
                   help="prompt token ids, comma-separated; ';' separates the rows of a batch (default 1,2,3)")
    g.add_argument("--max-new-tokens", "-n", "--n-predict", type=int, default=32,
                   help="tokens to generate per row (default 32); with the prompt and the K+1 draft slots they must "
                        "fit the model's max_position_embeddings")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--num-draft", "-K", type=_num_draft, default="auto",
                   help="tokens drafted per step by the NextN head: a number (0 = plain decoding) or 'auto' (the "
                        "default): each step drafts up to --draft-max tokens, the count chosen from the acceptance "
                        "measured so far and the measured cost of head and verify steps, and falls back to plain "
                        "decoding when drafting does not pay")
    g.add_argument("--draft-max", type=int, default=4, help="the most tokens an 'auto' step drafts (default 4)")
    g.add_argument("--draft-p-min", type=float, default=None,
                   help="a row stops drafting at a draft whose head probability is below this (llama.cpp's "
                        "--draft-p-min; default 0 = off)")
    g.add_argument("--compare", action="store_true",
                   help="also run plain decoding in the same process and print its tokens/s and the speedup")
    g.add_argument("--repeats", type=_at_least(0), default=3,
                   help="timed calls after the warm-up; the best is reported (0: the warm-up call's time, compile "
                        "included); with --compare, short calls get more rounds until the rounds took "
                        f"{COMPARE_SECONDS:g} s")
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="write an NDJSON line per row per speculative step (also: env MTP_JAX_TRACE)")
    _add_cache_type_args(g)
    d = g.add_argument_group("devices", "a mesh of devices (and processes): rows on data, experts on expert, "
                                        "heads and FFN on model")
    d.add_argument("--devices", type=_at_least(1), default=None,
                   help="devices to run on (default: all; on a CPU-only machine, N fake CPU devices)")
    d.add_argument("--mesh", default=None, metavar="data=N,expert=N,model=N",
                   help="mesh axis sizes, product = --devices (default: experts on as many devices as divide the "
                        "expert count, the rest on model)")
    d.add_argument("--replicate", action="append", default=None, metavar="REGEX",
                   help="keep tensors whose name matches whole on every device (repeatable; names such as "
                        "moe_layers.ffn.gate, mtp.0.eh_proj: e.g. --replicate 'mtp\\..*')")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: the coordinator's address (jax.distributed.initialize)")
    d.add_argument("--num-processes", type=int, default=None, help="multi-process run: number of processes")
    d.add_argument("--process-id", type=int, default=None, help="multi-process run: this process' index")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("params", help="parameter counts of a config (no allocation)",
                       description="Total and per-token active parameter counts, the NextN layer separate, "
                                   "computed with jax.eval_shape (nothing is allocated).")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config YAML, HF config.json, or a bundled config name (glm-4.5, glm-4.5-air, ...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)
    im = sub.add_parser("imatrix", help="collect an importance matrix (MTP/NextN tensors included)",
                        description="Collect llama.cpp-compatible importance-matrix statistics over a text, with the "
                                    "NextN head driven as while drafting so blk.N.nextn.* and the MTP block get "
                                    "entries (llama-imatrix leaves them out). Writes llama.cpp's imatrix GGUF.")
    im.add_argument("--model", "-m", default=None, help="GGUF / HF dir / orbax dir (default: the embedded model)")
    im.add_argument("-f", "--file", required=True, help="text file to collect over")
    im.add_argument("-o", "--output", default="imatrix.gguf", help="output imatrix GGUF (default imatrix.gguf)")
    im.add_argument("--mtp-head", "-md", default=None, metavar="FILE",
                    help="the MTP heads' file beside a trunk-only model, or Gemma 4's assistant drafter (whose "
                         "statistics, driven as while drafting, go to an imatrix of its own: --head-output)")
    im.add_argument("--head-output", default=None, metavar="FILE",
                    help="the imatrix of a drafter that is a file of its own (Gemma 4's assistant); default: "
                         "OUTPUT with -head before .gguf")
    im.add_argument("--chunk-size", type=_at_least(3), default=512,
                    help="tokens per chunk (llama-imatrix -c, default 512)")
    im.add_argument("--chunks", type=int, default=None,
                    help="use at most this many chunks (>= 1; default or negative: all, as llama-imatrix's -1)")
    im.add_argument("--batch", "-b", type=_at_least(1), default=1, help="chunks per forward (any size; default 1)")
    im.add_argument("--no-mtp", action="store_true", help="trunk only, as llama-imatrix")
    im.add_argument("--process-output", action="store_true", help="also collect output.weight (llama-imatrix flag)")
    im.add_argument("--no-neutral-lookups", action="store_true",
                    help="do not write neutral (count 0) entries for row-lookup tensors such as nextn.embed_tokens")
    im.add_argument("--save-frequency", type=int, default=0, metavar="N",
                    help="rewrite the output every N batches, so an interrupted run loses at most N (0 = at the end)")
    im.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_check_finite(im)
    im.set_defaults(func=cmd_imatrix)

    pp = sub.add_parser("perplexity", help="perplexity and KL divergence over a text, as llama-perplexity",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Perplexity of a model over a text, computed as llama-perplexity computes "
                                    "it:\nthe whole text is tokenized once (BOS as the model's vocab says), cut into "
                                    "chunks of -c tokens\n(the first token of each chunk replaced by BOS when the "
                                    "vocab adds one), and each chunk scored on\nits second half only. Prints the "
                                    "running PPL after each chunk ([1]x,[2]y,...) and\n'Final estimate: PPL = x +/- "
                                    "y' (the uncertainty as llama-perplexity's).\n\n"
                                    "KL divergence from a base model (e.g. of a quantized file from its F16 original): "
                                    "run\nthe base with --kl-divergence-base FILE to save its log-probs, then the "
                                    "other model with\n--kl-divergence-base FILE --kl-divergence (the tokens and -c "
                                    "come from FILE). FILE has\nllama-perplexity's format: either tool reads the "
                                    "other's.\n\nThe model runs its trunk only (no MTP head); quantized GGUF weights "
                                    "stay in their block\nformat, everything else is float32.",
                        epilog="example:\n  mtp-jax perplexity -m model-f16.gguf -f wiki.test.raw "
                               "--kl-divergence-base base.bin\n  mtp-jax perplexity -m model-Q4_K_M.gguf "
                               "--kl-divergence-base base.bin --kl-divergence")
    pp.add_argument("--model", "-m", default=None,
                    help="a GGUF file, an HF safetensors directory, an mtp_jax orbax checkpoint, or a config "
                         "(random weights); default: the embedded model")
    pp.add_argument("-f", "--file", default=None,
                    help="the text to score (one trailing newline dropped, as llama.cpp's -f); with "
                         "--kl-divergence optional, and then it must tokenize to the base file's tokens")
    pp.add_argument("-c", "--ctx-size", type=int, default=None,
                    help="tokens per chunk (default 512; with --kl-divergence, the base file's)")
    pp.add_argument("-b", "--batch-size", type=int, default=2048,
                    help="tokens per forward, as llama.cpp's -b: max(1, B / c) chunks run together; below -c, one "
                         "chunk per forward (llama.cpp splits it through its KV cache: the same logits); must be "
                         "below -c or a multiple of it (default 2048)")
    pp.add_argument("--chunks", type=int, default=-1,
                    help="score at most this many chunks, the first ones (default -1 = all; with --kl-divergence, "
                         "of the base file's)")
    pp.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                    help="without --kl-divergence: save the model's log-probs (llama-perplexity's logits file, "
                         "2 bytes per vocab entry per scored token); with it: the base to compare with")
    pp.add_argument("--kl-divergence", action="store_true",
                    help="compare with --kl-divergence-base: per chunk the running PPL, ln(PPL ratio), mean KLD, "
                         "RMS of Δp (change of the probability of the right token) and the share of tokens "
                         "whose top choice is the base's, then llama-perplexity's summary statistics")
    _add_cache_type_args(pp, draft=False)
    _add_check_finite(pp)
    pp.set_defaults(func=cmd_perplexity)

    pl = sub.add_parser("plan", help="per-device memory of a config on a device mesh (compiled, not allocated)",
                        description="Lower and compile the speculative loop for a config on N fake CPU devices "
                                    "(jax.eval_shape, jit(...).lower(...).compile(), XLA's memory analysis; no "
                                    "weights are allocated) and print per-device bytes of weights, KV caches (trunk "
                                    "and MTP) and temporaries, the collectives the partitioned program runs, and "
                                    "whether it fits an H100 80 GB, H200 141 GB, TPU v5p 95 GB or v5e 16 GB.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  mtp-jax plan --config glm-4.5 --devices 8 --mesh expert=8 --batch 8 "
                               "--ctx 8192")
    pl.add_argument("--config", required=True, help="a bundled config name (glm-4.5, glm-4.5-air, ...) or a YAML / "
                                                    "HF config.json")
    pl.add_argument("--devices", type=int, default=8, help="fake devices (default 8)")
    pl.add_argument("--mesh", default=None, metavar="data=N,expert=N,model=N",
                    help="mesh axis sizes, product = --devices (default: experts on as many devices as divide the "
                         "expert count, the rest on the model axis)")
    pl.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    pl.add_argument("--ctx", type=int, default=4096, help="KV cache slots per row (default 4096)")
    pl.add_argument("--prompt", type=int, default=512, help="prompt tokens of the prefill (default 512)")
    pl.add_argument("--num-draft", "-K", type=int, default=3, help="drafts per step (default 3)")
    pl.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="weight and activation dtype (default: the config's)")
    pl.add_argument("--weights", default=None, metavar="TYPE",
                    help="keep the weights in a ggml block type (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, "
                         "q6_k, iq4_nl, iq4_xs, tq2_0): the matrices and tables llama-quantize --pure TYPE quantizes "
                         "(its row-size fallbacks included), dequantized next to each matmul (default: --dtype)")
    _add_cache_type_args(pl)
    pl.add_argument("--cache-type", default=None, metavar="TYPE",
                    help="K and V of every cache, trunk and MTP head (default: --dtype; -ctk, -ctv, -ctkd, -ctvd win)")
    pl.add_argument("--cache-type-draft", default=None, metavar="TYPE",
                    help="K and V of the MTP head's cache (-ctkd / -ctvd win)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=cmd_plan)

    add_quantize_parser(sub)
    add_io_parsers(sub)
    return parser


def _enable_compilation_cache() -> None:
    """Persist compiled programs across runs ($MTP_JAX_CACHE or ~/.cache/mtp-jax, /jax): a second run of the
    same command skips compilation. JAX_COMPILATION_CACHE_DIR, when set, wins. Before jax is imported this only
    sets the variables jax reads at import, so commands that never use it (quantize, info) do not import it
    (jax alone is ~135 MB of RSS, twice what llama-quantize holds)."""
    import os

    from mtp_jax.llama_cpp import cache_root

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    settings = {"jax_compilation_cache_dir": str(cache_root() / "jax"),
                "jax_persistent_cache_min_compile_time_secs": 0.5}
    jax = sys.modules.get("jax")
    for name, v in settings.items():
        if jax is not None:
            jax.config.update(name, v)
        else:
            os.environ.setdefault(name.upper(), str(v))


def main(argv: list[str] | None = None) -> int:
    import warnings

    # XLA cannot alias every donated cache buffer to an output (the NextN cache is not returned): harmless
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"mtp-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
