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

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from mtp_jax.kvcache import KVCache, init_nextn_cache
from mtp_jax.model import take_last
from mtp_jax.mtp import shift_hidden


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


def of(cfg: Any):
    """The drafter of a config's family."""
    from mtp_jax import families

    return families.of(cfg).drafter(cfg)

