"""io.tree.build: a template's structure filled with leaves in leaf_paths order, the count checked."""

from __future__ import annotations

import pytest

from mtp_jax.io import tree
from tests.helpers import tiny_config


def test_build_fills_each_leaf_in_order_and_checks_the_count():
    tmpl = tree.template(tiny_config(), nextn_present=set())  # optional NextN tensors absent: None subtrees
    paths = tree.leaf_paths(tmpl)
    built = tree.build(tmpl, [tree.key(p) for p in paths])
    assert [tree.get(built, p) for p in paths] == [tree.key(p) for p in paths]
    assert tree.leaf_paths(built) == paths and built.nextn[0].embed_tokens is None
    for n in (len(paths) - 1, len(paths) + 1):
        with pytest.raises(ValueError, match=f"^{n} leaves for a template of {len(paths)}$"):
            tree.build(tmpl, ["x"] * n)
