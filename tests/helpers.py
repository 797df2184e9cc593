"""Shared test fixtures: the tiny config with every GLM-4.5 feature on, and random params."""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

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


def numpy_init(cfg, seed: int = 0, std: float = 0.02, norm_noise: float = 0.0, bias_noise: float = 0.0):
    """params.init's tree and scales (normal(std) matrices, unit norms, zero router bias), drawn with numpy:
    params.init compiles one jax.random call per distinct leaf shape, ~40 s for this family's many shapes on a
    loaded 2-core CPU. ``norm_noise`` / ``bias_noise``: normal noise on every norm / on the router bias."""
    rng = np.random.default_rng(seed)

    def make(path, info):
        name = path[-1].name
        x = {"normal": lambda: std * rng.standard_normal(info.shape), "ones": lambda: np.ones(info.shape),
             "zeros": lambda: np.zeros(info.shape)}[info.init]()
        if name.endswith("norm"):
            x = x + norm_noise * rng.standard_normal(info.shape)
        elif name == "bias":
            x = x + bias_noise * rng.standard_normal(info.shape)
        return jnp.asarray(x, jnp.dtype(cfg.dtype))

    return jax.tree_util.tree_map_with_path(make, P.abstract(cfg), is_leaf=lambda x: isinstance(x, P.ArrayInfo))
