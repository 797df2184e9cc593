"""Logits processors and sampling. The same processing is applied to target and draft distributions.

``Sampling`` is frozen and hashable (a static jit argument): temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (llama.cpp/vLLM order); removed tokens get -inf. [..., V] f32."""
    x = logits.astype(jnp.float32)
    if s.greedy:
        return x
    x = x / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if s.top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[..., ::-1]  # descending
        p = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # mass strictly before each sorted token
        keep_sorted = before < s.top_p  # the smallest prefix whose mass reaches top_p
        threshold = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, -jnp.inf)
    return x


def probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """The distribution tokens are drawn from: one-hot argmax when greedy, else softmax of process_logits."""
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(process_logits(logits, s), axis=-1)


def sample(key: jax.Array, logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [..., V] -> token ids [...] int32."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, s), axis=-1).astype(jnp.int32)
