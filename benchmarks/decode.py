"""Plain vs MTP speculative decoding, ours and llama.cpp's, side by side in one run.

For each model (default: the embedded model; bench GGUFs from scripts/make_bench_model.py), each batch size
and each K (numbers and 'auto'), it prints and writes to JSON:

* tokens/s of our plain loop and our MTP loop (compiled, warm, best of --repeats rounds, more for short calls
  until they took MIN_SECONDS: best of 3 of a 10 ms call moved a ratio of two identical loops by ~10%), the
  measured speedup (each MTP setting timed in turn with a plain run of its own, so a slow spell of the shared
  machine falls on both) of whole calls and decode only (each side's call for 1 token, its prefill,
  subtracted), the mean accepted drafts and tokens per step;
* the cost of the pieces relative to one plain decode step, each timed as a compiled loop of in-place cache
  updates (autodraft.time_piece) on tokens that change every call, as a real loop's do (one token over and over
  routed every call to the same experts and flattered the costs): verify of K+1 tokens ("verify cost in
  decodes"), head over K+1 pairs, head over 1; and the *ideal* speedup they imply with the measured acceptance:
      ideal = tokens_per_step / (v[K+1] + h[K+1] + (K-1) h[1])
  and the same with the whole step's model work timed as one loop (autodraft.time_step: trunk over K+1, head
  catch-up, K-1 draft steps), where the pieces evict each other's weights from the cache as in the real loop
  (a piece timed alone keeps its dense weights cached: on this VM's 32 MiB L3 that flatters small models); the
  decode-only speedup as a fraction of that whole-step ideal is what the loop's own work (picking, accepting,
  rolling back) costs;
* the memory floor of those costs (``memory_floor``: the weight bytes T tokens read when each picks its experts
  independently, over one token's) and the ideal speedup at that floor, with the measured acceptance and with
  0.8 at every position: what no kernel can beat while the weights stream from DRAM. bench-l (239 MB of weights
  per token against this VM's 32 MiB L3): verify of 2 / 3 / 4 tokens >= 1.30 / 1.56 / 1.79 decodes, MTP at
  acceptance 0.8 <= 1.22 / 1.28 / 1.28x for K = 1 / 2 / 3 (the head reads the 8.4 M-parameter output matrix
  too). It is no bound where the weights fit in the cache: the embedded model (6.6 MB per token) runs from L3,
  and a piece timed alone in a loop (verify, head) keeps its weights there, so bench-m's head times at 0.16
  decodes against its 0.36 floor, bench-l's at 0.11 against 0.15: the pieces' "ideal" is optimistic by that much;
* the memory roofline at batch 1: active weight bytes per token (params.param_counts x the weights' bytes per
  parameter) / memory bandwidth, the bandwidth measured in this run (numpy copies: one thread, and one per
  core in parallel; the larger counts, read + write bytes), and our plain decode tok/s as % of it (decode only,
  as llama-bench -p 0: (N - 1) tokens / (time of N tokens - time of 1 token, which includes the prefill));
* llama.cpp on the same GGUF with the same thread count: llama-bench -n 128 -p 0 (plain) and
  llama-speculative-simple --spec-type draft-mtp per K, and the ratios ours / llama.cpp.

Writes benchmarks/results/decode.json and, with matplotlib, decode.png (else says so).

    python benchmarks/decode.py [--model M ...] [--batch 1 4 16] [--k 1 2 3 auto] [--threads N]

What the profile showed (embedded model, F16, --profile, 2026-12-04, second look): per plain step ~20% of the
thunk time was attention: XLA:CPU copied each layer's dynamic slice of the K/V stacks into a transposed layout
(copy_bitcast fusions) for its two dots (ynn fusions) and ran ~10 more small ops (mask, softmax). The mtp_attend
kernel (layers.attend_kernel) reads the stacks in place: profiled plain step 406 -> 243 us; unprofiled, alternating in
one process, embedded 0.263 -> 0.218 ms/token (median of 4), bench-m 1.61 -> 1.45 ms. What is left around the
36 kernel calls of the embedded step is ~96 small XLA ops (RoPE, cache-write indices, norms, routing): ~86 of the
243 us profiled.

Before that (bench-l, F16, jax.profiler perfetto trace per XLA thunk, 2026-12-04): the kernel calls
took ~85% of a decode step, most of them far below the bandwidth of one sequential read. A C harness reading
the same matrices showed why: on this VM a thread reading 2-8 weight rows side by side (the [K, N] layout's
8-row tiles, or 4 GGUF rows at a time) got 9-17 GB/s, one row at a time 25-33 GB/s. So a GGUF's float matrices
now load as [N, K] rows (read_gguf float_rows) and the kernel reads up to 4 rows of x one weight row at a time:
bench-l decode step 14.0 -> 8.9 ms, verify of 2 / 4 tokens 1.13 / 1.26 decodes.

Earlier (bench-m, F16, xprof traceme per XLA thunk, 2026-12-03):
* XLA:CPU ran f16 dots at ~0.6 GB/s and copied each layer's (dynamic-slice) and each routed expert's (gather)
  weights before every dot -> mtp_jax/kernels/cpu_linear.cc reads them in place (linear.py);
* the KV stacks were copied twice per layer (the old cache read beside a scatter into it) -> write the new
  block first, then attend over the cache;
* each kernel call woke a sleeping pool thread (~100 us at ~30 kernel calls per layer-step) -> spinning
  workers; lax.switch/cond in the auto loop copied the whole KV cache into each branch -> run-once whiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from mtp_jax.timing import best_seconds

RESULTS = Path(__file__).resolve().parent / "results"
MIN_SECONDS = 2.0  # short calls (the embedded model's ~10 ms) are timed in more rounds, until they took this long


def bandwidth_gbs(mb: int = 256) -> dict:
    """numpy copy bandwidth (read + write bytes) with one thread and with one thread per core, best of 5."""
    a = np.random.rand(mb * 2**20 // 8)
    b = np.empty_like(a)

    def copy(parts):
        ts = [threading.Thread(target=np.copyto, args=(b[p[0]:p[-1] + 1], a[p[0]:p[-1] + 1])) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    out = {}
    n = os.cpu_count() or 1
    for threads in sorted({1, n}):
        parts = np.array_split(np.arange(a.size), threads)
        out[f"copy_{threads}_threads"] = 2 * a.nbytes / best_seconds(partial(copy, parts), 5) / 1e9
    out["roofline"] = max(out.values())
    return out


def device_bandwidth_gbs(mb: int = 2048) -> dict:
    """Accelerator copy bandwidth (read + write bytes): a compiled x + 1 over ``mb`` MiB of float32 (many times
    any GPU's L2), best of 10."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    bw = 2 * x.nbytes / best_seconds(lambda: f(x).block_until_ready(), 10) / 1e9
    return {"device_copy": bw, "roofline": bw}


def while_iteration_us(n: int = 2000) -> float:
    """Microseconds per iteration of a compiled lax.while_loop whose body is one tiny op. XLA:GPU copies the
    loop predicate to the host after every iteration and launches the next body from there: this is that
    round trip, to set against the time of a decode step."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, m: jax.lax.while_loop(lambda c: c[0] < m, lambda c: (c[0] + 1, c[1] * 1.0001 + 1e-3),
                                                (0, x))[1])
    x = jnp.ones((256,), jnp.float32)

    def best(m: int) -> float:
        f(x, m).block_until_ready()
        return best_seconds(lambda: f(x, m).block_until_ready(), 5)

    return 1e6 * (best(n) - best(1)) / (n - 1)


def profile_summary(run, log_dir: Path, top: int = 12) -> dict:
    """Profile one call of ``run`` (warm) with jax.profiler and summarise its perfetto trace: per process (the host,
    each device), the busy time (union of its events) against the call's wall time and the events taking the most
    time; and the host <-> device copies (events named memcpy / DtoH / HtoD), where a while loop's predicate shows."""
    import gzip

    import jax

    run()
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    traces = sorted(Path(log_dir).glob("**/perfetto_trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not traces:
        return {"wall_ms": wall * 1e3, "error": "no perfetto trace written"}
    data = json.load(gzip.open(traces[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    out = {"wall_ms": wall * 1e3, "trace": str(traces[-1]), "processes": {}}
    copy = re.compile(r"memcpy|dtoh|htod|d2h|h2d", re.I)
    for pid, pname in names.items():
        xs = [e for e in events if e.get("pid") == pid and e.get("ph") == "X" and "dur" in e]
        if not xs:
            continue
        spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in xs)
        busy, end = 0.0, -1e30
        for a, b in spans:  # union of the intervals
            if b > end:
                busy += b - max(a, end)
                end = b
        by_name: dict = {}
        for e in xs:
            t, c = by_name.get(e["name"], (0.0, 0))
            by_name[e["name"]] = (t + float(e["dur"]), c + 1)
        copies = [(n, t, c) for n, (t, c) in by_name.items() if copy.search(n)]
        out["processes"][pname] = dict(
            busy_ms=busy / 1e3, span_ms=(end - spans[0][0]) / 1e3, events=len(xs),
            top=[dict(name=n[:120], ms=t / 1e3, count=c) for n, (t, c) in
                 sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
            copies=[dict(name=n[:120], ms=t / 1e3, count=c) for n, t, c in copies])
    return out


def weight_bytes_per_token(params, cfg) -> float:
    from mtp_jax.params import param_counts

    from mtp_jax.qweight import is_quant

    wq = (params.moe_layers if params.moe_layers is not None else params.dense_layers).attn.wq
    itemsize = np.dtype(wq.groups[0].dtype if is_quant(wq) else wq.dtype).itemsize  # a GGUF's float rows: QuantWeight
    return param_counts(cfg)["active_per_token"] * itemsize


def memory_floor(params, cfg):
    """(verify(T), head(T)): the weight bytes a step over T tokens must read, in decodes (one token's bytes), when
    each token picks its experts independently and uniformly: a layer then reads E * (1 - (1 - k/E)^T) distinct
    experts of E (k per token), all else once. The random-weight bench models route about so; a trained model's
    tokens share experts more. No kernel can verify for less than verify(T) on a memory-bound machine, so the
    ideal speedup at these costs bounds what MTP can reach there (the head reads its own block and, when it has
    no output matrix of its own, the trunk's)."""
    from mtp_jax.params import param_counts, routed_counts

    n, routed = param_counts(cfg), routed_counts(cfg)
    share = cfg.num_experts_per_tok / max(cfg.n_routed_experts, 1)

    def extra(t: int) -> float:  # distinct experts of T tokens minus one token's, as a fraction of all
        return (1 - (1 - share) ** t) - share

    heads = getattr(params, "nextn", None) or ()
    own_head = heads and getattr(heads[0], "shared_head_head", None) is not None
    head = n.get("nextn_active_per_token", 0) + (0 if own_head else cfg.hidden_size * cfg.vocab_size)
    one = n["active_per_token"]
    return (lambda t: (one + routed["trunk"] * extra(t)) / one,
            lambda t: (head + routed["nextn"] * extra(t)) / one)


def run_ours(params, cfg, prompts_for, batches, ks, max_new: int, repeats: int, sampling) -> list[dict]:
    from mtp_jax import autodraft
    from mtp_jax import generate as plain
    from mtp_jax import speculative

    rows = []
    v_floor, h_floor = memory_floor(params, cfg)
    for B in batches:
        prompts = prompts_for(B)
        ctx = int(np.mean([len(p) for p in prompts])) + max_new // 2
        base = plain.best_of(lambda: plain.generate(params, cfg, prompts, max_new_tokens=max_new, sampling=sampling,
                                                    eos_ids=[]), repeats, MIN_SECONDS)
        plain_tps = base.num_tokens / base.seconds
        # decode only (llama-bench -p 0 times no prompt): the N-1 tokens after the first, whose call also prefills
        first = plain.best_of(lambda: plain.generate(params, cfg, prompts, max_new_tokens=1, sampling=sampling,
                                                     eos_ids=[]), repeats, MIN_SECONDS)
        decode_tps = (base.num_tokens - first.num_tokens) / max(base.seconds - first.seconds, 1e-9)
        t1 = autodraft.time_piece(params, cfg, B, 1, False, ctx)
        piece = {}

        def cost(T, head):
            if (T, head) not in piece:
                piece[T, head] = autodraft.time_piece(params, cfg, B, T, head, ctx) / t1
            return piece[T, head]

        for K in ks:  # MTP timed in turn with a plain run of its own (best_of_each): the speedup is side by side
            pl, res = plain.best_of_each([
                lambda: plain.generate(params, cfg, prompts, max_new_tokens=max_new, sampling=sampling, eos_ids=[]),
                lambda: speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=max_new,
                                             sampling=sampling, eos_ids=[])], repeats, MIN_SECONDS)
            tps = res.num_tokens / res.seconds
            # decode only, as for plain: the prefill (and the head's) and the first token are one call's worth
            once = plain.best_of(lambda: speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=1,
                                                              sampling=sampling, eos_ids=[]), repeats, MIN_SECONDS)
            mtp_decode = (res.num_tokens - once.num_tokens) / max(res.seconds - once.seconds, 1e-9)
            plain_decode = (pl.num_tokens - first.num_tokens) / max(pl.seconds - first.seconds, 1e-9)
            row = dict(batch=B, k=K, plain_tok_s=plain_tps, plain_decode_tok_s=decode_tps, mtp_tok_s=tps,
                       plain_tok_s_beside=pl.num_tokens / pl.seconds, speedup=tps * pl.seconds / pl.num_tokens,
                       mtp_decode_tok_s=mtp_decode, decode_speedup=mtp_decode / plain_decode,
                       mean_accepted=res.stats["mean_accepted"], tokens_per_step=res.stats["mean_tokens_per_step"],
                       accept_rate_per_pos=res.stats["accept_rate_per_pos"], plain_steps=res.stats["plain_steps"],
                       t_decode_ms=t1 * 1e3,
                       identical_to_plain=(res.tokens == base.tokens) if sampling.greedy else None)
            if K != "auto":
                step = cost(K + 1, False) + cost(K + 1, True) + (K - 1) * (cost(1, True) if K > 1 else 0.0)
                floor = v_floor(K + 1) + h_floor(K + 1) + (K - 1) * (h_floor(1) if K > 1 else 0.0)
                tokens_at_08 = sum(0.8 ** i for i in range(K + 1))  # every position accepted at 0.8
                whole = autodraft.time_step(params, cfg, B, K, ctx) / t1
                row |= dict(verify_cost_in_decodes=cost(K + 1, False), head_block_cost=cost(K + 1, True),
                            head_1_cost=cost(1, True), step_cost_in_decodes=step,
                            ideal_speedup=row["tokens_per_step"] / step, whole_step_in_decodes=whole,
                            ideal_speedup_whole_step=row["tokens_per_step"] / whole,
                            decode_speedup_of_ideal=row["decode_speedup"] * whole / row["tokens_per_step"],
                            verify_floor_in_decodes=v_floor(K + 1), step_floor_in_decodes=floor,
                            floor_speedup=row["tokens_per_step"] / floor, floor_speedup_at_0_8=tokens_at_08 / floor)
            rows.append(row)
            extra = (f"  verify {row['verify_cost_in_decodes']:.2f} decodes "
                     f"(floor {row['verify_floor_in_decodes']:.2f})"
                     f"  step: pieces {step:.2f}, whole {row['whole_step_in_decodes']:.2f} decodes  ideal "
                     f"{row['ideal_speedup']:.2f}x / {row['ideal_speedup_whole_step']:.2f}x (decode only at "
                     f"{row['decode_speedup_of_ideal']:.0%} of it; at the floor "
                     f"{row['floor_speedup']:.2f}x; at acceptance 0.8 {row['floor_speedup_at_0_8']:.2f}x)"
                     if K != "auto" else f"  plain steps {row['plain_steps']}")
            print(f"  B={B:>2} K={K!s:>4}  plain {row['plain_tok_s_beside']:8.1f} tok/s  MTP {tps:8.1f} tok/s  speedup "
                  f"{row['speedup']:5.2f}x (decode only {row['decode_speedup']:5.2f}x)  tokens/step "
                  f"{row['tokens_per_step']:.2f}{extra}", flush=True)
    return rows


def _llama(tool: str, threads: int, *args) -> str:
    """A llama.cpp tool's output (stdout + stderr). --no-repack: its AMX repacking segfaults on this CPU."""
    from mtp_jax import llama_cpp

    p = subprocess.run([str(llama_cpp.bin_dir() / tool), *map(str, args), "-t", str(threads)], capture_output=True,
                       text=True, errors="replace", timeout=900)
    if p.returncode:
        raise RuntimeError(f"{tool} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout + p.stderr


def run_llama(model: str, prompt: str, ks, max_new: int, threads: int) -> dict:
    """llama-bench tg128 (plain) and llama-speculative-simple --spec-type draft-mtp per K, greedy, batch 1."""
    from mtp_jax import llama_cpp

    if not (llama_cpp.bin_dir() / "llama-bench").exists():
        print("  llama.cpp tools not built (../shared/tools/build-llama-cpp.sh): no llama.cpp comparison")
        return {}
    out = _llama("llama-bench", threads, "-m", model, "-n", 128, "-p", 0, "-r", 3, "-o", "json")
    plain_tps = float(json.loads(out[out.index("["):out.rindex("]") + 1])[0]["avg_ts"])
    res = {"plain_tok_s": plain_tps, "mtp": []}
    print(f"  llama.cpp plain (llama-bench tg128, {threads} threads): {plain_tps:.1f} tok/s")
    common = ["-m", model, "-p", prompt, "-n", max_new, "--temp", 0, "-c", 1024, "--no-repack"]
    speed = re.compile(r"decoded\s+\d+ tokens in\s+[0-9.]+ seconds, speed:\s+([0-9.]+) t/s")
    for K in [k for k in ks if k != "auto"]:
        for _ in range(2):  # once in a while (seen once in dozens of runs) its log lacked the speed line
            log = _llama("llama-speculative-simple", threads, *common, "--spec-type", "draft-mtp",
                         "--spec-draft-n-max", K)
            if m := speed.search(log):
                break
        else:
            print(f"  llama.cpp draft-mtp K={K}: no speed line in its log, twice (skipped): ...{log[-300:]!r}")
            continue
        tps = float(m.group(1))
        drafted, accepted = llama_cpp.speculative_counts(log)
        res["mtp"].append(dict(k=K, mtp_tok_s=tps, accept_rate=accepted / max(drafted, 1)))
        print(f"  llama.cpp draft-mtp K={K}: {tps:.1f} tok/s (x{tps / plain_tps:.2f} of its plain), "
              f"acceptance {accepted}/{drafted}")
    return res


def plot(results: list[dict], path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for B in sorted({row["batch"] for row in r["ours"]}):
            rs = [row for row in r["ours"] if row["batch"] == B and row["k"] != "auto"]
            line, = ax.plot([x["k"] for x in rs], [x["decode_speedup"] for x in rs], "o-",
                            label=f"B={B} measured (decode only)")
            ax.plot([x["k"] for x in rs], [x["ideal_speedup_whole_step"] for x in rs], "x--",
                    color=line.get_color(), label=f"B={B} ideal (whole step)")
            auto = [x for x in r["ours"] if x["batch"] == B and x["k"] == "auto"]
            if auto:
                ax.axhline(auto[0]["decode_speedup"], color=line.get_color(), ls=":", lw=1, label=f"B={B} auto")
        if r.get("llama", {}).get("mtp"):
            lm = r["llama"]["mtp"]
            ax.plot([x["k"] for x in lm], [x["mtp_tok_s"] / r["llama"]["plain_tok_s"] for x in lm], "s-", color="k",
                    label="llama.cpp B=1")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{r['name']}: plain at {r['roofline_pct_b1']:.0f}% of roofline", fontsize=9)
        ax.set_xlabel("K (drafted tokens per step)")
        ax.set_ylabel("speedup over plain decoding")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def load_constructed(spec: str, accept: float):
    """(cfg, params, None): a config's model with random weights whose head agrees with the trunk at ``accept``,
    in the layout load_model gives (GGUF rows where the CPU kernels run)."""
    from mtp_jax.config import load_config
    from mtp_jax.io.load import ready_params
    from mtp_jax.synthetic import constructed_params

    cfg = load_config(spec)
    params, _, _ = constructed_params(cfg, accept)
    return cfg, ready_params(params, cfg, None, (), "keep"), None


def run_profile(params, cfg, prompts, ks, max_new: int, out: Path, b1: dict) -> dict:
    """The trace summaries of one plain and one MTP call (the first numeric K) and a bare while iteration's time,
    beside the plain loop's time per token. The two perfetto traces are kept beside the JSON (``out``-plain /
    -mtp.perfetto.json.gz; open them in ui.perfetto.dev)."""
    import shutil
    import tempfile

    from mtp_jax import generate as plain
    from mtp_jax import speculative
    from mtp_jax.sampling import Sampling

    K = next((k for k in ks if k != "auto"), 1)
    tmp = tempfile.mkdtemp(prefix="mtp-jax-trace-")
    res = dict(while_iteration_us=while_iteration_us(), plain_ms_per_token=1e3 / b1["plain_decode_tok_s"], k=K)
    res["plain"] = profile_summary(lambda: plain.generate(params, cfg, prompts, max_new_tokens=max_new,
                                                          sampling=Sampling(), eos_ids=[]), Path(tmp) / "plain")
    res["mtp"] = profile_summary(lambda: speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=max_new,
                                                              sampling=Sampling(), eos_ids=[]), Path(tmp) / "mtp")
    for kind in ("plain", "mtp"):
        if "trace" in res[kind]:
            kept = out.parent / f"{out.name}-{kind}.perfetto.json.gz"
            shutil.copyfile(res[kind]["trace"], kept)
            res[kind]["trace"] = kept.name
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"  while-loop iteration {res['while_iteration_us']:.1f} us against {res['plain_ms_per_token']:.3f} ms per "
          f"plain token; busy fractions: " + ", ".join(
              f"{kind} {name} {p['busy_ms'] / max(p['span_ms'], 1e-9):.0%} of its span "
              f"({sum(c['count'] for c in p['copies'])} copies)"
              for kind in ("plain", "mtp") for name, p in res[kind].get("processes", {}).items()), flush=True)
    return res


def write_json(out: Path, results: list, bw: dict, args, t0: float) -> None:
    import jax

    meta = dict(device=str(jax.devices()[0]), backend=jax.default_backend(), platform=platform.platform(),
                cpus=os.cpu_count(), threads=args.threads, jax=jax.__version__, max_new_tokens=args.max_new_tokens,
                accept=args.accept, bandwidth_gbs=bw, seconds=time.time() - t0, date=time.strftime("%Y-%m-%d"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    tmp.replace(out.with_suffix(".json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=None,
                    help="GGUF / HF dir / orbax dir / config (default: the embedded model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", nargs="+", default=["1", "2", "3", "auto"], help="draft counts; 'auto' for --num-draft auto")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for ours and llama.cpp (default: all)")
    ap.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(argv):\n",
                    help="prompt text (every row gets it)")
    ap.add_argument("--accept", type=float, default=None,
                    help="build each --model that is a config (name or YAML) with random weights and a NextN head "
                         "that agrees with the trunk at this rate (mtp_jax/synthetic.py), in memory: no GGUF needed")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one plain and one MTP call at the first batch size (jax.profiler; trace "
                         "summary in the JSON) and time a bare while-loop iteration (the predicate's host round trip)")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument("--out", default=str(RESULTS / "decode"), help="output path prefix (.json and .png are added)")
    args = ap.parse_args(argv)
    os.environ["MTP_JAX_THREADS"] = str(args.threads)  # read by the CPU kernels when their pool starts
    import warnings

    import jax

    from mtp_jax.cli import default_model
    from mtp_jax.io.load import load_model
    from mtp_jax.sampling import Sampling

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    ks = [k if k == "auto" else int(k) for k in args.k]
    on_cpu = jax.default_backend() == "cpu"
    bw = bandwidth_gbs() if on_cpu else device_bandwidth_gbs()
    print(f"memory bandwidth ({'numpy' if on_cpu else jax.default_backend()} copy, read + write): {bw}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = []
    for model in args.model or [default_model()]:
        cfg, params, tok = load_constructed(model, args.accept) if args.accept is not None else load_model(model)
        print(f"{model} ({cfg.name}, {params.embed.dtype})", flush=True)
        ids = tok.encode(args.prompt, add_special=True) if tok else list(range(1, 33))
        rows = run_ours(params, cfg, lambda B: [ids] * B, args.batch, ks, args.max_new_tokens, args.repeats,
                        Sampling())
        bpt = weight_bytes_per_token(params, cfg)
        b1 = next(r for r in rows if r["batch"] == 1) if 1 in args.batch else rows[0]
        roof_tps = bw["roofline"] * 1e9 / bpt
        r = dict(name=cfg.name, model=str(model), weight_bytes_per_token=bpt, roofline_tok_s=roof_tps,
                 roofline_pct_b1=100 * b1["plain_decode_tok_s"] / roof_tps, ours=rows)
        print(f"  roofline {roof_tps:.1f} tok/s ({bpt / 1e6:.1f} MB of weights per token): our plain decode at "
              f"batch 1 ({b1['plain_decode_tok_s']:.1f} tok/s after the prefill) is {r['roofline_pct_b1']:.0f}% of it")
        if not args.no_llama and str(model).endswith(".gguf") and tok is not None:
            r["llama"] = lm = run_llama(str(model), args.prompt, ks, args.max_new_tokens, args.threads)
            if lm:
                r["ours_vs_llama_plain_b1"] = b1["plain_decode_tok_s"] / lm["plain_tok_s"]
                r["llama_roofline_pct"] = 100 * lm["plain_tok_s"] / roof_tps
                for x in lm["mtp"]:
                    o = next((y for y in rows if y["batch"] == 1 and y["k"] == x["k"]), None)
                    if o:
                        x["ours_vs_llama"] = o["mtp_tok_s"] / x["mtp_tok_s"]
                print(f"  ours / llama.cpp plain at B=1: {r['ours_vs_llama_plain_b1']:.2f}x "
                      f"(llama.cpp at {r['llama_roofline_pct']:.0f}% of the roofline)")
        if args.profile:
            r["profile"] = run_profile(params, cfg, [ids] * args.batch[0], ks, args.max_new_tokens, out, b1)
        results.append(r)
        write_json(out, results, bw, args, t0)  # after each model: a run cut short keeps what it measured
    print(f"wrote {out.with_suffix('.json')}; {plot(results, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
