"""Which leaves a model's Params have, addressed by attribute paths such as ("moe_layers", "attn", "wq") or
("nextn", 0, "eh_proj"): shared by the GGUF, HF and orbax readers and writers.

``params.abstract(cfg)`` fixes every leaf but the NextN block's optional tensors (shared_head_norm,
shared_head_head, embed_tokens: llama.cpp falls back to the trunk's when they are absent), so a template is
the abstract tree with those set to what a file or a Params actually holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mtp_jax import params as P
from mtp_jax import pytree
from mtp_jax.config import ModelConfig

NEXTN_OPTIONAL = ("shared_head_norm", "shared_head_head", "embed_tokens")
Path = tuple[Any, ...]


def template(cfg: ModelConfig, nextn_present: set[str] | None = None, load_mtp: bool = True) -> P.Params:
    """params.abstract(cfg) with the optional NextN tensors named in ``nextn_present`` (default: all);
    no NextN block at all when the config has none or ``load_mtp`` is False."""
    t = P.abstract(cfg)
    if t.nextn is None or not load_mtp:
        return dataclasses.replace(t, nextn=None)
    if not isinstance(t.nextn, tuple):  # a drafter model of its own (Gemma-4's assistant), read from its own file
        return t
    keep = set(NEXTN_OPTIONAL) if nextn_present is None else nextn_present
    D, V = cfg.hidden_size, cfg.vocab_size
    opt = {"shared_head_norm": P.ArrayInfo((D,), ("norm",), "ones"),
           "shared_head_head": P.ArrayInfo((D, V), ("embed", "vocab")),
           "embed_tokens": P.ArrayInfo((V, D), ("vocab", "embed"))}
    nn = tuple(dataclasses.replace(n, **{k: (opt[k] if k in keep else None) for k in NEXTN_OPTIONAL})
               for n in t.nextn)
    return dataclasses.replace(t, nextn=nn)


def nextn_present(params: P.Params) -> set[str]:
    """The optional NextN tensors a Params holds."""
    nextn = params.nextn if isinstance(params.nextn, tuple) else ()
    return {k for k in NEXTN_OPTIONAL if nextn and getattr(nextn[0], k) is not None}


def template_of(cfg: ModelConfig, params: P.Params) -> P.Params:
    """The template a given Params should match."""
    return template(cfg, nextn_present(params), load_mtp=params.nextn is not None)


def leaf_paths(tree: Any) -> list[Path]:
    """Attribute paths of the (non-None) leaves, in jax.tree order."""
    return [path for path, _ in pytree.leaves_with_path(tree)]


def get(tree: Any, path: Path) -> Any:
    for p in path:
        tree = tree[p] if isinstance(p, int) else getattr(tree, p)
    return tree


def key(path: Path) -> str:
    """"moe_layers.attn.wq", "nextn.0.eh_proj"."""
    return ".".join(map(str, path))


def build(tmpl: P.Params, leaves: Sequence[Any]) -> P.Params:
    """The template's structure with ``leaves`` in leaf_paths order (one walk, counting the template's leaves)."""
    n = 0

    def take(path: Path, _: Any) -> Any:
        nonlocal n
        n += 1
        return leaves[n - 1] if n <= len(leaves) else None

    out = pytree.map_with_path(take, tmpl)
    if n != len(leaves):
        raise ValueError(f"{len(leaves)} leaves for a template of {n}")
    return out


def check_shapes(tmpl: P.Params, params: P.Params, where: Any) -> None:
    """ValueError naming the first leaf of ``params`` that is missing or not shaped like the template."""
    for path in leaf_paths(tmpl):
        want = get(tmpl, path).shape
        try:
            x = get(params, path)
        except (AttributeError, IndexError, TypeError):
            x = None
        if x is None or tuple(x.shape) != want:
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"{where}: param {key(path)} has shape {got}, expected {want}")
