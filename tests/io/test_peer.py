"""Parity with llama.cpp on tiny random glm4moe GGUFs written by us: llama.cpp loads and runs them, the trunk's
logits agree, greedy generation agrees token for token, and MTP speculative decoding (llama-speculative-simple
--spec-type draft-mtp) drafts the same tokens and accepts the same number at every step: the proof that our
NextN head computes what llama.cpp's graph_mtp computes."""

from __future__ import annotations

import pytest

from mtp_jax.generate import generate
from tests.io import llama_cpp_peer

pytestmark = pytest.mark.peer

PROMPT = "The quick brown fox jumps over the lazy dog, and the weather holds"
# f32 weights, f32 KV cache, no flash attention: measured max |logit diff| 1.6e-6 (logits up to ~2.2)
LOGIT_TOL = 1e-5
COMMON = llama_cpp_peer.COMMON


def test_logits_match_llama_cpp(peer, random_model, tok):
    path, cfg, params = random_model
    ids = tok.encode(PROMPT + " in the northern valley.")
    peer.logits_agree(path, cfg, params, ids, LOGIT_TOL)


def test_greedy_generation_matches_llama_completion(peer, random_model, tok):
    """llama-completion loads our GGUF and generates; its 64 greedy tokens are ours."""
    path, cfg, params = random_model
    ids = tok.encode(PROMPT)
    res = generate(params, cfg, [ids], max_new_tokens=64)
    ours = res.tokens[0]
    assert len(ours) == 64
    want = (PROMPT.encode() + tok.decode_bytes(ours))
    p = peer.run_until("llama-completion", "-m", path, "-p", PROMPT, "-n", 64, "-no-cnv", *COMMON,
                       ok=lambda p: len(p.stdout) >= len(want))
    assert p.stdout[: len(want)] == want
    assert p.stdout[len(want):].strip() == b""


def test_mtp_speculative_matches_llama_speculative_simple(peer, drafting_model, tok, tmp_path):
    """Greedy draft-mtp with K drafts: same text, same drafted tokens, same accepted count at every step
    (llama_cpp_peer.draft_mtp_agrees explains the step alignment and llama's budget), every count 0..K taken."""
    hist = peer.draft_mtp_agrees(*drafting_model, tok, tmp_path)
    assert (hist > 0).all(), f"acceptance counts {hist} do not exercise every path"
