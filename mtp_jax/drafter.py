"""Drafters: how the speculative loop (and imatrix, and training) drive a family's MTP heads.

The loop only talks to this interface, so the three known ways of drafting fit without touching it:

* ``RecursiveHead``: one NextN head reused for every draft step, with its own KV cache (GLM-4.5, DeepSeek-V3,
  Qwen3.5; llama.cpp common/speculative.cpp ``common_speculative_impl_draft_mtp``);
* chained heads, one head per draft step, each with its own cache (Step-3.5): ``step(.., i, ..)`` gets the
  draft index and ``max_drafts`` caps K at the number of heads;
* an external assistant that reads the target's KV cache and owns none (Gemma-4): every method receives the
  trunk cache, and ``init_cache`` may return an empty state.

Protocol (B rows, P pending pairs, D hidden, V vocab); all methods are pure and traceable:

``init_cache(batch, size, k_type=None, v_type=None)`` -> state (cache types as kvquant.KVTypes' k_draft / v_draft);
``prefill(params, state, h, tokens, n_valid, trunk)`` -> state: the prompt's pairs (h_{j-1}, t_j);
``catch_up(params, state, pend_h [B,P,D], pend_tok [B,P], n_pend [B], trunk)`` -> (g [B,1,D], logits [B,1,V],
state): the pairs accepted last step, the last one giving draft 1;
``step(params, state, g, token [B], i, trunk)`` -> (g, logits [B,1,V], state): draft i+1 from draft i;
``commit(state, before)`` -> state: drop the draft steps' entries, keeping what catch-up wrote (``before`` is
the state catch-up returned);
``keep(new, old, rows)`` -> state: rows where ``rows`` is False keep ``old`` (finished rows ride along);
``teacher_forced(params, h, tokens, n_valid, collect_stats)`` -> [(logits [B,T,V], stats)] per head, on the
pairs (h_{j-1}, t_j) of known text, exactly as drafting feeds them (imatrix, training, evaluation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax.kvcache import KVCache, init_nextn_cache
from mtp_jax.linear import compute_dtype
from mtp_jax.model import take_last
from mtp_jax.mtp import shift_hidden
from mtp_jax.pytree import pytree_dataclass


@dataclass(frozen=True)
class RecursiveHead:
    """One NextN head (``params.nextn[0]``) drafting every step, with its own KV cache whose lengths roll back."""

    cfg: Any

    @property
    def max_drafts(self) -> int | None:
        return None  # any K

    def _head(self):
        from mtp_jax import families

        return families.of(self.cfg).head_forward

    def init_cache(self, batch: int, size: int, k_type: str | None = None, v_type: str | None = None) -> KVCache:
        return init_nextn_cache(self.cfg, batch, size, k_type, v_type)

    def prefill(self, params, state: KVCache, h, tokens, n_valid, trunk=None) -> KVCache:
        return self._head()(params, shift_hidden(h), tokens, state, self.cfg, n_valid=n_valid, logits="none")[2]

    def catch_up(self, params, state: KVCache, pend_h, pend_tok, n_pend, trunk=None):
        g, logits, state, _ = self._head()(params, pend_h, pend_tok, state, self.cfg, n_valid=n_pend, logits="last")
        return take_last(g, n_pend), logits, state

    def step(self, params, state: KVCache, g, token, i, trunk=None):
        g, logits, state, _ = self._head()(params, g, token[:, None], state, self.cfg, logits="all")
        return g, logits, state

    def commit(self, state: KVCache, before: KVCache) -> KVCache:
        return state.with_lengths(before.lengths)

    def keep(self, new: KVCache, old: KVCache, rows) -> KVCache:
        return new.with_lengths(jnp.where(rows, new.lengths, old.lengths))

    def teacher_forced(self, params, h, tokens, n_valid, collect_stats: bool = False) -> list[tuple[Any, Any]]:
        """Every NextN block on the trunk's pairs (blocks beyond the first are driven like the first)."""
        out = []
        for n in range(len(params.nextn)):
            _, lg, _, st = self._head()(params, shift_hidden(h), tokens, None, self.cfg, head=n, n_valid=n_valid,
                                        collect_stats=collect_stats)
            out.append((lg, st))
        return out


@pytree_dataclass
class ChainState:
    """ChainedHeads' state: every head's cache (one stack, layer k = head k, one ``lengths`` for all: every head
    holds the same pairs up to it) and this step's drafts so far with the hiddens that come with them."""

    cache: Any  # KVCache
    tok: Any  # [B, n-1] drafts d_1 .. d_{n-1}
    g: Any  # [B, n-1, D] the hidden paired with each: head i-1's pre-norm output that drafted d_i

    @property
    def lengths(self):
        return self.cache.lengths

    def with_lengths(self, lengths) -> "ChainState":
        return ChainState(self.cache.with_lengths(lengths), self.tok, self.g)


@dataclass(frozen=True)
class ChainedHeads:
    """One head per draft step, each with its own cache (Step-3.5: head k = blk.{n_layer + k} drafts step k + 1),
    as llama.cpp common/speculative.cpp ``common_speculative_impl_draft_mtp`` with ``chain_heads``:

    * every head caches the trunk's pairs (h_{j-1}, t_j) of the prompt and of each accepted step (``process()``
      runs all heads on them), the last pair at the newest position p0;
    * head 0 on the newest pair gives d_1; draft step i (head i) re-runs the step's chain at p0 + 1 .. p0 + i:
      (d_t, g_t) where g_t is head t-1's pre-norm output at its last row, and its last row gives d_{i+1}
      (``draft()`` rebuilds the head's own KV over the draft region, so it never reads another head's entries);
    * K is capped at the number of heads (``max_drafts``). ``num_draft``: heads the loop will use (caches are
      kept for those only; None: all)."""

    cfg: Any
    num_draft: int | None = None

    @property
    def max_drafts(self) -> int:
        return self.cfg.num_nextn_predict_layers

    @property
    def _n(self) -> int:
        return min(self.num_draft or self.max_drafts, self.max_drafts)

    def _head(self):
        from mtp_jax import families

        return families.of(self.cfg).head_forward

    def init_cache(self, batch: int, size: int, k_type: str | None = None, v_type: str | None = None) -> ChainState:
        m = max(self._n - 1, 1)
        return ChainState(init_nextn_cache(self.cfg, batch, size, k_type, v_type), jnp.zeros((batch, m), jnp.int32),
                          jnp.zeros((batch, m, self.cfg.hidden_size), compute_dtype(self.cfg.dtype)))

    def _all_heads(self, params, cache: KVCache, h, tokens, n_valid):
        """Every used head on the same pairs at the same slots -> (head 0's output, its logits at the last pair,
        cache with lengths + n_valid)."""
        start = cache.lengths
        g, lg, cache, _ = self._head()(params, h, tokens, cache, self.cfg, head=0, n_valid=n_valid, logits="last")
        for k in range(1, self._n):
            cache = self._head()(params, h, tokens, cache.with_lengths(start), self.cfg, head=k, n_valid=n_valid,
                                 logits="none")[2]
        return g, lg, cache

    def prefill(self, params, state: ChainState, h, tokens, n_valid, trunk=None) -> ChainState:
        return dataclasses.replace(state, cache=self._all_heads(params, state.cache, shift_hidden(h), tokens,
                                                                n_valid)[2])

    def catch_up(self, params, state: ChainState, pend_h, pend_tok, n_pend, trunk=None):
        g, logits, cache = self._all_heads(params, state.cache, pend_h, pend_tok, n_pend)
        return take_last(g, n_pend), logits, dataclasses.replace(state, cache=cache)

    def step(self, params, state: ChainState, g, token, i, trunk=None):
        """Draft i+1 from d_i = ``token`` and g = the output that drafted it, with head i (i may be traced)."""
        tok = jax.lax.dynamic_update_slice_in_dim(state.tok, token[:, None].astype(jnp.int32), i - 1, axis=1)
        gs = jax.lax.dynamic_update_slice_in_dim(state.g, g.astype(state.g.dtype), i - 1, axis=1)
        start = state.cache.lengths  # p0 + 1: the chain goes to slots p0 + 1 .. p0 + i

        def run(head: int, rows: int):
            def f(cache):
                n = jnp.full_like(start, i)
                out, lg, cache, _ = self._head()(params, gs[:, :rows], tok[:, :rows], cache, self.cfg, head=head,
                                                 n_valid=n, logits="last")
                return take_last(out, n), lg, cache.with_lengths(start)
            return f

        if isinstance(i, int):
            g, lg, cache = run(i, i)(state.cache)
        else:  # the auto loop's traced step index: one branch per head, all over the full chain (rows past i masked)
            m = tok.shape[1]
            g, lg, cache = jax.lax.switch(i - 1, [run(k, m) for k in range(1, self._n)] or [run(0, m)], state.cache)
        return g, lg, ChainState(cache, tok, gs)

    def commit(self, state: ChainState, before: ChainState) -> ChainState:
        return state.with_lengths(before.lengths)

    def keep(self, new: ChainState, old: ChainState, rows) -> ChainState:
        return new.with_lengths(jnp.where(rows, new.lengths, old.lengths))

    def teacher_forced(self, params, h, tokens, n_valid, collect_stats: bool = False) -> list[tuple[Any, Any]]:
        """Each head on known text as it drafts: head 0 on the trunk's pairs (h_{j-1}, t_j), head k on
        (head k-1's output at j-1, t_j); head k's logits at j predict t_{j+k+1}."""
        out, g = [], shift_hidden(h)
        for k in range(self.max_drafts):
            y, lg, _, st = self._head()(params, g, tokens, None, self.cfg, head=k, n_valid=n_valid,
                                        collect_stats=collect_stats)
            out.append((lg, st))
            g = shift_hidden(y)
        return out


def of(cfg: Any, num_draft: int | None = None):
    """The drafter of a config's family (``num_draft``: the most drafts a step will make, when known)."""
    from mtp_jax import families

    d = families.of(cfg).drafter(cfg)
    return dataclasses.replace(d, num_draft=num_draft) if num_draft and hasattr(d, "num_draft") else d

