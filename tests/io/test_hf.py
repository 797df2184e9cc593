"""HF safetensors directories: round trips in both expert layouts, the MTP block kept, and HF -> GGUF equal to
llama.cpp's convert_hf_to_gguf.py."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest

from mtp_jax.io.gguf import read_gguf
from mtp_jax.io.hf import HFError, hf_to_gguf, read_hf, write_hf
from tests.helpers import tiny_config, tiny_params


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_per_expert_dir_round_trip(hf_dir):
    path, cfg, params = hf_dir
    assert (path / "tokenizer.json").is_file()
    cfg2, p2 = read_hf(path)
    assert cfg2 == cfg.replace(name="glm4moe")  # config.json has no model name
    assert_same(params, p2)


def test_fused_experts_bf16_round_trip(tmp_path):
    cfg, params = tiny_config(), tiny_params()
    path = write_hf(tmp_path / "fused", cfg, params, fused_experts=True, dtype="bfloat16")
    cfg2, p2 = read_hf(path)  # dtype from config.json
    assert cfg2.dtype == "bfloat16"
    assert_same(jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params), p2)


def test_missing_mtp_layer_is_an_error(tmp_path):
    cfg, params = tiny_config(), tiny_params()
    path = write_hf(tmp_path / "no-mtp", cfg, dataclasses.replace(params, nextn=None))  # config still says 1 layer
    with pytest.raises(HFError, match=r"no-mtp: missing tensor model\.layers\.3\..*announces 1 MTP layer"):
        read_hf(path)
    cfg2, p2 = read_hf(path, load_mtp=False)
    assert p2.nextn is None and cfg2.num_nextn_predict_layers == 1
    with pytest.raises(HFError, match="no config.json"):
        read_hf(tmp_path)


@pytest.mark.peer
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_hf_to_gguf_matches_llama_cpp_converter(peer, hf_dir, tmp_path, outtype):
    """Same tensor names, numpy shapes, ggml types and bytes, same glm4moe.* hyperparameters and vocabulary as
    convert_hf_to_gguf.py on the same directory."""
    path, cfg, _ = hf_dir
    theirs = tmp_path / "theirs.gguf"
    p = peer.convert_hf(path, theirs, outtype)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = hf_to_gguf(path, tmp_path / "ours.gguf", outtype)
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    ta = {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in a.tensors}
    tb = {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    assert any(n.startswith("blk.3.nextn.") for n in ta)
    for name in ta:
        assert ta[name][:2] == tb[name][:2], name
        assert ta[name][2] == tb[name][2], name
    kv = lambda r: {k: f.contents() for k, f in r.fields.items()  # noqa: E731
                    if k.startswith("glm4moe.") or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                         "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                         "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
                                                         "tokenizer.ggml.unk_token_id", "general.file_type")}
    assert kv(a) == kv(b)
    cfg2, p2 = read_gguf(theirs, dtype="float32")  # and we read the converter's file back
    assert cfg2.replace(name=cfg.name, bos_token_id=None, eos_token_ids=cfg.eos_token_ids) == cfg
    _, p3 = read_gguf(ours, dtype="float32")
    assert_same(p2, p3)
