"""Parity with llama.cpp for Step-3.5 (family / GGUF arch step35) on the step35-tiny config written by us: five trunk
layers mixing full attention (4 query heads, half the dims rotated) and sliding-window attention (6 query heads,
window 4, its own RoPE base), head-wise attention gates, a dense layer and MoE layers with a shared expert and SwiGLU
clamps, three chained MTP heads. llama.cpp loads the file and computes the same trunk logits on a prompt far longer
than the window; greedy llama-completion writes our text; llama-speculative-simple --spec-type draft-mtp (chained
heads: head i drafts token i + 1) drafts the same tokens and accepts the same count at every step as our speculative
loop for K = 1, 2, 3."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.generate import generate
from mtp_jax.io.gguf import write_gguf
from mtp_jax.model import forward
from tests.io.conftest import printable_head
from tests.io.llama_cpp_peer import COMMON
from tests.io.test_peer import PROMPT

pytestmark = pytest.mark.peer

LOGIT_TOL = 1e-4  # f32 weights and KV cache, no flash attention: measured max |diff| 3.7e-6 (logits up to 2.9)
# drafting_params' (noise, seed, mix, norm_noise): every acceptance count 0..K occurs for K = 1, 2, 3 (llama's
# counts: [17 16], [13 9 6], [12 8 3 3]), and the drafts tell llama.cpp's semantics from near misses (ours with each
# mutation against ours; llama.cpp takes 28 / 26 steps at K = 2 / 3): chaining head k's post-norm output (HF's MTP)
# moves a draft at step 18 / 13, handing head 0 the trunk's final-normed hidden (GLM's and DeepSeek's t_h_nextn) at
# step 1, head 0 drafting every step at step 0
DRAFTING = (0.03, 8, 0.2, 0.25)


@lru_cache(maxsize=None)
def tiny():
    return load_config("step35-tiny")


def _perturbed(params, seed: int, norm_noise: float, bias_noise: float = 0.05):
    """Normal noise on every norm (so that each is applied to the right thing: q vs k, enorm vs hnorm, ...) and on
    the router's selection bias (so that selection differs from weighting); drawn with numpy, nothing compiles."""
    rng = np.random.default_rng(seed + 1000)

    def f(path, x):
        name = path[-1].name
        scale = norm_noise if name.endswith("norm") else bias_noise if name == "bias" else 0.0
        return x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if scale else x

    return jax.tree_util.tree_map_with_path(f, params)


@lru_cache(maxsize=None)
def random_params(seed: int = 0):
    """std 0.08 weights (the logits depend on every layer; the 0.4 clamps bite), norms and selection biases off
    their defaults."""
    return _perturbed(P.init(jax.random.key(seed), tiny(), std=0.08), seed, norm_noise=0.3)


@lru_cache(maxsize=None)
def drafting_params(noise: float, seed: int, mix: float, norm_noise: float):
    """Heads that agree with the trunk part of the time (tests/spec_fixtures.py's construction): large embedding and
    lm_head, small blocks, every head's eh_proj passing the embedding half through, so head k drafts from its token
    nearly what the trunk predicts from it. Unlike spec_fixtures, eh_proj also mixes in the hidden half (a random
    matrix of gain ``mix``): the drafts then depend on the hidden each head is handed (the trunk's pre-norm residual
    for head 0, the previous head's pre-norm output for the others), which the comparison with llama.cpp checks."""
    cfg = tiny()
    p = _perturbed(P.init(jax.random.key(seed), cfg, std=noise), seed, norm_noise)
    D, V = cfg.hidden_size, cfg.vocab_size
    rng = np.random.default_rng(seed + 1)
    embed, head = rng.standard_normal((V, D)), rng.standard_normal((D, V))
    nextn = tuple(dataclasses.replace(n, eh_proj=jnp.asarray(np.concatenate(
        [np.eye(D), mix * rng.standard_normal((D, D)) / np.sqrt(D)]), jnp.float32)) for n in p.nextn)
    return dataclasses.replace(p, embed=jnp.asarray(embed, jnp.float32), lm_head=jnp.asarray(head, jnp.float32),
                               nextn=nextn)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("step35")


@pytest.fixture(scope="module")
def random_model(files, tok):
    """(path, cfg, params): random weights, printable output head, f32 GGUF with the three MTP blocks."""
    cfg, params = tiny(), printable_head(random_params(), tok)
    return write_gguf(files / "random-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="module")
def drafting_model(files, tok):
    cfg, params = tiny(), printable_head(drafting_params(*DRAFTING), tok)
    return write_gguf(files / "drafting-f32.gguf", cfg, params, "f32", tok), cfg, params


def test_the_tiny_config_exercises_every_step35_feature():
    cfg = tiny()
    trunk = range(cfg.num_hidden_layers)
    assert {cfg.layer_types[b] for b in trunk} == {"full_attention", "sliding_attention"}
    assert {cfg.mlp_layer_types[b] for b in trunk} == {"dense", "sparse"}
    assert cfg.num_sliding_attention_heads != cfg.num_attention_heads and cfg.rope_theta_swa != cfg.rope_theta
    assert cfg.sliding_window == 4 and cfg.num_nextn_predict_layers == 3
    assert any(cfg.swiglu_limits) and any(cfg.swiglu_limits_shared)


def test_logits_match_llama_cpp(peer, random_model, tok):
    """36 prompt tokens, window 4: the sliding layers' mask, both RoPE kinds, the clamps all count."""
    path, cfg, params = random_model
    ids = tok.encode(PROMPT + " in the northern valley.")
    assert len(ids) > 4 * cfg.sliding_window
    theirs = peer.logits_agree(path, cfg, params, ids, LOGIT_TOL)
    # the features matter at this tolerance: a whole-context window, or no clamps, moves the logits far more
    for overrides in ({"sliding_window": 4096}, {"swiglu_limits": (0.0,) * cfg.num_blocks,
                                                 "swiglu_limits_shared": (0.0,) * cfg.num_blocks}):
        other = np.asarray(forward(params, jnp.asarray([ids]), None, cfg.replace(**overrides))[1][0])
        assert np.abs(other - theirs).max() > 1000 * LOGIT_TOL, overrides


def test_greedy_generation_matches_llama_completion(peer, random_model, tok):
    """64 greedy tokens (16 windows) from llama-completion are ours."""
    path, cfg, params = random_model
    ids = tok.encode(PROMPT)
    ours = generate(params, cfg, [ids], max_new_tokens=64).tokens[0]
    assert len(ours) == 64
    want = PROMPT.encode() + tok.decode_bytes(ours)
    p = peer.run_until("llama-completion", "-m", path, "-p", PROMPT, "-n", 64, "-no-cnv", *COMMON,
                       ok=lambda p: len(p.stdout) >= len(want))
    assert p.stdout[: len(want)] == want
    assert p.stdout[len(want):].strip() == b""


@pytest.mark.parametrize("K", [1, 2, 3])
def test_mtp_speculative_matches_llama_speculative_simple(peer, drafting_model, tok, tmp_path, K):
    """Greedy draft-mtp with K drafts (head i drafts token i + 1): same text, same drafted tokens, same accepted
    count at every step (llama_cpp_peer.draft_mtp_agrees), every count 0..K taken."""
    hist = peer.draft_mtp_agrees(*drafting_model, tok, tmp_path, K=K)
    assert (hist > 0).all(), f"acceptance counts {hist} do not exercise every path"
