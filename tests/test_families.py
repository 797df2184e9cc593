"""The generic tests every registered family must pass (the README's new-family checklist): registry lookups,
cache consistency, greedy MTP == plain greedy, GGUF / HF / orbax round trips, the tensor table covering every
leaf, imatrix coverage of the heads. Family-specific peer parity lives in each family's own tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import families, kvcache, speculative
from mtp_jax import model as M
from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.generate import generate
from mtp_jax.imatrix import Collector
from mtp_jax.io import tree
from mtp_jax.io.gguf import read_gguf, write_gguf
from mtp_jax.io.hf import from_hf, read_hf, to_hf, write_hf
from mtp_jax.io.load import load_model
from mtp_jax.qweight import float_arrays
from mtp_jax.io.orbax import load_orbax, save_orbax
from mtp_jax.io.table import plan, stacks
from mtp_jax.kvquant import KVTypes

FAMILIES = families.registered()
IDS = [f.arch for f in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def fam(request):
    f = request.param
    cfg = load_config(f.tiny)
    params = P.init(jax.random.key(0), cfg, std=0.08)
    return f, cfg, params


def _trunk(f, cfg, params):
    """What the trunk's own files hold: a family whose drafter is a model of its own (Gemma-4's assistant) keeps
    it in another file (tested by test_gguf_round_trip through --mtp-head)."""
    if f.read_head is None:
        return cfg, params
    return cfg.trunk_only(), None if params is None else dataclasses.replace(params, nextn=None)


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_registry_finds_the_family(fam):
    f, cfg, _ = fam
    assert families.by_arch(f.arch) is f and families.of(cfg) is f
    for t in f.hf_model_types:
        assert families.by_model_type(t) is f
    assert type(cfg) is f.config and cfg.has_mtp


def test_config_round_trips(fam):
    f, cfg, _ = fam
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    cfg, _ = _trunk(f, cfg, None)
    hf = f.config_to_hf(cfg)
    assert hf["model_type"] in f.hf_model_types and hf["architectures"] == [f.hf_architecture]
    assert cfg.from_hf_dict(hf, cfg.dtype).replace(name=cfg.name) == cfg


def test_tensor_table_covers_every_leaf_once(fam):
    """Every parameter leaf (each layer of a stack) is filled by exactly one GGUF tensor and one HF name."""
    cfg, params = _trunk(*fam)
    slots = list(plan(cfg, tree.template_of(cfg, params)))
    names = [s.name for s in slots]
    assert len(names) == len(set(names))
    filled = {(tree.key(s.leaf), s.index) for s in slots}
    want = set()
    for leaf in tree.leaf_paths(params):
        shape = tree.get(params, leaf).shape
        stacked = leaf[0] in {attr for attr, _, _ in stacks(cfg)}
        want |= {(tree.key(leaf), i) for i in range(shape[0])} if stacked else {(tree.key(leaf), None)}
    assert filled == want
    assert all(s.hf_name for s in slots)


def test_prefill_then_decode_equals_full_forward(fam):
    f, cfg, params = fam
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (7, 12)]
    tokens, n_valid = M.pad_prompts([r[:-1] for r in rows], cfg)
    cache = kvcache.init_trunk_cache(cfg, 2, 32)
    fwd = jax.jit(lambda p, x, c, n=None: f.forward(p, x, c, cfg, n_valid=n))  # compiled: op by op took ~40 s
    _, _, cache, _ = fwd(params, jnp.asarray(tokens), cache, jnp.asarray(n_valid))
    _, dec, _, _ = fwd(params, jnp.asarray([[r[-1]] for r in rows]), cache)
    for b, r in enumerate(rows):
        _, full, _, _ = fwd(params, jnp.asarray([r]), None)
        np.testing.assert_allclose(np.asarray(dec[b, 0]), np.asarray(full[0, -1]), atol=5e-5)


@pytest.mark.parametrize("K", [1, 3])
def test_greedy_mtp_equals_plain_greedy(fam, K):
    _, cfg, params = fam
    prompts = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4]]
    ref = generate(params, cfg, prompts, max_new_tokens=12, eos_ids=[])
    res = speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=12, eos_ids=[])
    assert res.tokens == ref.tokens


def test_gguf_round_trip(fam, tmp_path):
    f, cfg, params = fam
    path = write_gguf(tmp_path / "m.gguf", cfg, params, outtype="f32")
    if f.read_head is not None:  # the trunk's file, then the drafter's own, read back together
        head = write_gguf(tmp_path / "head.gguf", cfg, params, outtype="f32", part="mtp")
        cfg2, params2, _ = load_model(path, mtp_head=head)
        params2 = float_arrays(params2)  # with the CPU kernels, float matrices load as GGUF rows
    else:
        cfg2, params2 = read_gguf(path)
    assert cfg2.replace(name=cfg.name) == cfg
    _assert_same(params, params2)


def test_hf_round_trip_both_expert_layouts(fam, tmp_path):
    cfg, params = _trunk(*fam)
    for fused in (True, False):
        _assert_same(params, from_hf(to_hf(params, cfg, fused_experts=fused), cfg))
    cfg2, params2 = read_hf(write_hf(tmp_path / "hf", cfg, params, dtype="float32"))
    assert cfg2.replace(name=cfg.name) == cfg
    _assert_same(params, params2)


def test_orbax_round_trip(fam, tmp_path):
    _, cfg, params = fam
    cfg2, params2, _ = load_orbax(save_orbax(tmp_path / "ckpt", cfg, params))
    assert cfg2 == cfg
    _assert_same(params, params2)


def test_imatrix_covers_every_matmul_of_the_heads(fam, tmp_path):
    """Every blk.N weight matrix of the trunk and the heads gets an entry (llama-imatrix's filter: blk.*); a drafter
    in a file of its own gets an imatrix of its own, with an entry for every matrix of that file."""
    f, cfg, params = fam
    col = Collector(params, cfg, batch=2)
    col.add(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 16)).astype(np.int32))
    trunk_cfg, trunk = _trunk(f, cfg, params)
    want = {s.name for s in plan(trunk_cfg, tree.template_of(trunk_cfg, trunk))
            if s.name.startswith("blk.") and s.spec.n_in is not None}
    assert want <= set(col.sums)
    if f.read_head is None:
        head = f"blk.{cfg.num_hidden_layers}."
        assert any(n.startswith(head) for n in col.sums)
        return
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(write_gguf(tmp_path / "head.gguf", cfg, params, outtype="f32", part="mtp"))
    matrices = {t.name for t in reader.tensors if len(t.shape) >= 2 and t.tensor_type != GGMLQuantizationType.I32}
    assert matrices and matrices == set(col.head_sums)


def test_model_without_head_decodes_plain(fam):
    _, cfg, params = fam
    no_head = dataclasses.replace(params, nextn=None)
    ref = generate(no_head, cfg, [[1, 2, 3]], max_new_tokens=6, eos_ids=[])
    res = speculative.generate(no_head, cfg, [[1, 2, 3]], num_draft="auto", max_new_tokens=6, eos_ids=[])
    assert res.tokens == ref.tokens


def test_yaml_names_its_family_beside_or_inside_model(fam, tmp_path):
    import yaml

    f, cfg, _ = fam
    d = cfg.to_dict()
    family = d.pop("family")
    for i, doc in enumerate([{"family": family, "model": d}, {"model": {"family": family, **d}}]):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert load_config(str(path)) == cfg


def test_benchmark_step_runs_the_drafters_pieces(fam):
    """autodraft.repeat_step (the benchmark's whole-step timing) drives every family's drafter, the trunk's cache
    and the drafter's come back at the lengths they had (logits finite: nothing marked them live)."""
    from mtp_jax import autodraft

    _, cfg, params = fam
    trunk, heads = autodraft._caches(params, cfg, 2, 32, 9, KVTypes(), True)
    np.testing.assert_array_equal(autodraft.repeat_step(params, trunk, heads, cfg, 2, 2), [9, 9])


def test_gguf_is_checked_without_jax(fam, tmp_path):
    """The quantizer checks a family's file against its tensor table (config_from_gguf, check_tensors): the family's
    description (config, readers, table, abstract tree) loads without jax, ~145 MB of RSS on its own."""
    import subprocess
    import sys

    f, cfg, params = fam
    path = write_gguf(tmp_path / "m.gguf", *_trunk(f, cfg, params))
    code = ("import sys; from mtp_jax.io.gguf_model import check_tensors, config_from_gguf; "
            "from mtp_jax.io.validate import open_reader; "
            f"r = open_reader({str(path)!r}); cfg = config_from_gguf(r); check_tensors(r, cfg); "
            "print(cfg.family, 'jax' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == [f.arch, "False"], proc.stdout + proc.stderr


def test_every_jax_module_registers_the_trees():
    """pytree_dataclass records a class without jax (mtp_jax.pytree): every module of the package that imports jax
    and handles parameter trees, imported alone, makes every recorded class a jax pytree (a forked child per module:
    jax itself is imported once); and classes recorded before that (the descriptions first) are registered too."""
    import subprocess
    import sys

    code = '''
import dataclasses, importlib, os, pathlib, pkgutil, re, sys
import jax
import mtp_jax
from mtp_jax import pytree

def unregistered():
    return [c.__name__ for c in pytree.CLASSES
            if len(jax.tree.leaves(c(**{f.name: 1 for f in dataclasses.fields(c)}))) != len(dataclasses.fields(c))]

jax_modules = [m.name for m in pkgutil.walk_packages(mtp_jax.__path__, "mtp_jax.")
               if re.search(r"^(import|from) jax\\b", pathlib.Path(importlib.util.find_spec(m.name).origin).read_text(),
                            re.M)]
for name in jax_modules:
    pid = os.fork()
    if pid == 0:
        importlib.import_module(name)
        bad = unregistered() if "mtp_jax.params" in sys.modules else []
        print(name, bad, flush=True)
        os._exit(1 if bad else 0)
    assert os.waitpid(pid, 0)[1] == 0, name
from mtp_jax import families
families.registered()
assert pytree.CLASSES and len(unregistered()) == len(pytree.CLASSES)
import mtp_jax.model
print("after", unregistered(), len(jax_modules))
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("after [] "), proc.stdout + proc.stderr
