"""Speculative decoding with the NextN head: draft -> verify -> accept/reject -> rollback, in ONE jit.

Prefill fills the trunk cache and the NextN cache (pairs (h_{j-1}, t_j) over the prompt). Each iteration of
the ``lax.while_loop``, per row, with L = trunk length and t_L the newest token (not yet in the trunk cache):

1. NextN catch-up + first draft: one head forward over the pending pairs at NextN slots M..L (the pairs
   (h_{j-1}, t_j) of the tokens accepted last step, the last one (h_{L-1}, t_L)) -> q_1, d_1. This is what
   llama.cpp's ``process()`` then ``draft()`` do (common/speculative.cpp, draft-mtp).
2. K-1 more single-token head forwards, each on (h_nextn of the previous step, d_i) at the next slot
   (the one head reused recursively, as llama.cpp does for GLM).
3. Verify [t_L, d_1..d_K] with one trunk forward of K+1 tokens.
4. Accept (``sampling.verify_drafts``): a drafts + one correction/bonus token c are emitted.
5. Rollback = set lengths: trunk L' = L + a + 1 (fewer when a stop id or the budget truncates); NextN M' = L + 1
   (draft-step entries are stale past it); the new pending pairs are (h_L, d_1) .. (h_{L+a}, c), fed to the head
   at the start of the next iteration.
Rows stop independently (stop ids, budget, cache full); finished rows ride along masked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import autodraft, drafter, sharding
from mtp_jax import generate as plain
from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import KVCache, init_trunk_cache
from mtp_jax.kvquant import KVTypes
from mtp_jax.linear import compute_dtype
from mtp_jax.model import forward, pad_prompts, take_last
from mtp_jax.params import Params
from mtp_jax.pytree import pytree_dataclass
from mtp_jax.sampling import Sampling, argmax, probs, sample, verify_drafts


@pytree_dataclass
class SpecState:
    trunk: KVCache  # lengths L: tokens t_0..t_{L-1} are cached
    draft: Any  # the drafter's state (drafter.py); a NextN head's cache has slots (h_{j-1}, t_j), j < M
    pend_tok: Any  # [B, K+1] pending NextN pairs for slots M..M+n_pend-1 (tokens)
    pend_h: Any  # [B, K+1, D]                                       (trunk hidden one position earlier)
    n_pend: Any  # [B]
    out: Any  # [B, N + K + 1] emitted tokens
    n_out: Any  # [B]
    done: Any  # [B] bool
    step: Any  # [] iterations run
    rng: Any
    hist: Any  # [K+1] accepted-draft count histogram over (active row, speculative step)
    pos_acc: Any  # [K] times draft position i was accepted
    reached: Any  # [K] times draft position i was verified with every earlier draft accepted
    plain_until: Any  # [] auto mode stopped drafting: plain decode steps until this step, then a probe
    probe_until: Any  # [] auto mode drafts one token and does not stop before this step (warm-up, probes)
    gap: Any  # [] the plain stretch after the next time drafting does not pay (doubles each time)
    plain_steps: Any  # [] steps run as plain decode steps
    trace: Any  # None, or dict of [max_steps, B, ...] buffers


@dataclass(frozen=True)
class _Static:
    cfg: ModelConfig
    sampling: Sampling
    num_draft: int  # K, or the most an auto step drafts
    out_len: int
    draft_sampling: bool
    trace: bool
    auto: bool = False  # choose the draft count each step (autodraft.py)
    p_min: float = 0.0  # a row stops drafting at a draft less probable than this under the head


def _pick(key: jax.Array, lg: jax.Array, c: _Static) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Head logits [B, V] -> (draft [B], q [B, V] the distribution it was drawn from, confidence [B]).

    The confidence is the head's top probability (llama.cpp's ``cur_p->data[0].p``), never the drawn draft's:
    a stop rule that looked at the draw would make the proposed drafts follow q restricted to the confident
    tokens, not q, and the acceptance test would no longer be lossless."""
    if c.draft_sampling and not c.sampling.greedy:
        q = probs(lg, c.sampling)
        return sample(key, lg, c.sampling), q, q.max(-1)
    # greedy drafts: q is one-hot (llama.cpp drafts the top candidate); confidence = softmax prob of the top
    d = argmax(lg)
    conf = 1.0 / jnp.exp(lg - lg.max(-1, keepdims=True)).sum(-1)
    return d, jax.nn.one_hot(d, lg.shape[-1], dtype=jnp.float32), conf


def _catch_up(params: Params, st: SpecState, c: _Static):
    """The drafter over the pending pairs -> (head hidden at the last one [B, 1, D], its logits, state)."""
    return drafter.of(c.cfg, c.num_draft).catch_up(params, st.draft, st.pend_h, st.pend_tok, st.n_pend, st.trunk)


def _draft(params: Params, st: SpecState, key: jax.Array, c: _Static):
    """Catch-up + K drafts. -> (drafts [B, K], q [B, K, V], n_draft [B], drafter state as catch-up left it)."""
    dr, K = drafter.of(c.cfg, c.num_draft), c.num_draft
    keys = jax.random.split(key, K)
    g, logits, state = _catch_up(params, st, c)
    caught_up = state
    drafts, qs = [], []
    for i in range(K):
        d, q, _ = _pick(keys[i], logits[:, 0], c)
        drafts.append(d)
        qs.append(q)
        if i + 1 < K:
            g, logits, state = dr.step(params, state, g, d, i + 1, st.trunk)
    B = st.n_pend.shape[0]
    return jnp.stack(drafts, 1), jnp.stack(qs, 1), jnp.full((B,), K, jnp.int32), dr.commit(state, caught_up)


def _draft_auto(params: Params, st: SpecState, key: jax.Array, k: jax.Array, c: _Static):
    """Catch-up + up to k drafts per row, a row stopping at its first draft below p_min; head steps stop when
    no active row drafts on. -> (drafts [B, K] (junk past n_draft), q [B, K, V], n_draft [B], drafter state)."""
    dr, K = drafter.of(c.cfg, c.num_draft), c.num_draft
    keys = jax.random.split(key, K)
    g, logits, state = _catch_up(params, st, c)
    caught_up = state
    d, q, conf = _pick(keys[0], logits[:, 0], c)
    go = ~st.done & (conf >= c.p_min)
    B, V = q.shape
    drafts = jnp.zeros((B, K), jnp.int32).at[:, 0].set(d)
    qs = jnp.zeros((B, K, V), jnp.float32).at[:, 0].set(jnp.where(go[:, None], q, 0.0))

    def cond(s):
        i, _, _, _, _, go, _ = s
        return (i < k) & jnp.any(go)

    def body(s):
        i, g, state, drafts, qs, go, n = s
        g, lg, state = dr.step(params, state, g, drafts[:, i - 1], i, st.trunk)
        d, q, conf = _pick(keys[i], lg[:, 0], c)
        go = go & (conf >= c.p_min)
        drafts = drafts.at[:, i].set(d)
        qs = qs.at[:, i].set(jnp.where(go[:, None], q, 0.0))
        return i + 1, g, state, drafts, qs, go, n + go

    _, _, state, drafts, qs, _, n = jax.lax.while_loop(
        cond, body, (jnp.int32(1), g, state, drafts, qs, go, go.astype(jnp.int32)))
    return drafts, qs, jnp.minimum(n, k), dr.commit(state, caught_up)


def _once(pred: jax.Array, fn, carry):
    """fn(carry) if pred else carry, as a while loop that runs 0 or 1 times: unlike lax.cond/switch, XLA keeps
    a while loop's carried buffers (the KV caches) in place instead of copying them into each branch."""
    return jax.lax.while_loop(lambda s: s[0], lambda s: (jnp.bool_(False), fn(s[1])), (pred, carry))[1]


def _verify_auto(params: Params, trunk: KVCache, last, drafts, n_draft, done, c: _Static):
    """One trunk forward over [t_L, d_1..d_T-1], T = 1 + the most drafts an active row made (one of K+1
    compiled lengths, so a short draft costs a short verify). Outputs padded to K+1 positions."""
    K, B = c.num_draft, last.shape[0]
    T_run = 1 + jnp.max(jnp.where(done, 0, n_draft))

    def length(T):
        def run(carry):
            trunk, _, _ = carry
            hv, lg, trunk, _ = forward(params, jnp.concatenate([last[:, None], drafts[:, :T - 1]], 1), trunk,
                                       c.cfg, logits="all")
            pad = ((0, 0), (0, K + 1 - T), (0, 0))
            return trunk, jnp.pad(hv, pad), jnp.pad(lg, pad)
        return run

    carry = (trunk, jnp.zeros((B, K + 1, c.cfg.hidden_size), compute_dtype(c.cfg.dtype)),
             jnp.zeros((B, K + 1, c.cfg.vocab_size), jnp.float32))
    for T in range(1, K + 2):
        carry = _once(T_run == T, length(T), carry)
    trunk, hv, logits = carry
    return hv, logits, trunk


def _finish(st: SpecState, drafts, n_draft, n_acc, nxt, hv, trunk, draft, stops, max_new, c: _Static,
            plain_step: bool = False) -> SpecState:
    """Emit the accepted drafts and the correction/bonus token, roll back by lengths, update the statistics."""
    K = c.num_draft
    B = st.n_out.shape[0]
    j = jnp.arange(K + 1)[None, :]
    emitted = jnp.where(j < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])  # [B, K+1]
    # truncate at the first stop id and at the budget
    stop_at = jnp.where(plain.is_stop(emitted, stops) & (j <= n_acc[:, None]), j, K + 1).min(1)
    n_emit = jnp.minimum(jnp.minimum(n_acc + 1, stop_at + 1), max_new - st.n_out)
    active = ~st.done
    L = st.trunk.lengths
    S = st.trunk.size
    L_new = L + n_emit  # t_L and the emitted tokens but the newest are cached (== L + a + 1 unless truncated)
    n_out = st.n_out + jnp.where(active, n_emit, 0)
    done = st.done | (active & ((stop_at <= n_acc) | (n_out >= max_new) | (L_new + K + 1 > S)))
    rows = jnp.arange(B)[:, None]
    cols = jnp.where(active[:, None], st.n_out[:, None] + j, st.out.shape[1])  # inactive rows write nowhere
    out = st.out.at[rows, cols].set(emitted, mode="drop")
    keep = lambda new, old: jnp.where(active.reshape(-1, *([1] * (new.ndim - 1))), new, old)  # noqa: E731
    counted = active & ~plain_step
    hist = st.hist.at[n_acc].add(counted.astype(jnp.int32))
    pos = jnp.arange(K)[None, :]
    pos_acc = st.pos_acc + ((pos < n_acc[:, None]) & counted[:, None]).sum(0)
    reached = st.reached + ((pos <= n_acc[:, None]) & (pos < n_draft[:, None]) & counted[:, None]).sum(0)
    trace = st.trace
    if trace is not None:
        i = st.step
        trace = {"drafts": trace["drafts"].at[i].set(drafts),
                 "n_draft": trace["n_draft"].at[i].set(n_draft),
                 "n_acc": trace["n_acc"].at[i].set(jnp.where(active, n_acc, -1)),
                 "start": trace["start"].at[i].set(st.n_out),
                 "n_emit": trace["n_emit"].at[i].set(jnp.where(active, n_emit, 0))}
    return SpecState(
        trunk=trunk.with_lengths(keep(L_new, L)),
        draft=drafter.of(c.cfg, c.num_draft).keep(draft, st.draft, active),
        pend_tok=keep(emitted, st.pend_tok),  # (h_{L+j}, emitted_j) pairs for slots L+1 .. L+a+1
        pend_h=keep(hv, st.pend_h),
        n_pend=keep(n_acc + 1, st.n_pend),
        out=out, n_out=n_out, done=done, step=st.step + 1, rng=st.rng, hist=hist, pos_acc=pos_acc, reached=reached,
        plain_until=st.plain_until, probe_until=st.probe_until, gap=st.gap,
        plain_steps=st.plain_steps + plain_step,
        trace=trace,
    )


def _newest(st: SpecState) -> jax.Array:
    """[B] t_L, the newest emitted token of each row (the last pending pair's token, not yet in the trunk)."""
    return jnp.take_along_axis(st.pend_tok, (st.n_pend - 1)[:, None], axis=1)[:, 0]


def _spec_step(params: Params, stops, max_new, costs, c: _Static, st: SpecState) -> SpecState:
    cfg, K = c.cfg, c.num_draft
    rng, k_draft, k_acc = jax.random.split(st.rng, 3)
    last = _newest(st)
    if c.auto:
        k, _ = autodraft.choose(st.pos_acc, st.reached, costs, K)
        k = jnp.where(st.step < st.probe_until, 1, k)  # warm up / probe with one draft: the cheapest way to learn
        with jax.named_scope("draft"):
            drafts, q, n_draft, draft = _draft_auto(params, st, k_draft, k, c)
        with jax.named_scope("verify"):
            hv, logits, trunk = _verify_auto(params, st.trunk, last, drafts, n_draft, st.done, c)
    else:
        with jax.named_scope("draft"):
            drafts, q, n_draft, draft = _draft(params, st, k_draft, c)
        with jax.named_scope("verify"):
            hv, logits, trunk, _ = forward(params, jnp.concatenate([last[:, None], drafts], 1), st.trunk, cfg,
                                           logits="all")
    with jax.named_scope("accept"):
        n_acc, nxt = verify_drafts(k_acc, logits, q, drafts, c.sampling, n_draft=n_draft if c.auto else None)
    new = dataclasses.replace(_finish(st, drafts, n_draft, n_acc, nxt, hv, trunk, draft, stops, max_new, c), rng=rng)
    if c.auto:  # with this step's outcome counted: stop drafting for a stretch when even the best k does not pay
        _, ratio = autodraft.choose(new.pos_acc, new.reached, costs, K)
        stop = (new.step >= new.probe_until) & (ratio < 1.0)
        new = dataclasses.replace(new, plain_until=jnp.where(stop, new.step + new.gap, new.plain_until),
                                  gap=jnp.where(stop, jnp.minimum(2 * new.gap, autodraft.PROBE_MAX), new.gap))
    return new


def _plain_step(params: Params, stops, max_new, c: _Static, st: SpecState) -> SpecState:
    """Auto mode once drafting does not pay: one trunk token per step, the head no longer run."""
    rng, key = jax.random.split(st.rng)
    B, K = st.pend_tok.shape[0], c.num_draft
    with jax.named_scope("decode"):
        hv, lg, trunk, _ = forward(params, _newest(st)[:, None], st.trunk, c.cfg, logits="last")
    nxt = sample(key, lg[:, 0], c.sampling)
    zeros = jnp.zeros((B,), jnp.int32)
    hv = jnp.pad(hv, ((0, 0), (0, K), (0, 0)))
    new = _finish(st, jnp.zeros((B, K), jnp.int32), zeros, zeros, nxt, hv, trunk, st.draft, stops, max_new, c,
                  plain_step=True)
    return dataclasses.replace(new, rng=rng)


@partial(jax.jit, static_argnames=("c",), donate_argnames=("trunk", "draft"))
def _spec_loop(params: Params, tokens, n_valid, trunk: KVCache, draft, rng, max_new, stops, costs, prior,
               c: _Static):
    cfg, K = c.cfg, c.num_draft
    B = tokens.shape[0]
    with jax.named_scope("prefill"):
        h, logits, trunk, _ = forward(params, tokens, trunk, cfg, n_valid=n_valid, logits="last")
        draft = drafter.of(cfg, K).prefill(params, draft, h, tokens, n_valid, trunk)
    rng, k0 = jax.random.split(rng)
    first = sample(k0, logits[:, 0], c.sampling)
    pend_tok = jnp.zeros((B, K + 1), jnp.int32).at[:, 0].set(first)
    pend_h = jnp.zeros((B, K + 1, cfg.hidden_size), h.dtype).at[:, 0].set(take_last(h, n_valid)[:, 0])
    live = max_new > 0
    trace = None
    if c.trace:
        trace = {"drafts": jnp.zeros((c.out_len, B, K), jnp.int32), "n_draft": jnp.zeros((c.out_len, B), jnp.int32),
                 "n_acc": jnp.full((c.out_len, B), -1, jnp.int32),
                 "start": jnp.zeros((c.out_len, B), jnp.int32), "n_emit": jnp.zeros((c.out_len, B), jnp.int32)}
    st = SpecState(
        trunk=trunk, draft=draft, pend_tok=pend_tok, pend_h=pend_h, n_pend=jnp.ones((B,), jnp.int32),
        out=jnp.zeros((B, c.out_len + K + 1), jnp.int32).at[:, 0].set(first), n_out=live.astype(jnp.int32),
        done=~live | plain.is_stop(first, stops) | (max_new <= 1) | (trunk.lengths + K + 1 > trunk.size),
        step=jnp.int32(0), rng=rng, hist=jnp.zeros((K + 1,), jnp.int32), pos_acc=prior[0],
        reached=prior[1], plain_until=jnp.int32(0), probe_until=jnp.int32(autodraft.WARMUP_STEPS),
        gap=jnp.int32(autodraft.PROBE_FIRST), plain_steps=jnp.int32(0), trace=trace,
    )
    running = lambda s: (s.step < c.out_len) & ~jnp.all(s.done)  # noqa: E731
    drafting = lambda s: running(s) & (s.step >= s.plain_until)  # noqa: E731
    spec_step = partial(_spec_step, params, stops, max_new, costs, c)
    st = jax.lax.while_loop(drafting, spec_step, st)
    if c.auto:  # drafting stopped paying: a stretch of plain decode steps, then a probe (drafting again, decided
        # anew after each step), as loops inside a loop: a cond would copy the KV caches into its branches

        def stretch(s: SpecState) -> SpecState:
            s = jax.lax.while_loop(lambda s: running(s) & (s.step < s.plain_until),
                                   partial(_plain_step, params, stops, max_new, c), s)
            probe = dataclasses.replace(s, probe_until=s.step + autodraft.WARMUP_STEPS)
            return jax.lax.while_loop(drafting, spec_step, probe)

        st = jax.lax.while_loop(running, stretch, st)
    return st.out, st.n_out, st.trunk, st.draft, st.step, st.hist, st.pos_acc, st.reached, st.plain_steps, st.trace


AUTO_MAX_DRAFT = 4  # the most an auto step drafts (its verify is compiled for each length 1..5)


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft: int | str = 2,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] | None = None,
    stop: Sequence[int] | None = None,
    seed: int = 0,
    cache_size: int | None = None,
    draft_sampling: bool = False,
    trace: str | os.PathLike | bool | None = None,
    return_cache: bool = False,
    p_min: float | None = None,
    max_draft: int = AUTO_MAX_DRAFT,
    costs: np.ndarray | None = None,
    cache_types: KVTypes = KVTypes(),
    acceptance_prior: tuple[Sequence[int], Sequence[int]] | None = None,
) -> plain.GenerateResult:
    """MTP speculative decoding of a batch of prompts. ``num_draft=0`` is plain decoding.

    ``num_draft="auto"``: each step drafts up to ``max_draft`` tokens, the count chosen from the measured
    acceptance and piece costs (``costs``, default ``autodraft.measure_costs``), each row stopping at a draft
    whose head top probability is below ``p_min`` (default 0 = off, as llama.cpp's --draft-p-min); see autodraft.py.

    ``trace``: a path (or env MTP_JAX_TRACE) gets an NDJSON line per row per step (step, row, drafted ids,
    accepted count, emitted ids), written on the host after the loop; ``True`` keeps it in the result only.
    A row's first token comes from the prefill; the trace's emitted ids are the rest of its output.
    ``stats`` of the result: accept_hist (0..K), per-position acceptance rate, mean tokens per step,
    trunk forwards (prefill + verify steps), plain_steps (auto mode while drafting did not pay).
    ``acceptance_prior``: (accepted, reached) counts per draft position that auto mode starts from, e.g. an
    earlier result's ``stats["accepted_per_pos"], stats["reached_per_pos"]`` (the counts this call measured).
    ``cache_types``: the trunk's (k, v) and the drafter's (k_draft, v_draft) KV cache types. ``return_cache``:
    the trunk cache in ``stats["cache"]``, the drafter's state in ``stats["draft_cache"]``.
    """
    auto = num_draft == "auto"
    if not auto and (not isinstance(num_draft, (int, np.integer)) or num_draft < 0):
        raise ValueError(f"num_draft must be 'auto' or an integer >= 0, got {num_draft!r}")
    if auto and (params.nextn is None or not cfg.has_mtp):
        num_draft = 0  # auto on a model without a head: plain decoding
    if num_draft == 0:
        return plain.generate(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                              eos_ids=eos_ids, stop=stop, seed=seed, cache_size=cache_size, return_cache=return_cache,
                              cache_types=cache_types)
    if params.nextn is None or not cfg.has_mtp:
        raise ValueError("speculative decoding needs a model with a NextN layer (num_nextn_predict_layers > 0)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    p_min = 0.0 if p_min is None else float(p_min)
    if not 0.0 <= p_min <= 1.0:
        raise ValueError(f"p_min must be in [0, 1], got {p_min}")
    K = max_draft if auto else int(num_draft)
    if K < 1:
        raise ValueError(f"max_draft must be >= 1, got {K}")
    K = min(K, drafter.of(cfg).max_drafts or K)  # chained heads: one head per draft (llama.cpp caps n_max too)
    trace = trace if trace is not None else os.environ.get("MTP_JAX_TRACE")
    tokens, lens = pad_prompts(prompts, cfg)
    size = plain.plan_cache(lens, max_new_tokens, cache_size, extra=K + 1)
    B = len(lens)
    if auto and costs is None:
        costs = autodraft.measure_costs(params, cfg, B, K, cache_types=cache_types)
    costs = jnp.asarray(np.ones((2, K + 2), np.float32) if costs is None else costs, jnp.float32)
    if auto and not bool(autodraft.can_pay(costs, K)):  # not even a good head would pay: the plain loop
        res = plain.generate(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                             stop=stop, seed=seed, cache_size=cache_size, return_cache=return_cache,
                             cache_types=cache_types)
        longest = max(map(len, res.tokens))
        res.stats |= {"num_draft": "auto", "accept_hist": [0] * (K + 1), "accept_rate_per_pos": [0.0] * K,
                      "accept_rate_given_reached": [0.0] * K, "mean_accepted": 0.0, "mean_tokens_per_step": 1.0,
                      "trunk_forwards": longest, "row_steps": 0, "plain_steps": max(longest - 1, 0),
                      "plain_loop": True}
        return res
    prior = np.zeros((2, K), np.int32)
    if acceptance_prior is not None:
        a = np.asarray(acceptance_prior, np.int64)
        if a.ndim != 2 or a.shape[0] != 2 or (a < 0).any() or (a[0] > a[1]).any():
            raise ValueError("acceptance_prior must be (accepted, reached) counts per draft position, "
                             "0 <= accepted <= reached")
        n = min(K, a.shape[1])
        prior[:, :n] = a[:, :n]
    c = _Static(cfg, sampling, K, max_new_tokens, draft_sampling, bool(trace), auto, p_min)
    mesh = sharding.mesh_of(params)  # sharded params: rows and caches go on the same mesh (rows on data)
    toks, n_valid, budget, trunk, draft = sharding.place_rows(
        (jnp.asarray(tokens), jnp.asarray(lens), jnp.full((B,), max_new_tokens, jnp.int32),
         init_trunk_cache(cfg, B, size, cache_types.k, cache_types.v),
         drafter.of(cfg, K).init_cache(B, size, cache_types.k_draft, cache_types.v_draft)), mesh)
    t0 = time.perf_counter()
    out, n_out, trunk, draft, steps, hist, pos_acc, reached, plain_steps, tr = sharding.run_synced(
        _spec_loop, params, toks, n_valid, trunk, draft, jax.random.key(seed), budget,
        jnp.asarray(plain.stop_array(cfg, eos_ids, stop)), costs, (jnp.asarray(prior[0]), jnp.asarray(prior[1])), c=c)
    out, n_out, hist, pos_acc, reached, tr = sharding.to_host((out, n_out, hist, pos_acc, reached, tr))
    pos_acc, reached = np.asarray(pos_acc) - prior[0], np.asarray(reached) - prior[1]  # this call's counts
    seconds = time.perf_counter() - t0
    rows = [out[b, : n_out[b]].tolist() for b in range(B)]
    row_steps = int(hist.sum())
    stats = {
        "num_draft": "auto" if auto else K,
        "accept_hist": hist.tolist(),
        "accept_rate_per_pos": (pos_acc / max(row_steps, 1)).tolist(),
        "accept_rate_given_reached": (pos_acc / np.maximum(reached, 1)).tolist(),
        "accepted_per_pos": pos_acc.tolist(),
        "reached_per_pos": reached.tolist(),
        "mean_accepted": float((hist * np.arange(K + 1)).sum() / max(row_steps, 1)),
        "mean_tokens_per_step": float((hist * (np.arange(K + 1) + 1)).sum() / max(row_steps, 1)),
        "trunk_forwards": int(steps) + 1,
        "row_steps": row_steps,
        "plain_steps": int(plain_steps),
    }
    res = plain.GenerateResult(rows, seconds, stats)
    if tr is not None:
        res.stats["trace"] = lines = _trace_lines(tr, out)
        if not isinstance(trace, bool):
            _write_ndjson(trace, lines)
    if return_cache:
        res.stats["cache"], res.stats["draft_cache"] = trunk, draft
    return res


def _trace_lines(tr: dict[str, np.ndarray], out: np.ndarray) -> list[dict]:
    lines = []
    for step in range(tr["n_acc"].shape[0]):
        for row in range(tr["n_acc"].shape[1]):
            a = int(tr["n_acc"][step, row])
            if a < 0:
                continue
            s, n = int(tr["start"][step, row]), int(tr["n_emit"][step, row])
            drafted = tr["drafts"][step, row][: tr["n_draft"][step, row]].tolist()
            lines.append({"step": step, "row": row, "drafted": drafted, "accepted": a,
                          "emitted": out[row, s: s + n].tolist()})
    return lines


def _write_ndjson(path: str | os.PathLike, lines: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)
