"""Parity with llama.cpp on tiny random glm4moe GGUFs written by us: llama.cpp loads and runs them, the trunk's
logits agree, greedy generation agrees token for token, and MTP speculative decoding (llama-speculative-simple
--spec-type draft-mtp) drafts the same tokens and accepts the same number at every step: the proof that our
NextN head computes what llama.cpp's graph_mtp computes."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import speculative
from mtp_jax.generate import generate
from mtp_jax.llama_cpp import speculative_counts
from mtp_jax.model import forward

pytestmark = pytest.mark.peer

PROMPT = "The quick brown fox jumps over the lazy dog, and the weather holds"
# f32 weights, f32 KV cache, no flash attention: measured max |logit diff| 1.6e-6 (logits up to ~2.2)
LOGIT_TOL = 1e-5
# llama.cpp matching our numerics: one thread (OpenMP spins on busy cores), f32 KV caches (target and draft),
# no flash attention (its CPU kernel accumulates in f16), prompt text taken verbatim
COMMON = ["-t", 1, "-tb", 1, "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-escape", "-c", 512, "--temp", 0]


def test_logits_match_llama_cpp(peer, random_model, tok):
    path, cfg, params = random_model
    ids = tok.encode(PROMPT + " in the northern valley.")
    theirs = peer.logits(path, ids)
    _, ours, _, _ = forward(params, jnp.asarray([ids]), None, cfg)
    ours = np.asarray(ours[0])
    assert theirs.shape == ours.shape == (len(ids), cfg.vocab_size)
    diff = np.abs(ours - theirs).max()
    assert diff < LOGIT_TOL, f"max |logit diff| {diff:.3g} (logits up to {np.abs(ours).max():.3g})"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


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


def _spec_steps(stderr: str) -> list[tuple[list[int], int, int]]:
    """Per verify step of llama-speculative-simple -lv 5: (drafted ids, accepted, draft size)."""
    steps, drafts = [], []
    for line in stderr.splitlines():
        if m := re.search(r"draft candidate +0, pos +(\d+): +(\d+)", line):
            drafts.append(int(m.group(2)))
        elif m := re.search(r"accepted (\d+)/(\d+) draft tokens", line):
            n = int(m.group(2))
            steps.append((drafts[:n], int(m.group(1)), n))
            drafts = []
    return steps


def test_mtp_speculative_matches_llama_speculative_simple(peer, drafting_model, tok, tmp_path):
    """Greedy draft-mtp with K drafts: same text, same drafted tokens, same accepted count at every step.

    Step alignment: llama-speculative-simple evaluates the prompt but its last token, then drafts that token's
    successor with the MTP head; we prefill the whole prompt and take the first token from the trunk. So llama
    gets our prompt plus our first generated token t_N: both then draft from the pair (h_{N-1}, t_N).
    Its budget: it stops once it has generated more than -n tokens and caps each draft at n - generated - 1
    tokens (common_speculative_draft truncates); we run longer and compare its steps with ours, capped alike."""
    path, cfg, params = drafting_model
    K, n_predict = 3, 48
    prompt = "The quick brown fox jumps over the lazy dog.\n"
    ids = tok.encode(prompt)
    res = speculative.generate(params, cfg, [ids], num_draft=K, max_new_tokens=n_predict + 2 * K + 2, trace=True)
    first, rest = res.tokens[0][0], res.tokens[0][1:]
    text = prompt + tok.decode([first])
    assert peer.tokenize(path, text, tmp=tmp_path) == ids + [first]  # the shifted prompt tokenizes as intended
    p = peer.run_until(
        "llama-speculative-simple", "-m", path, "-p", text, "-n", n_predict, "--spec-type", "draft-mtp",
        "--spec-draft-n-max", K, "--spec-draft-p-min", 0, "-ctkd", "f32", "-ctvd", "f32", "-lv", 5, *COMMON,
        ok=lambda p: "n_accept" in p.stderr and "#acc rate/pos" in p.stderr)
    theirs = _spec_steps(p.stderr)
    ours = res.stats["trace"]
    assert len(theirs) >= n_predict // (K + 1)
    generated = 0
    for i, (drafts, acc, n) in enumerate(theirs):
        assert drafts == ours[i]["drafted"][:n], f"step {i}: drafts {drafts} vs ours {ours[i]['drafted']}"
        assert acc == min(ours[i]["accepted"], n), f"step {i}"
        generated += acc + 1
        if ours[i]["accepted"] > n:  # llama's draft was cut by its budget: the schedules part here
            assert generated >= n_predict
            break
    out = p.stdout.strip()
    assert out.startswith(text.encode())
    theirs_text = out[len(text.encode()):]
    assert theirs_text == tok.decode_bytes(rest)[: len(theirs_text)] and len(theirs_text) >= n_predict
    n_accept = speculative_counts(p.stderr)[1]
    assert n_accept == sum(acc for _, acc, _ in theirs)
    hist = np.bincount([acc for _, acc, _ in theirs], minlength=K + 1)
    assert (hist > 0).all(), f"acceptance counts {hist} do not exercise every path"
