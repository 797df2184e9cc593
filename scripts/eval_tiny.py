"""Evaluate the model trained by train_tiny.py on the held-out stdlib files (never trained on).

1. Teacher-forced, over all held-out tokens in non-overlapping windows of --seq-len: the trunk's loss
   (nats/token), perplexity and top-1 accuracy; the NextN head's loss, perplexity and top-1 accuracy at
   predicting t_{j+2} from (h_j, t_{j+1}) (window position 0, paired with a zero hidden, is skipped), and
   how often its top-1 equals the trunk's top-1 for the same token (what greedy K=1 acceptance tests).
2. MTP speculative decoding (mtp_jax.speculative.generate) on --prompts held-out prompts of --prompt-len
   tokens, --new-tokens new tokens each, EOS ignored so every row decodes the full budget; for K in --ks,
   greedy and temperature --temperature (greedy drafts, lossless rejection sampling as in llama.cpp):
   mean accepted drafts, tokens per trunk forward, the acceptance histogram; and the wall time against
   plain decoding (mtp_jax.generate) measured side by side in this process after a warm-up call of each
   (the first call compiles): the prompts as one batch, and one at a time (batch 1, the latency case).
   Greedy speculative output is checked token for token against plain greedy output.

Writes --json (default benchmarks/results/tiny_model_eval.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer

from mtp_jax import generate as plain
from mtp_jax import speculative
from mtp_jax.config import ModelConfig
from mtp_jax.io.load import load_model
from mtp_jax.model import forward
from mtp_jax.mtp import nextn_forward, shift_hidden
from mtp_jax.params import Params, param_counts
from mtp_jax.sampling import Sampling
from train_tiny import load_params, read_texts, split_files, stdlib_files

EOT_ID = 0  # <|endoftext|>, appended after each file as in training


@partial(jax.jit, static_argnames="cfg")
def _window_sums(params, window, weight, cfg: ModelConfig):
    """window [B, T+1], weight [B] (0 = padding row) -> sums of per-token metrics over the batch."""
    tokens, targets = window[:, :-1], window[:, 1:]
    h, logits, _, _ = forward(params, tokens, None, cfg)
    _, mlog, _, _ = nextn_forward(params, shift_hidden(h), tokens, None, cfg)
    w = weight[:, None]
    trunk_top, head_top = logits.argmax(-1), mlog[:, 1:].argmax(-1)  # [B, T], [B, T-1]
    ce = optax.softmax_cross_entropy_with_integer_labels
    return {
        "trunk_nll": (ce(logits, targets) * w).sum(),
        "trunk_top1": ((trunk_top == targets) * w).sum(),
        "head_nll": (ce(mlog[:, 1:], targets[:, 1:]) * w).sum(),
        "head_top1": ((head_top == targets[:, 1:]) * w).sum(),
        "head_agrees_trunk": ((head_top == trunk_top[:, 1:]) * w).sum(),
    }


def teacher_forced(params, cfg: ModelConfig, data: np.ndarray, seq_len: int, batch: int) -> dict:
    """Metrics over all non-overlapping windows of data [N] (the last partial batch padded, weight 0)."""
    n = (data.size - 1) // seq_len
    windows = np.stack([data[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    pad = -n % batch
    windows = np.concatenate([windows, np.repeat(windows[:1], pad, 0)])
    weight = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
    tot: dict[str, float] = {}
    for i in range(0, windows.shape[0], batch):
        sums = _window_sums(params, jnp.asarray(windows[i: i + batch]), jnp.asarray(weight[i: i + batch]), cfg)
        for k, v in sums.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    nt, nh = n * seq_len, n * (seq_len - 1)
    return {
        "windows": n, "tokens": nt,
        "trunk": {"loss_nats_per_token": tot["trunk_nll"] / nt, "perplexity": float(np.exp(tot["trunk_nll"] / nt)),
                  "top1": tot["trunk_top1"] / nt},
        "nextn_head_t_plus_2": {"loss_nats_per_token": tot["head_nll"] / nh,
                                "perplexity": float(np.exp(tot["head_nll"] / nh)), "top1": tot["head_top1"] / nh,
                                "top1_equals_trunk_top1": tot["head_agrees_trunk"] / nh},
    }


def _timed_pair(params, cfg, prompts, k, sampling, new_tokens) -> tuple[float, float, object, object]:
    """Plain then speculative on the same prompts -> (plain s, spec s, plain result, spec result)."""
    common = dict(max_new_tokens=new_tokens, sampling=sampling, eos_ids=[], seed=0)
    p = plain.generate(params, cfg, prompts, **common)
    s = speculative.generate(params, cfg, prompts, num_draft=k, **common)
    return p.seconds, s.seconds, p, s


def _speed(rows: int, tokens: int, t_plain: float, t_spec: float) -> dict:
    return {"rows": rows, "plain_s": t_plain, "spec_s": t_spec, "speedup": t_plain / t_spec,
            "plain_tok_per_s": tokens / t_plain, "spec_tok_per_s": tokens / t_spec}


def speculative_eval(params, cfg: ModelConfig, prompts: list[list[int]], ks: list[int], temperature: float,
                     new_tokens: int) -> list[dict]:
    rows = []
    for temp in (0.0, temperature):
        sampling = Sampling(temperature=temp)
        for k in ks:
            _timed_pair(params, cfg, prompts, k, sampling, new_tokens)  # warm-up (compiles batch B)
            _timed_pair(params, cfg, prompts[:1], k, sampling, new_tokens)  # warm-up (compiles batch 1)
            t_plain, t_spec, res_p, res_s = _timed_pair(params, cfg, prompts, k, sampling, new_tokens)
            b1 = [_timed_pair(params, cfg, [p], k, sampling, new_tokens)[:2] for p in prompts]
            t1_plain, t1_spec = (sum(x) for x in zip(*b1))
            st = res_s.stats
            rows.append({
                "num_draft": k, "temperature": temp,
                "mean_accepted": st["mean_accepted"], "mean_tokens_per_step": st["mean_tokens_per_step"],
                "accept_hist": st["accept_hist"], "accept_rate_per_pos": st["accept_rate_per_pos"],
                "greedy_output_equals_plain": res_s.tokens == res_p.tokens if temp == 0.0 else None,
                "batch": _speed(len(prompts), res_p.num_tokens, t_plain, t_spec),
                "batch1": _speed(1, res_p.num_tokens, t1_plain, t1_spec),
            })
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"K={r['num_draft']} T={r['temperature']:<4} accepted/step={r['mean_accepted']:.3f} "
            f"tokens/step={r['mean_tokens_per_step']:.3f} hist={r['accept_hist']} "
            f"speedup b{r['batch']['rows']}={r['batch']['speedup']:.2f}x b1={r['batch1']['speedup']:.2f}x"
            + ("" if r["greedy_output_equals_plain"] is None else f" lossless={r['greedy_output_equals_plain']}"))


def held_out_prompts(data: np.ndarray, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens at evenly spaced offsets of the held-out stream."""
    starts = np.linspace(0, data.size - length - 1, n).astype(int)
    return [data[s: s + length].tolist() for s in starts]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def load(model: Path) -> tuple[ModelConfig, Params, Callable[[str], list[int]]]:
    """(cfg, float32 params, text -> ids) from a GGUF file (its embedded vocabulary) or a train_tiny final/."""
    if model.suffix == ".gguf":
        cfg, params, tok = load_model(model, dtype="float32")
        return cfg, params, lambda text: tok.encode(text, add_special=False)
    cfg, params = load_params(model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    return cfg, params, lambda text: tok.encode(text).ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--model", default=".train/final",
                    help="the GGUF written by train_tiny.py --export, or the final/ directory it was written from")
    ap.add_argument("--seq-len", type=int, default=256, help="window length of the teacher-forced evaluation")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts (one batch)")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], help="draft lengths K")
    ap.add_argument("--temperature", type=float, default=0.7, help="the sampled setting (greedy is always run)")
    ap.add_argument("--json", default="benchmarks/results/tiny_model_eval.json", help="where the results go")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")  # the NextN cache is not returned

    cfg, params, encode = load(Path(a.model))
    _, held_files = split_files(stdlib_files())
    held = np.asarray([i for text in read_texts(held_files) for i in encode(text) + [EOT_ID]], np.int32)

    t0 = time.perf_counter()
    tf = teacher_forced(params, cfg, held, a.seq_len, a.batch)
    print(json.dumps(tf, indent=1), flush=True)
    prompts = held_out_prompts(held, a.prompts, a.prompt_len)
    spec = speculative_eval(params, cfg, prompts, a.ks, a.temperature, a.new_tokens)
    result = {
        "model": {"name": cfg.name, "params": param_counts(cfg), "path": a.model},
        "held_out": {"files": [f.name for f in held_files], "tokens": int(held.size)},
        "teacher_forced": tf,
        "speculative": {"prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                        "eos": "ignored", "drafts": "greedy (argmax of the head), lossless acceptance",
                        "runs": spec},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "load_avg_at_end": os.getloadavg()},
        "wall_s": time.perf_counter() - t0,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"\nheld-out {tf['tokens']} tokens: trunk {tf['trunk']['loss_nats_per_token']:.3f} nats/token "
          f"(ppl {tf['trunk']['perplexity']:.2f}, top-1 {tf['trunk']['top1']:.3f}); NextN head t+2 "
          f"{tf['nextn_head_t_plus_2']['loss_nats_per_token']:.3f} nats/token "
          f"(top-1 {tf['nextn_head_t_plus_2']['top1']:.3f}, = trunk top-1 "
          f"{tf['nextn_head_t_plus_2']['top1_equals_trunk_top1']:.3f})")
    for r in spec:
        print(_row(r))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
