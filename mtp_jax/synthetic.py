"""Random-weight models whose NextN head agrees with the trunk at a chosen rate, built by construction.

Speculative decoding can only be measured against its ideal curve when the acceptance is known. Training
a head takes hours; instead the weights are set so that the trunk's greedy continuation is a fixed random
permutation of the vocabulary, t -> pi(t), and the head's greedy draft is pi'(t), with pi' = pi on a random
fraction ``accept`` of the tokens and a different token elsewhere:

* embedding rows E[t] are random with rms 1; every layer is random (``std``) but the projections that
  write to the residual stream (attention output, FFN down, shared-expert down) are scaled by
  ``branch_scale``, so every weight is read and multiplied at full cost while the residual stays ~E[t];
* lm_head column pi(t) = alpha E[t] / D, so the logit of pi(t) is ~alpha and every other ~alpha/sqrt(D);
* the head: eh_proj = [I; 0] passes its token's embedding through, and shared_head_head maps E[t] to pi'(t).

A draft for position j+1 is accepted iff its input token is one where pi' = pi: each draft position is
accepted with probability ~``accept``, independently, so mean accepted drafts = a + a^2 + ... + a^K.
Specials (ids < ``n_special``, EOS among them) are never a target, so generation never stops early.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import params as P
from mtp_jax import pytree
from mtp_jax.config import ModelConfig
from mtp_jax.io.table import stacks

pytree.register_with_jax()  # (mtp_jax.pytree)


def _head(E: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """[D, V] with column target[t] += alpha * E[t] / D: maps hidden ~E[t] to token target[t]."""
    V, D = E.shape
    W = np.zeros((V, D), np.float32)
    np.add.at(W, target, E * (alpha / D))
    return W.T


def _quiet(layer: P.Layer, s: float) -> P.Layer:
    """Scale the projections that write to the residual stream by s."""
    ffn = layer.ffn
    if isinstance(ffn, P.Moe):
        shared = None if ffn.shared is None else dataclasses.replace(ffn.shared, down=ffn.shared.down * s)
        ffn = dataclasses.replace(ffn, down=ffn.down * s, shared=shared)
    else:
        ffn = dataclasses.replace(ffn, down=ffn.down * s)
    return dataclasses.replace(layer, attn=dataclasses.replace(layer.attn, wo=layer.attn.wo * s), ffn=ffn)


def constructed_params(cfg: ModelConfig, accept: float, seed: int = 0, alpha: float = 24.0,
                       branch_scale: float = 0.05, n_special: int = 10) -> tuple[P.Params, np.ndarray, np.ndarray]:
    """-> (params in cfg.dtype, pi [V], pi_head [V]). Needs an untied lm_head and a NextN layer."""
    if cfg.tie_word_embeddings or not cfg.has_mtp:
        raise ValueError("constructed_params needs an untied lm_head and a NextN layer")
    if not 0.0 <= accept <= 1.0:
        raise ValueError(f"accept must be in [0, 1], got {accept}")
    V, D = cfg.vocab_size, cfg.hidden_size
    if V < n_special + 2:
        raise ValueError(f"vocab_size {V} is too small")
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((V, D)).astype(np.float32)
    E *= np.sqrt(D) / np.linalg.norm(E, axis=1, keepdims=True)
    normal = np.arange(n_special, V)
    def mapping() -> np.ndarray:  # a permutation of the normal tokens; specials map to normal tokens
        m = np.empty(V, np.int64)
        m[normal] = rng.permutation(normal)
        m[:n_special] = rng.choice(normal, n_special)
        return m

    pi, other = mapping(), mapping()
    clash = other == pi
    other[clash] = np.where(pi[clash] + 1 < V, pi[clash] + 1, n_special)  # a token != pi(t), never a special
    pi_head = np.where(rng.random(V) < accept, pi, other)
    dt = jnp.dtype(cfg.dtype)
    p = P.init(jax.random.key(seed), cfg)
    stack = lambda layers: None if layers is None else _quiet(layers, branch_scale)  # noqa: E731
    eh = np.concatenate([np.eye(D, dtype=np.float32), np.zeros((D, D), np.float32)])
    nextn = tuple(dataclasses.replace(n, layer=_quiet(n.layer, branch_scale), eh_proj=jnp.asarray(eh, dt),
                                      shared_head_head=jnp.asarray(_head(E, pi_head, alpha), dt))
                  for n in p.nextn)
    p = dataclasses.replace(p, embed=jnp.asarray(E, dt), lm_head=jnp.asarray(_head(E, pi, alpha), dt), nextn=nextn,
                            **{attr: stack(getattr(p, attr)) for attr, _, _ in stacks(cfg)})
    return p, pi, pi_head
