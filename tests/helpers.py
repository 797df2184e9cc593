"""Shared test fixtures: the tiny config with every GLM-4.5 feature on, and random params."""

from __future__ import annotations

from functools import lru_cache

import jax

from mtp_jax import params as P
from mtp_jax.config import ModelConfig, load_config


@lru_cache(maxsize=None)
def tiny_config(**overrides) -> ModelConfig:
    return load_config("glm4moe-tiny").replace(**overrides)


@lru_cache(maxsize=None)
def tiny_params(seed: int = 0, **overrides) -> P.Params:
    """Random weights with a larger std than init's default so logits are far from uniform, plus a
    nonzero router correction bias so selection differs from weighting."""
    cfg = tiny_config(**overrides)
    p = P.init(jax.random.key(seed), cfg, std=0.08)
    key = jax.random.key(seed + 1000)

    def perturb_bias(stack):
        if stack is None:
            return None
        ffn = stack.ffn
        bias = 0.05 * jax.random.normal(key, ffn.bias.shape)
        return stack.__class__(**{**stack.__dict__, "ffn": ffn.__class__(**{**ffn.__dict__, "bias": bias})})

    p = p.__class__(**{**p.__dict__, "moe_layers": perturb_bias(p.moe_layers)})
    return p
