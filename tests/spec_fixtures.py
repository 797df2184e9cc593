"""A tiny model whose NextN head drafts well, so every acceptance path (0..K accepted) is exercised.

The embedding and lm_head are large and the decoder blocks small (weight std ``noise``), so the trunk's next
token is mostly a function of the current token; eh_proj passes the embedding half straight through, so
the head computes nearly the same function of the token it is given: its drafts agree with the trunk's
argmax unless the blocks' contribution (growing with ``noise``) flips it.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import jax
import jax.numpy as jnp

from mtp_jax import params as P
from tests.helpers import tiny_config


@lru_cache(maxsize=None)
def drafting_params(noise: float = 0.05, seed: int = 0, **overrides) -> tuple:
    cfg = tiny_config(**overrides)
    p = P.init(jax.random.key(seed), cfg, std=noise)
    D = cfg.hidden_size
    embed = jax.random.normal(jax.random.key(seed + 1), (cfg.vocab_size, D))
    head = jax.random.normal(jax.random.key(seed + 2), (D, cfg.vocab_size))
    eh = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], 0)  # [2D, D]: embedding half in, hidden half out
    nextn = tuple(dataclasses.replace(n, eh_proj=eh) for n in p.nextn)
    return cfg, dataclasses.replace(p, embed=embed, lm_head=None if cfg.tie_word_embeddings else head, nextn=nextn)
