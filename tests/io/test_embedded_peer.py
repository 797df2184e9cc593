"""The embedded model in llama.cpp (issue: embedded default model, must-show 3): llama.cpp loads the shipped
GGUF, tokenizes a held-out prompt to the same ids as ours, and with --spec-type draft-mtp reaches an acceptance
rate close to ours on the same prompt (greedy, K=2)."""

from __future__ import annotations

import pytest

from mtp_jax import speculative
from mtp_jax.cli import EMBEDDED_MODEL
from mtp_jax.io.load import load_model
from mtp_jax.llama_cpp import speculative_counts

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Run the command line.\"\"\"\n"


@pytest.fixture(scope="module")
def embedded():
    if not EMBEDDED_MODEL.exists():
        pytest.fail(f"the embedded model is missing: {EMBEDDED_MODEL}")
    return load_model(EMBEDDED_MODEL, dtype="float32")


@pytest.mark.peer
def test_llama_cpp_tokenizes_the_embedded_model_like_us(peer, embedded, tmp_path):
    _, _, tok = embedded
    text = open(__file__.replace("test_embedded_peer.py", "conftest.py")).read()[:2000]  # some Python source
    for t in (PROMPT, text):
        assert peer.tokenize(EMBEDDED_MODEL, t, tmp=tmp_path) == tok.encode(t, add_special=False)


@pytest.mark.peer
def test_llama_cpp_drafts_with_a_similar_acceptance_rate(peer, embedded):
    cfg, params, tok = embedded
    K, n = 2, 48
    p = peer.run_until("llama-speculative-simple", "-m", EMBEDDED_MODEL, "--spec-type", "draft-mtp",
                       "--spec-draft-n-max", K, "-p", PROMPT, "-n", n, "--temp", 0, "-t", 1, "-c", 512,
                       ok=lambda p: "n_accept" in p.stderr)
    drafted, accepted = speculative_counts(p.stderr)
    theirs = accepted / drafted
    res = speculative.generate(params, cfg, [tok.encode(PROMPT, add_special=True)], num_draft=K, max_new_tokens=n)
    hist = res.stats["accept_hist"]
    ours = sum(i * h for i, h in enumerate(hist)) / (K * sum(hist))
    assert drafted > 20 and 0.3 < theirs
    assert abs(ours - theirs) < 0.15, (ours, theirs)
