"""``--num-draft auto``: how many tokens to draft, chosen inside the compiled loop from measured numbers.

Two rules (speculative.py applies them every step):

* **confidence** (llama.cpp's ``--draft-p-min``): a row stops drafting at the first draft whose probability
  under the head is below ``p_min``; rows of a batch draft different counts and the verify covers the most
  any active row drafted.
* **expected gain**: with per-position acceptance rates r_i estimated from the steps so far (Laplace prior)
  and the measured cost of a verify of T tokens, v[T], of a head forward over T pairs, h[T], and of the
  step's own work o (sampling, acceptance, bookkeeping), all in units of one plain decode step, drafting k
  tokens yields E(k) = 1 + r_0 + r_0 r_1 + ... tokens for v[k+1] + h[k+1] + (k-1) h[1] + o decodes. When
  no k would pay even at a good head's acceptance (PLAUSIBLE_ACCEPTANCE per position), generate() runs the
  plain loop. Else
  the first WARMUP_STEPS steps draft one token; after that the loop drafts the k that maximizes
  E(k) / cost(k). When the best ratio is below 1 it runs a stretch of plain decode steps (PROBE_FIRST, doubling
  each time up to PROBE_MAX), then probes: it drafts one token for WARMUP_STEPS steps again, then decides after
  each step as before. A few unlucky
  warm-up steps thus cost a stretch, not the call, and a head that never pays costs one step per stretch.

``measure_costs`` times the pieces once per (model, batch, k_max) on the device in use (compiled loops of
each piece on a cache, as inside the real loops) and keeps the result for the process.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import drafter, sharding
from mtp_jax.config import ModelConfig
from mtp_jax.kvcache import init_trunk_cache
from mtp_jax.kvquant import KVTypes
from mtp_jax.model import forward
from mtp_jax.sampling import argmax
from mtp_jax.timing import best_seconds

WARMUP_STEPS = 3  # steps that draft one token to measure acceptance before the loop may stop drafting (and per probe)
PROBE_FIRST = 8  # plain decode steps after drafting first stops paying, before a probe drafts again
PROBE_MAX = 128  # the stretch doubles after each probe that does not pay, up to this
PLAUSIBLE_ACCEPTANCE = 0.8  # drafting is tried (warm-up, probes) only if it would pay at this acceptance per
# position, a good head's: where even that cannot pay for the steps (the embedded model's steps cost ~3 decodes for
# K=1 on a 2-core CPU), a warm-up and probes only lose time, and the plain loop runs from the start


def _tokens(cfg: ModelConfig, B: int, T: int, i: jax.Array) -> jax.Array:
    """[B, T] token ids that differ by row, position and iteration i, as a real loop's do: a MoE routes each to its
    own experts. Timing one token over and over would route every call to the same experts, whose weights then
    stay in the CPU's cache, and a verify block of equal tokens reads each expert once: both flatter the costs."""
    idx = (i * B + jnp.arange(B)[:, None]) * T + jnp.arange(T)[None, :]
    return ((idx * 40503 + 7) % cfg.vocab_size).astype(jnp.int32)  # 40503: an odd multiplier, a walk over V


@partial(jax.jit, static_argnames=("cfg", "T", "head", "n"))
def repeat_piece(params, cache, cfg: ModelConfig, T: int, head: bool, n: int, trunk=None):
    """n compiled calls of one piece (trunk or head forward over T tokens) on a cache, lengths reset each time
    (``trunk``: the trunk cache a head reads, for a drafter that attends into it: Gemma-4's assistant)."""
    B = cache.lengths.shape[0]
    L = cache.lengths
    h = jnp.zeros((B, T, cfg.hidden_size), jnp.float32)

    def body(i, c):
        t = _tokens(cfg, B, T, i) + (c.lengths - L)[:, None]  # (+0) the input depends on the carry: a drafter that
        # reads no cache of its own (Gemma-4's assistant) would otherwise be hoisted out of the loop and timed once
        if head:  # the drafter's catch-up over T pending pairs (T = 1: one draft step)
            _, lg, c = drafter.of(cfg).catch_up(params, c, h, t, jnp.full((B,), T, jnp.int32), trunk)
        else:
            _, lg, c, _ = forward(params, t, c, cfg, logits="all")
        return c.with_lengths(L + (lg.max() > 1e30).astype(jnp.int32))  # keep every logit live (a slice of one
        # would let XLA compute one column of the output matmul)

    return jax.lax.fori_loop(0, n, body, cache).lengths


@partial(jax.jit, static_argnames=("cfg", "K", "n"))
def repeat_step(params, trunk, heads, cfg: ModelConfig, K: int, n: int):
    """n compiled calls of a speculative step's model work, in the loop's order: the trunk over K+1 tokens, the
    drafter's catch-up over those K+1 pairs, K-1 more draft steps; lengths reset each time. Timed as one, the pieces
    evict each other's weights from the cache as they do in the loop (a piece timed alone keeps its own there)."""
    B = trunk.lengths.shape[0]
    L, Lh = trunk.lengths, heads.lengths
    d = drafter.of(cfg)

    def body(it, c):
        tr, hc = c
        t = _tokens(cfg, B, K + 1, it) + (tr.lengths - L)[:, None]  # (+0) depends on the carry
        h, lg, tr, _ = forward(params, t, tr, cfg, logits="all")
        g, dl, hc = d.catch_up(params, hc, h, t, jnp.full((B,), K + 1, jnp.int32), tr)
        for i in range(1, K):
            g, dl, hc = d.step(params, hc, g, argmax(dl.reshape(B, -1)), i, tr)
        live = ((lg.max() > 1e30) | (dl.max() > 1e30)).astype(jnp.int32)  # keep every logit live
        return tr.with_lengths(L + live), hc.with_lengths(Lh + live)

    return jax.lax.fori_loop(0, n, body, (trunk, heads))[0].lengths


def _caches(params, cfg: ModelConfig, B: int, size: int, ctx: int, types: KVTypes, head: bool):
    """(trunk cache, the drafter's cache or None) with ``ctx`` tokens cached, placed as ``params``."""
    mesh = sharding.mesh_of(params)
    trunk = sharding.place_rows(init_trunk_cache(cfg, B, size, types.k, types.v).with_lengths(jnp.full((B,), ctx)),
                                mesh)
    heads = drafter.of(cfg).init_cache(B, size, types.k_draft, types.v_draft) if head else None
    return trunk, None if heads is None else sharding.place_rows(heads.with_lengths(jnp.full((B,), ctx)), mesh)


def _per_call(run, n: int, repeats: int) -> float:
    """Seconds per call of a compiled loop ``run`` of ``n`` calls (best of ``repeats``, after one to compile)."""
    jax.block_until_ready(run())  # compile
    return best_seconds(lambda: jax.block_until_ready(run()), repeats) / n


def time_piece(params, cfg: ModelConfig, B: int, T: int, head: bool, ctx: int, n: int = 20, repeats: int = 3,
               types: KVTypes = KVTypes()) -> float:
    """Seconds per call of one piece at batch B with ``ctx`` cached tokens (best of ``repeats``)."""
    trunk, heads = _caches(params, cfg, B, ctx + T + 8, ctx, types, head)
    cache, trunk = (heads, trunk) if head else (trunk, None)
    return _per_call(lambda: repeat_piece(params, cache, cfg, T, head, n, trunk), n, repeats)


def time_step(params, cfg: ModelConfig, B: int, K: int, ctx: int, n: int = 20, repeats: int = 3,
              types: KVTypes = KVTypes()) -> float:
    """Seconds per call of ``repeat_step``'s step (K drafts) at batch B with ``ctx`` cached tokens."""
    trunk, heads = _caches(params, cfg, B, ctx + K + 9, ctx, types, True)
    return _per_call(lambda: repeat_step(params, trunk, heads, cfg, K, n), n, repeats)


_COSTS: dict = {}


def measure_costs(params, cfg: ModelConfig, batch: int, k_max: int, ctx: int = 64,
                  cache_types: KVTypes = KVTypes()) -> np.ndarray:
    """[2, k_max + 2] float32 in units of one plain decode step: row 0 = verify cost v[T], row 1 = head cost
    h[T], T = 1..k_max+1; [1, 0] = the speculative step's own cost beyond its pieces (sampling, acceptance,
    bookkeeping over its k_max + 1 padded positions: measured as the auto loop drafting one token a step against
    a plain run, both compiled loops timed in turn); [0, 0] unused.
    Every piece runs on caches of ``cache_types``."""
    from mtp_jax import generate as plain  # noqa: PLC0415  (speculative imports this module)
    from mtp_jax import speculative  # noqa: PLC0415

    key = (cfg, batch, k_max, jax.default_backend(), cache_types)
    if key not in _COSTS:
        piece = partial(time_piece, params, cfg, batch, ctx=ctx, types=cache_types)
        t1 = piece(1, False)
        v = [1.0, 1.0] + [piece(T, False) / t1 for T in range(2, k_max + 2)]
        h = [0.0] + [piece(T, True) / t1 for T in range(1, k_max + 2)]
        prompts, n = [[1] * 8] * batch, 32
        common = dict(max_new_tokens=n, eos_ids=[], cache_types=cache_types)
        one = np.full((2, k_max + 2), 1e9, np.float32)  # costs under which the auto loop drafts one token a step
        one[:, :3] = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
        base, spec = plain.best_of_each([
            lambda: plain.generate(params, cfg, prompts, **common),
            lambda: speculative.generate(params, cfg, prompts, num_draft="auto", max_draft=k_max, costs=one, **common)],
            3)
        step = spec.seconds / spec.stats["trunk_forwards"] / (base.seconds / n)
        h[0] = max(0.0, step - v[2] - h[2])
        _COSTS[key] = np.array([v, h], np.float32)
    return _COSTS[key]


def step_costs(costs: jax.Array, k_max: int) -> jax.Array:
    """[k_max] cost of a step that drafts k = 1..k_max tokens, in decodes."""
    k = jnp.arange(1, k_max + 1)
    return costs[0, k + 1] + costs[1, k + 1] + (k - 1) * costs[1, 1] + costs[1, 0]


def can_pay(costs: jax.Array, k_max: int, acceptance: float | None = None) -> jax.Array:
    """Whether drafting is worth trying: some k = 1..k_max beats plain decoding when each draft is accepted with
    probability ``acceptance`` (default PLAUSIBLE_ACCEPTANCE), E(k) = 1 + r + ... + r^k tokens per step."""
    r = PLAUSIBLE_ACCEPTANCE if acceptance is None else acceptance
    e = jnp.cumsum(r ** jnp.arange(k_max + 1.0))[1:]  # [k_max] E(k)
    return jnp.any(e / step_costs(costs, k_max) > 1.0)


def expected_tokens(acc: jax.Array, reached: jax.Array) -> jax.Array:
    """acc, reached [K] (times position i was accepted / verified with all earlier ones accepted) ->
    E[k] [K+1]: expected tokens emitted by a step that drafts k = 0..K tokens."""
    r = (acc + 1.0) / (reached + 2.0)  # Laplace prior 1/2
    return jnp.concatenate([jnp.ones((1,)), 1.0 + jnp.cumsum(jnp.cumprod(r))])


def choose(acc: jax.Array, reached: jax.Array, costs: jax.Array, k_max: int) -> tuple[jax.Array, jax.Array]:
    """-> (k in 1..k_max maximizing E(k)/cost(k), that best ratio)."""
    e = expected_tokens(acc.astype(jnp.float32), reached.astype(jnp.float32))[1:]  # [K] for k = 1..K
    ratio = e / step_costs(costs, k_max)
    best = jnp.argmax(ratio)
    return (best + 1).astype(jnp.int32), ratio[best]
