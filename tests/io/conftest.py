"""Session fixtures for the I/O tests: the tiny tokenizer, tiny random models and their GGUF / HF files (written
once per session); the llama.cpp `peer` fixture is in tests/conftest.py."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import TokenType

from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.hf import write_hf
from mtp_jax.io.tokenizer import tiny_bpe
from tests.helpers import tiny_config, tiny_params
from tests.spec_fixtures import drafting_params


@pytest.fixture(scope="session")
def tok():
    """Byte-level BPE, GLM specials, 512 tokens = tiny_config().vocab_size."""
    t = tiny_bpe(tiny_config().vocab_size)
    assert t.vocab_size == tiny_config().vocab_size
    return t


@pytest.fixture(scope="session")
def io_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("io")


@pytest.fixture(scope="session")
def tiny_gguf(io_dir, tok):
    """(path, cfg, params): tests.helpers' tiny model (every GLM-4.5 feature, NextN layer) as an f32 GGUF."""
    cfg, params = tiny_config(), tiny_params()
    return write_gguf(io_dir / "tiny-f32.gguf", cfg, params, "f32", tok), cfg, params


def printable_head(params, tok):
    """Zero the output columns of every token that is not printable ASCII text, so greedy outputs (trunk and
    NextN head, which shares the lm_head) are plain text that llama.cpp prints and re-tokenizes as we do."""
    ok = np.array([k == TokenType.NORMAL and tok.token_bytes(i) != b"" and
                   all(0x20 <= c < 0x7F for c in tok.token_bytes(i)) for i, k in enumerate(tok.token_types)])
    return dataclasses.replace(params, lm_head=params.lm_head * jnp.asarray(ok, params.lm_head.dtype)[None, :])


@pytest.fixture(scope="session")
def random_model(io_dir, tok):
    """(path, cfg, params): tiny_params (std 0.08 blocks: the logits depend on every layer) with a printable
    output head, f32 GGUF. For logits parity and greedy generation."""
    cfg, params = tiny_config(), printable_head(tiny_params(), tok)
    return write_gguf(io_dir / "random-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="session")
def drafting_model(io_dir, tok):
    """(path, cfg, params): tests.spec_fixtures' model whose NextN head agrees with the trunk about half the
    time (every acceptance count 0..K occurs), printable output head, f32 GGUF."""
    cfg, params = drafting_params(0.06)
    params = printable_head(params, tok)
    return write_gguf(io_dir / "drafting-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="session")
def hf_dir(io_dir, tok):
    """(path, cfg, params): the tiny model as an HF GLM-4.5 directory (per-expert layout, tokenizer files)."""
    cfg, params = tiny_config(), tiny_params()
    return write_hf(io_dir / "hf-tiny", cfg, params, tokenizer=tok), cfg, params
