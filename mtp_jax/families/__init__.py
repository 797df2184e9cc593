"""Model families: one module per family, found by GGUF ``general.architecture`` or HF ``model_type``.

A family module builds one ``Family`` and registers it. What it must provide (the README's checklist; the
generic tests in tests/test_families.py run over every registered family):

* ``config``: its ``ModelConfig`` subclass, with ``config_from_hf`` / ``config_to_hf`` (HF config.json) and
  ``config_from_gguf`` / ``write_gguf_metadata`` (llama.cpp's metadata keys for the arch);
* the tensor table: ``top_specs``, ``layer_specs`` and ``nextn_specs`` (``mtp_jax.io.table.Spec``: leaf path,
  GGUF name, HF name, layout). GGUF, HF and orbax I/O, imatrix names and sharding read it; nothing else spells
  a tensor name;
* ``abstract``: the parameter tree with shapes, logical axes and initializers (``params.ArrayInfo`` leaves);
* ``forward`` (trunk) and ``head_forward`` (one NextN / MTP block), and ``drafter``: how the speculative loop
  drives the heads (``mtp_jax.drafter``);
* ``tiny``: the name of a bundled tiny config the generic tests instantiate;
* optionally ``stacks`` (the trunk's layer stacks: Params attribute, GGUF block ids, MoE; default: dense lead
  layers then MoE layers, io.table.decoder_stacks) and ``init_cache`` (the trunk's KV cache; default
  kvcache.decoder_cache), for a family whose layers do not fit two stacks (per-layer head counts, windows), and
  ``constant_tensors`` (GGUF tensors that are functions of the config, such as gemma4's ``rope_freqs``).

The description (config, readers and writers, tensor table, abstract tree, stacks, constant tensors) imports no
jax: the quantizer checks a family's GGUF with it alone (``import jax`` costs ~145 MB of RSS). The graph
callables (forward, head_forward, drafter, init_cache, the head's files) name their code with ``Lazy``, imported
on first call; a family with graph code of its own keeps it in ``<arch>_graph.py``.

Shared and family-agnostic: layers, ``linear``, the KV cache, sampling, the loop, imatrix, I/O, quantizer, CLI.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# imported on first lookup (they import the model code, which imports this package)
_MODULES = ("glm4moe", "deepseek2", "step35", "gemma4")
ARCHS = frozenset(_MODULES)  # a family's module is named after its GGUF arch (register checks it): known without jax


@dataclass(frozen=True)
class Lazy:
    """``module.name``, imported on its first call: how a family's description names graph code (which imports
    jax) without importing it."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF general.architecture (also the YAML ``family`` key)
    hf_model_types: tuple[str, ...]  # HF config.json model_type values this family reads
    hf_architecture: str  # what config_to_hf writes under "architectures"
    config: type  # the ModelConfig subclass
    config_from_hf: Callable[[dict, str], Any]  # (config.json dict, dtype) -> config
    config_to_hf: Callable[[Any], dict]
    config_from_gguf: Callable[..., Any]  # (GGUFReader, path, dtype) -> config
    write_gguf_metadata: Callable[..., None]  # (GGUFWriter, config, file type) -> None
    top_specs: Callable[[Any], list]  # (cfg) -> [Spec] of the tensors outside the blocks
    layer_specs: Callable[[Any, bool], list]  # (cfg, moe) -> [Spec] of one decoder block
    nextn_specs: Callable[[Any], list]  # (cfg) -> [Spec] of a NextN block's own tensors (besides its layer)
    abstract: Callable[[Any], Any]  # (cfg) -> Params of ArrayInfo
    forward: Callable[..., Any]  # model.forward's signature
    head_forward: Callable[..., Any]  # mtp.nextn_forward's signature
    drafter: Callable[[Any], Any]  # (cfg) -> the Drafter the loop and imatrix drive
    tiny: str  # a bundled config name for tests
    stacks: Callable[[Any], list] | None = None  # (cfg) -> [(attr, block ids, moe)] (None: io.table.decoder_stacks)
    init_cache: Callable[..., Any] | None = None  # kvcache.init_trunk_cache's signature (None: decoder_cache)
    # a drafter that is a model file of its own (Gemma-4's assistant): the trunk's files never hold it;
    # read_head(path, cfg, dtype, check_finite) -> (cfg with it, its params), write_head(path, cfg, params, outtype,
    # tokenizer) -> path
    read_head: Callable[..., Any] | None = None
    write_head: Callable[..., Any] | None = None
    head_imatrix: Callable[..., dict] | None = None  # (head stats, params, cfg) -> {its file's tensor: entry}
    constant_tensors: Callable[[Any], dict] | None = None  # (cfg) -> {GGUF name: array} its files hold beside the
    # table's tensors, functions of the config (gemma4's rope_freqs); written by write_gguf, checked by the reader

    def __repr__(self) -> str:
        return f"Family({self.arch!r})"


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.arch not in ARCHS:
        raise ValueError(f"family {family.arch!r}: its module must be mtp_jax/families/{family.arch}.py, listed in "
                         f"_MODULES")
    if family.arch in _REGISTRY:
        raise ValueError(f"family {family.arch!r} is registered twice")
    _REGISTRY[family.arch] = family
    return family


def _load() -> None:
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")


def registered() -> list[Family]:
    _load()
    return list(_REGISTRY.values())


def by_arch(arch: Any) -> Family:
    """The family of a GGUF ``general.architecture`` (ValueError naming the known ones otherwise)."""
    _load()
    if arch not in _REGISTRY:
        raise ValueError(f"architecture {arch!r} is not supported (supported: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[arch]


def by_model_type(model_type: Any) -> Family:
    """The family of an HF config.json ``model_type``."""
    _load()
    for f in _REGISTRY.values():
        if model_type in f.hf_model_types:
            return f
    known = sorted(t for f in _REGISTRY.values() for t in f.hf_model_types)
    raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(known)})")


def of(cfg: Any) -> Family:
    """The family of a config."""
    return by_arch(type(cfg).family)
