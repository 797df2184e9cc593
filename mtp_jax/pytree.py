"""Frozen dataclasses that jax flattens field by field, declared without importing jax.

The parameter trees (mtp_jax.params, the families' own) are also read where jax would be dead weight: the
quantizer checks a family's GGUF against its tensor table, and ``import jax`` alone costs ~145 MB of RSS, twice
llama-quantize's peak. So ``pytree_dataclass`` records a class, and ``register_with_jax`` registers every class
recorded so far, and each later one at its definition. A module that runs jax over these trees calls it on import
(mtp_jax.qweight, which the graph and the readers import, sharding, synthetic, io.orbax; tests/test_families.py
imports every jax module of the package alone and checks). ``map_with_path`` walks a tree without jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

CLASSES: list[type] = []  # every pytree_dataclass, in definition order
_registered = False


def pytree_dataclass(cls: type) -> type:
    """A frozen dataclass whose fields are all children (None = empty subtree)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    CLASSES.append(cls)
    if _registered:
        _register(cls)
    return cls


def register_with_jax() -> None:
    """Make every pytree_dataclass, defined or to come, a jax pytree (idempotent; the caller has imported jax)."""
    global _registered
    if not _registered:
        _registered = True
        for cls in CLASSES:
            _register(cls)


def _register(cls: type) -> None:
    import jax

    jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])


def map_with_path(fn: Callable[[tuple, Any], Any], tree: Any, is_leaf: Callable[[Any], bool] | None = None,
                  path: tuple = ()) -> Any:
    """jax.tree_util.tree_map_with_path over pytree_dataclasses, tuples and lists (None: an empty subtree), anything
    else a leaf; ``fn(path, leaf)`` with the path as attribute names and indices, ("nextn", 0, "eh_proj"). Leaves
    come in jax's order (fields in definition order)."""
    if tree is None:
        return None
    if is_leaf is not None and is_leaf(tree):
        return fn(path, tree)
    if type(tree) in CLASSES:
        return type(tree)(**{f.name: map_with_path(fn, getattr(tree, f.name), is_leaf, (*path, f.name))
                             for f in dataclasses.fields(tree)})
    if type(tree) in (tuple, list):
        return type(tree)(map_with_path(fn, x, is_leaf, (*path, i)) for i, x in enumerate(tree))
    return fn(path, tree)


def leaves_with_path(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[tuple, Any]]:
    """(path, leaf) in jax's order (map_with_path)."""
    out: list[tuple[tuple, Any]] = []
    map_with_path(lambda p, x: out.append((p, x)), tree, is_leaf)
    return out
