"""Split GGUF models load as llama.cpp loads them: from the first file, every split found and checked."""

from __future__ import annotations

import subprocess

import jax
import numpy as np
import pytest

from mtp_jax.io.gguf import GGUFError, read_gguf, write_gguf
from mtp_jax.io.load import load_model
from mtp_jax.llama_cpp import bin_dir
from tests.helpers import tiny_config, tiny_params


def test_split_model_loads_like_the_whole_file(tmp_path, peer):
    exe = bin_dir() / "llama-gguf-split"  # the peer fixture has checked that llama.cpp is built
    cfg, params = tiny_config(), tiny_params(0)
    whole = write_gguf(tmp_path / "m.gguf", cfg, params, outtype="f16")
    subprocess.run([str(exe), "--split", "--split-max-tensors", "20", str(whole), str(tmp_path / "s")],
                   check=True, capture_output=True)
    splits = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(splits) >= 3
    first = splits[0]
    cfg2, p2 = read_gguf(first)
    cfg1, p1 = read_gguf(whole)
    assert cfg2 == cfg1
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_model(first)[0] == cfg1
    with pytest.raises(GGUFError, match="first split"):
        read_gguf(splits[-1])
    splits[1].unlink()
    with pytest.raises(GGUFError, match=splits[1].name):
        read_gguf(first)


def test_split_writer_gives_llama_gguf_split_bytes(tmp_path, peer):
    """Our split model (write_gguf / convert --split-max-tensors) is byte for byte what llama-gguf-split makes of
    the one-file model, and llama-gguf-split --merge joins it back into a model equal to the one file."""
    exe = bin_dir() / "llama-gguf-split"
    cfg, params = tiny_config(), tiny_params(0)
    whole = write_gguf(tmp_path / "whole.gguf", cfg, params, outtype="f16")
    first = write_gguf(tmp_path / "ours.gguf", cfg, params, outtype="f16", split_max_tensors=20)
    subprocess.run([str(exe), "--split", "--split-max-tensors", "20", str(whole), str(tmp_path / "llama")],
                   check=True, capture_output=True)
    ours, theirs = sorted(tmp_path.glob("ours-*.gguf")), sorted(tmp_path.glob("llama-*.gguf"))
    assert first == ours[0] and len(ours) == len(theirs) >= 3
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes(), a.name
    subprocess.run([str(exe), "--merge", str(first), str(tmp_path / "merged.gguf")], check=True, capture_output=True)
    _, merged = read_gguf(tmp_path / "merged.gguf")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a, np.float16), np.asarray(b))
    assert not list(tmp_path.glob(".*"))  # no temporary files left
