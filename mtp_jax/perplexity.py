"""Perplexity and KL divergence as llama-perplexity computes them (tools/perplexity/perplexity.cpp, llama.cpp tree
of llama-cpp-python 0.3.36: ``perplexity()`` and ``kl_divergence()``).

Chunking: the whole text is tokenized once (BOS as the vocab says), cut into ``n_chunk = len // n_ctx`` chunks
(``--chunks`` caps it), the first token of each chunk replaced by BOS when the vocab adds one, and each chunk
scored on its second half only: the logits at positions ``first = n_ctx/2 .. n_ctx-2`` predict tokens
``first+1 .. n_ctx-1`` (``n_ctx - 1 - first`` tokens per chunk). ``n_seq`` chunks run in one trunk forward
(llama.cpp's ``n_seq = max(1, n_batch / n_ctx)`` sequences per batch).

Logits file (``--kl-divergence-base``), native little-endian as llama.cpp writes it: ``b"_logits_"``, int32 n_ctx,
int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx] (the text's tokens, BOS not substituted), then per
chunk ``n_ctx - 1 - first`` rows of ``nv = 2 * ((n_vocab + 1) / 2) + 4`` uint16: two float32 (scale, min_log_prob)
and the log-probs quantized as ``round((logit - min_logit) / scale)`` with ``min_logit = max(min, max - 16)`` and
``scale = (max - min_logit) / 65535``; a log-prob reads back as ``scale * q + min_log_prob``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import init_trunk_cache
from mtp_jax.kvquant import KVTypes
from mtp_jax.model import forward, output_weight, project_logits
from mtp_jax.params import Params

MAGIC = b"_logits_"
_HEADER = len(MAGIC) + 3 * 4  # magic, n_ctx, n_vocab, n_chunk


class LogitsFileError(ValueError):
    """A logits file (--kl-divergence-base) that cannot serve as the base; the message names the file."""


def n_scored(n_ctx: int) -> int:
    """Tokens scored per chunk: positions n_ctx/2 .. n_ctx-2 predict the next token."""
    return n_ctx - 1 - n_ctx // 2


def row_width(n_vocab: int) -> int:
    """uint16 per row of a logits file: 2 float32 + n_vocab log-probs padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def make_chunks(tokens, n_ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """Token ids -> [n_chunk, n_ctx] int32 (the text's tokens; BOS goes in at evaluation)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
                         f"the text tokenizes to only {tokens.size} tokens")
    n = tokens.size // n_ctx if max_chunks is None else min(tokens.size // n_ctx, max_chunks)
    return tokens[: n * n_ctx].reshape(n, n_ctx)


# ---- on the device ------------------------------------------------------------------------------------------------


def compress(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [..., V] -> (scale [...], min_log_prob [...], q [..., V] uint16): llama-perplexity's log_softmax()
    with a log_prob output, float32 throughout (nearest_int rounds half to even, as jnp.round)."""
    mx = logits.max(-1)
    mn = jnp.maximum(logits.min(-1), mx - 16)
    lse = jnp.log(jnp.exp(logits - mx[..., None]).sum(-1))
    scale = (mx - mn) / 65535.0
    inv = jnp.where(scale > 0, 1 / jnp.where(scale > 0, scale, 1), 0)
    q = jnp.where(logits > mn[..., None], jnp.round(inv[..., None] * (logits - mn[..., None])), 0)
    return scale, mn - mx - lse, q.astype(jnp.uint16)


def kld_terms(logits: jax.Array, targets: jax.Array, scale: jax.Array, min_lp: jax.Array,
              q: jax.Array) -> dict[str, jax.Array]:
    """Per scored token, against the base's compressed log-probs (llama-perplexity's log_softmax() with a
    kl_divergence_result): logits [..., V], targets [...], scale / min_lp [...], q [..., V] -> {nll, nll_base,
    kld, p_diff, same_top} each [...]. KLD(base || model) sums over the tokens whose base log-prob > -16."""
    mx = logits.max(-1)
    lse = jnp.log(jnp.exp(logits - mx[..., None]).sum(-1))
    at = lambda x: jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    nll = mx + lse - at(logits)
    base = scale[..., None] * q.astype(jnp.float32) + min_lp[..., None]  # base log-probs [..., V]
    nll_base = -at(base)
    lp = logits - (mx + lse)[..., None]
    kld = jnp.where(base > -16, jnp.exp(base) * (base - lp), 0).sum(-1)
    return {"nll": nll, "nll_base": nll_base, "kld": kld, "p_diff": jnp.exp(-nll) - jnp.exp(-nll_base),
            "same_top": jnp.argmax(logits, -1) == jnp.argmax(base, -1)}


@partial(jax.jit, static_argnames=("cfg", "save", "cache_types"))
def score_chunks(params: Params, chunks: jax.Array, cfg: ModelConfig, save: bool = False,
                 base: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 cache_types: KVTypes = KVTypes()) -> dict[str, jax.Array]:
    """One batch of chunks [B, T] (BOS already in) -> {"nll": [B, R]} with R = n_scored(T); ``save`` adds the
    compressed log-probs {"scale", "min_lp": [B, R], "q": [B, R, V]}; ``base`` = (scale, min_lp, q) of the base
    model adds kld_terms. Only the R scored positions go through the output matrix. With a K or V cache type
    the chunk is written into a cache of that type and attended to from it, as llama.cpp's -ctk / -ctv do."""
    B, T = chunks.shape
    first = T // 2
    cache = None
    if cache_types.k is not None or cache_types.v is not None:
        cache = init_trunk_cache(cfg, B, T, cache_types.k, cache_types.v)
    h, _, _, _ = forward(params, chunks, cache, cfg, logits="none")  # [B, T, D]
    logits = project_logits(output_weight(params), h[:, first: T - 1])  # [B, R, V] float32
    targets = chunks[:, first + 1:]  # [B, R]
    lp = jax.nn.log_softmax(logits, axis=-1)
    out = {"nll": -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]}
    if save:
        out.update(zip(("scale", "min_lp", "q"), compress(logits)))
    if base is not None:
        out.update(kld_terms(logits, targets, *base))
    return out


# ---- the evaluation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkScore:
    """One chunk's scored tokens (R = n_scored(n_ctx))."""

    nll: np.ndarray  # [R] float64
    rows: np.ndarray | None = None  # [R, row_width(V)] uint16: this chunk's part of a logits file
    kld: dict[str, np.ndarray] | None = None  # kld_terms, each [R]


def evaluate(cfg: ModelConfig, params: Params, chunks: np.ndarray, n_seq: int = 1, bos_id: int | None = None,
             save: bool = False, base: LogitsFile | None = None,
             cache_types: KVTypes = KVTypes()) -> Iterator[ChunkScore]:
    """Score chunks [n_chunk, n_ctx] (make_chunks), ``n_seq`` per trunk forward (the last batch padded, so one
    compiled shape), yielding each chunk's ChunkScore in order. ``bos_id`` replaces each chunk's first token;
    ``save`` yields the logits-file rows; ``base`` (a logits file over the same chunks) yields kld_terms;
    ``cache_types`` (its k and v) the trunk's KV cache types."""
    n_chunk, n_ctx = chunks.shape
    V = cfg.vocab_size
    R = n_scored(n_ctx)
    for i in range(0, n_chunk, n_seq):
        n = min(n_seq, n_chunk - i)
        batch = np.zeros((n_seq, n_ctx), np.int32)
        batch[:n] = chunks[i: i + n]
        if bos_id is not None:
            batch[:, 0] = bos_id
        base_in = None
        if base is not None:
            rows = np.zeros((n_seq, R, row_width(V)), "<u2")
            rows[:n] = [base.rows(i + s) for s in range(n)]
            head = rows[..., :4].copy().view("<f4")  # [n_seq, R, 2]
            base_in = (head[..., 0], head[..., 1], rows[..., 4: 4 + V])
        out = jax.device_get(score_chunks(params, jnp.asarray(batch), cfg, save, base_in, cache_types))
        for s in range(n):
            rows_out = None
            if save:
                rows_out = np.zeros((R, row_width(V)), "<u2")
                rows_out[:, :4] = np.stack([out["scale"][s], out["min_lp"][s]], -1).astype("<f4").view("<u2")
                rows_out[:, 4: 4 + V] = out["q"][s]
            kld = None if base is None else {k: np.asarray(out[k][s], np.float64) for k in
                                             ("nll", "nll_base", "kld", "p_diff", "same_top")}
            yield ChunkScore(np.asarray(out["nll"][s], np.float64), rows_out, kld)


# ---- statistics (llama-perplexity's formulas) ---------------------------------------------------------------------


def ppl_estimate(nll: np.ndarray) -> tuple[float, float]:
    """Negative log-likelihoods [N] -> (PPL, its uncertainty): perplexity()'s exp(mean) and
    PPL * sqrt((mean(nll^2) - mean^2) / (N - 1)); the uncertainty is nan where the variance is not positive."""
    nll = np.asarray(nll, np.float64)
    mean = nll.mean()
    var = (nll * nll).mean() - mean * mean
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(var / (nll.size - 1)) if var > 0 and nll.size > 1 else math.nan


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    """kl_divergence()'s mean_and_uncertainty: (mean, sqrt(var / (N - 1))), 0 for N <= 10."""
    n = x.size
    if n < 1:
        return 0.0, 0.0
    f = x.sum() / n
    df = (x * x).sum() / n - f * f
    return float(f), float(math.sqrt(df / (n - 1))) if df > 0 and n > 10 else 0.0


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    n = a.size
    return 0.0 if n < 10 else float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def kld_statistics(t: dict[str, np.ndarray]) -> dict[str, float]:
    """kld_terms over the tokens scored so far (each [N]) -> kl_divergence()'s running figures: count, ppl,
    ppl_base, cor, log_ratio (ln PPL(Q)/PPL(base)), ppl_ratio, ppl_diff, kld, dp (mean Δp), rms_dp, same_top,
    each but count and cor with its ``*_err``."""
    nll, nllb = t["nll"], t["nll_base"]
    n = nll.size
    lp, lpb = _mean_err(nll), _mean_err(nllb)
    cov = _cov(nll, nllb)
    ppl, pplb = math.exp(lp[0]), math.exp(lpb[0])
    ratio = lp[0] - lpb[0]
    ratio_err = math.sqrt(max(lp[1] ** 2 + lpb[1] ** 2 - 2 * cov, 0.0))
    kld, dp, mse = _mean_err(t["kld"]), _mean_err(t["p_diff"]), _mean_err(t["p_diff"] ** 2)
    rms = math.sqrt(mse[0])
    same = float(np.mean(t["same_top"]))
    return {
        "count": n, "ppl": ppl, "ppl_err": ppl * lp[1], "ppl_base": pplb, "ppl_base_err": pplb * lpb[1],
        "cor": cov / (lp[1] * lpb[1]) if lp[1] * lpb[1] else math.nan,
        "log_ratio": ratio, "log_ratio_err": ratio_err, "ppl_ratio": math.exp(ratio),
        "ppl_ratio_err": math.exp(ratio) * ratio_err, "ppl_diff": ppl - pplb,
        "ppl_diff_err": math.sqrt(max((ppl * lp[1]) ** 2 + (pplb * lpb[1]) ** 2 - 2 * ppl * pplb * cov, 0.0)),
        "kld": kld[0], "kld_err": kld[1], "dp": dp[0], "dp_err": dp[1],
        "rms_dp": rms, "rms_dp_err": 0.5 / rms * mse[1] if rms else 0.0,
        "same_top": same, "same_top_err": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    }


def kld_chunk_line(chunk: int, s: dict[str, float]) -> str:
    """kl_divergence()'s running line after ``chunk`` (1-based), from kld_statistics of the tokens so far."""
    return (f"{chunk:4d}    {s['ppl']:9.4f} ± {s['ppl_err']:9.4f}    {s['log_ratio']:10.5f} ± {s['log_ratio_err']:10.5f}"
            f"    {s['kld']:10.5f} ± {s['kld_err']:10.5f}    {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_err']:6.3f} %"
            f"    {100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:6.3f} %")


KLD_TABLE_HEAD = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
                  "Δp RMS            Same top p")


def kld_report(t: dict[str, np.ndarray]) -> list[str]:
    """kl_divergence()'s final statistics over all scored tokens (kld_terms, each [N]), line for line; its
    percentiles interpolate linearly between sorted values (numpy's default quantile)."""
    s = kld_statistics(t)
    label = lambda f: {1: "Maximum", .5: "Median ", 0: "Minimum"}.get(f) or f"{100 * f:4.1f}%  "  # noqa: E731
    q = lambda x, fs: [(label(f), float(np.quantile(x.astype(np.float32), f))) for f in fs]  # noqa: E731
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_err']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_err']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['log_ratio']:10.6f} ± {s['log_ratio_err']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_err']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_err']:10.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_err']:10.6f}"]
    lines += [f"{name} KLD: {v:10.6f}" for name, v in q(t["kld"], (1, .999, .99, .95, .9, .5, .1, .05, .01, .001, 0))]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['dp']:6.3f} ± {100 * s['dp_err']:5.3f} %"]
    lines += [f"{name} Δp: {100 * v:6.3f}%"
              for name, v in q(t["p_diff"], (1, .999, .99, .95, .9, .75, .5, .25, .1, .05, .01, .001, 0))]
    lines += [f"RMS Δp    : {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_err']:5.3f} %",
              f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:5.3f} %"]
    return lines


# ---- logits files -------------------------------------------------------------------------------------------------


def write_header(f, n_vocab: int, chunks: np.ndarray) -> None:
    """The head of a logits file over chunks [n_chunk, n_ctx] (the text's tokens); the rows follow, chunk by chunk."""
    n_chunk, n_ctx = chunks.shape
    f.write(MAGIC + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes() + np.asarray(chunks, "<i4").tobytes())


@dataclass(frozen=True)
class LogitsFile:
    """A validated logits file: its header and tokens; ``rows(i)`` reads chunk i's rows from disk."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32

    def rows(self, i: int) -> np.ndarray:
        """Chunk i's rows [n_scored(n_ctx), row_width(n_vocab)] uint16."""
        shape = (n_scored(self.n_ctx), row_width(self.n_vocab))
        offset = _HEADER + self.tokens.nbytes + i * math.prod(shape) * 2
        return np.fromfile(self.path, "<u2", count=math.prod(shape), offset=offset).reshape(shape)


def read_logits_file(path: str | os.PathLike, n_vocab: int) -> LogitsFile:
    """Open a logits file written by llama-perplexity --kl-divergence-base (or by us) for a model of ``n_vocab``
    logits; LogitsFileError names the file for a bad magic, a context too short to score, another vocabulary,
    token ids outside it, or a size that is not the header's (a truncated file)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER)
        if len(head) < _HEADER or head[:8] != MAGIC:
            raise LogitsFileError(f"{path}: not a llama-perplexity logits file (no {MAGIC.decode()} header)")
        n_ctx, V, n_chunk = (int(x) for x in np.frombuffer(head[8:], "<i4"))
        if n_ctx < 3 or n_chunk < 1 or V < 1:
            raise LogitsFileError(f"{path}: bad header (n_ctx {n_ctx}, n_vocab {V}, n_chunk {n_chunk})")
        if V != n_vocab:
            raise LogitsFileError(f"{path}: logits of a vocabulary of {V} tokens, the model has {n_vocab}")
        expect = _HEADER + 4 * n_chunk * n_ctx + 2 * n_chunk * n_scored(n_ctx) * row_width(V)
        size = os.fstat(f.fileno()).st_size
        if size != expect:
            raise LogitsFileError(f"{path}: {size} bytes, but its header (n_ctx {n_ctx}, n_vocab {V}, n_chunk "
                                  f"{n_chunk}) makes {expect}{' (truncated)' if size < expect else ''}")
        tokens = np.frombuffer(f.read(4 * n_chunk * n_ctx), "<i4").astype(np.int32).reshape(n_chunk, n_ctx)
    bad = (tokens < 0) | (tokens >= V)
    if bad.any():
        raise LogitsFileError(f"{path}: token ids outside the vocabulary [0, {V}): {tokens[bad][:8].tolist()}")
    return LogitsFile(path, n_ctx, V, tokens)
