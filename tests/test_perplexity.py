"""mtp_jax.perplexity without llama.cpp: chunking and scoring against a direct forward, the logits-file codec against
a NumPy transcription of llama-perplexity's C, the file format and its checks, the statistics' formulas."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mtp_jax import perplexity as PP
from mtp_jax.cli import EMBEDDED_MODEL
from mtp_jax.io.load import load_model
from mtp_jax.model import forward


@pytest.fixture(scope="module")
def tiny():
    """The embedded trained model's trunk (it loads in a second; random params take longer to draw)."""
    cfg, params, _ = load_model(EMBEDDED_MODEL, dtype="float32", load_mtp=False)
    return cfg, params


def _chunks(cfg, n_chunk=3, n_ctx=16, seed=0):
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_chunk * n_ctx + 5)
    return PP.make_chunks(tokens, n_ctx)


def _llama_compress(logits: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    """perplexity.cpp log_softmax(n_vocab, logits, log_prob, tok) for one row, float32 as the C does."""
    f = np.float32
    mx, mn = f(logits.max()), f(logits.min())
    mn = max(mn, f(mx - f(16)))
    lse = f(math.log(float(np.exp((logits - mx).astype(np.float32)).astype(np.float64).sum())))
    scale = f(f(mx - mn) / f(65535))
    if not scale:
        return scale, f(f(mn - mx) - lse), np.zeros(logits.shape, np.uint16)
    v = ((f(1) / scale) * (logits - mn).astype(np.float32)).astype(np.float32)
    q = np.where(logits > mn, np.rint(v), 0).astype(np.uint16)  # nearest_int: round half to even
    return scale, f(f(mn - mx) - lse), q


def test_kv_cache_types_score_through_the_cache(tiny):
    """-ctk/-ctv: the chunk is written into a cache of that type and read back (an f32 cache scores as no cache;
    a q4_0 one differs, by less than its quantization could move a probability)."""
    from mtp_jax.kvquant import KVTypes

    cfg, params = tiny
    chunks = _chunks(cfg, n_chunk=2, n_ctx=32)
    plain = np.concatenate([s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=2)])
    f32 = np.concatenate([s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=2, cache_types=KVTypes("f32", "f32"))])
    q4 = np.concatenate([s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=2, cache_types=KVTypes("q4_0", "q4_0"))])
    np.testing.assert_allclose(f32, plain, atol=1e-4)
    assert 1e-4 < np.abs(q4 - plain).max() < 0.5


def test_make_chunks_keeps_whole_chunks_and_refuses_a_short_text():
    c = PP.make_chunks(np.arange(50), 16)
    assert c.shape == (3, 16) and c[1, 0] == 16 and c.dtype == np.int32
    assert PP.make_chunks(np.arange(50), 16, max_chunks=2).shape == (2, 16)
    with pytest.raises(ValueError, match="you need at least 32 tokens to evaluate perplexity with a context of 16; "
                                         "the text tokenizes to only 31 tokens"):
        PP.make_chunks(np.arange(31), 16)


def test_scores_are_the_second_half_of_each_chunk_with_bos(tiny):
    cfg, params = tiny
    chunks = _chunks(cfg)  # 3 chunks, n_seq 2: the second batch is padded
    n_ctx, first = 16, 8
    got = [s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=2, bos_id=1)]
    one = [s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=1, bos_id=1)]
    assert len(got) == 3 and all(g.shape == (PP.n_scored(n_ctx),) == (7,) for g in got)
    fed = chunks.copy()
    fed[:, 0] = 1
    _, logits, _, _ = forward(params, jax.numpy.asarray(fed), None, cfg)
    lp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    want = -np.take_along_axis(np.asarray(lp[:, first:-1]), fed[:, first + 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.stack(got), np.stack(one), rtol=1e-5)
    no_bos = [s.nll for s in PP.evaluate(cfg, params, chunks, n_seq=2)]
    assert not np.allclose(np.stack(no_bos), np.stack(got))  # the first token matters to the scored half


def test_compress_is_llama_perplexitys_log_softmax():
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(0, 4, (6, 101)), np.zeros((1, 101))]).astype(np.float32)  # a flat row too
    logits[2, :50] = -40  # a row clipped at max - 16
    scale, min_lp, q = (np.asarray(x) for x in PP.compress(jax.numpy.asarray(logits)))
    for r in range(len(logits)):
        s, m, want = _llama_compress(logits[r])
        assert scale[r] == pytest.approx(s, rel=1e-6) and min_lp[r] == pytest.approx(m, rel=1e-5, abs=1e-5)
        assert np.abs(q[r].astype(int) - want).max() <= 1 and (q[r] == want).mean() > 0.95
    assert scale[-1] == 0 and not q[-1].any()
    lp = jax.nn.log_softmax(logits, axis=-1)
    decoded = scale[:, None] * q + min_lp[:, None]
    keep = logits > np.maximum(logits.min(-1), logits.max(-1) - 16)[:, None]
    assert np.abs(decoded - lp)[keep].max() <= 16 / 65535


def test_a_model_against_its_own_logits_file_has_zero_kld(tiny, tmp_path):
    cfg, params = tiny
    chunks = _chunks(cfg, n_chunk=3)
    path = tmp_path / "base.bin"
    with open(path, "wb") as f:
        PP.write_header(f, cfg.vocab_size, chunks)
        saved = list(PP.evaluate(cfg, params, chunks, n_seq=2, bos_id=1, save=True))
        for s in saved:
            f.write(s.rows.tobytes())
    R, nv = PP.n_scored(16), PP.row_width(cfg.vocab_size)
    assert path.stat().st_size == 8 + 12 + 4 * chunks.size + 2 * 3 * R * nv
    base = PP.read_logits_file(path, cfg.vocab_size)
    assert (base.n_ctx, base.n_vocab) == (16, cfg.vocab_size) and np.array_equal(base.tokens, chunks)
    np.testing.assert_array_equal(base.rows(2), saved[2].rows)
    res = list(PP.evaluate(cfg, params, base.tokens, n_seq=2, bos_id=1, base=base))
    t = {k: np.concatenate([r.kld[k] for r in res]) for k in res[0].kld}
    # zero up to the file's rounding of log-probs (steps of at most 16/65535)
    assert t["same_top"].all() and np.abs(t["kld"]).max() < 16 / 65535 and abs(t["kld"].mean()) < 1e-5
    np.testing.assert_allclose(t["nll_base"], t["nll"], atol=16 / 65535)
    np.testing.assert_allclose(t["nll"], np.concatenate([s.nll for s in saved]), rtol=1e-5)
    s = PP.kld_statistics(t)
    assert s["count"] == 3 * R and s["same_top"] == 1 and abs(s["log_ratio"]) < 1e-4


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"_logitz_" + b[8:], "not a llama-perplexity logits file"),
    (lambda b: b[:-1], r"539 bytes, but its header \(n_ctx 16, n_vocab 10, n_chunk 2\) makes 540 \(truncated\)"),
    (lambda b: b + b"\0\0", r"542 bytes, but its header .* makes 540$"),
    (lambda b: b[:12] + np.int32(11).tobytes() + b[16:], "logits of a vocabulary of 11 tokens, the model has 10"),
    (lambda b: b[:8] + np.int32(2).tobytes() + b[12:], r"bad header \(n_ctx 2"),
    (lambda b: b[:20] + np.int32(10).tobytes() + b[24:], r"token ids outside the vocabulary \[0, 10\): \[10\]"),
])
def test_bad_logits_files_name_the_file(tmp_path, mutate, message):
    chunks = np.arange(32).reshape(2, 16) % 10
    good = tmp_path / "good.bin"
    with open(good, "wb") as f:
        PP.write_header(f, 10, chunks)
        f.write(bytes(2 * 2 * PP.n_scored(16) * PP.row_width(10)))
    PP.read_logits_file(good, 10)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(PP.LogitsFileError, match=f"^{bad}: {message}"):
        PP.read_logits_file(bad, 10)


def test_ppl_estimate_is_llama_perplexitys_formula():
    nll = np.array([1.0, 2.0, 4.0, 3.0])
    mean, var = nll.mean(), (nll ** 2).mean() - nll.mean() ** 2
    ppl, err = PP.ppl_estimate(nll)
    assert ppl == pytest.approx(math.exp(mean)) and err == pytest.approx(math.exp(mean) * math.sqrt(var / 3))
    assert math.isnan(PP.ppl_estimate(np.ones(5))[1])


def test_kld_statistics_and_report():
    rng = np.random.default_rng(2)
    n = 200
    nll = rng.gamma(2, 1, n)
    t = {"nll": nll, "nll_base": nll * 0.9, "kld": rng.gamma(1, 0.01, n), "p_diff": rng.normal(0, 0.01, n),
         "same_top": rng.random(n) < 0.9}
    s = PP.kld_statistics(t)
    assert s["ppl"] == pytest.approx(math.exp(nll.mean())) and s["ppl_base"] == pytest.approx(math.exp(0.9 * nll.mean()))
    assert s["log_ratio"] == pytest.approx(0.1 * nll.mean()) and s["cor"] == pytest.approx(1)
    assert s["kld"] == pytest.approx(t["kld"].mean()) and s["kld_err"] == pytest.approx(t["kld"].std() / math.sqrt(n - 1))
    assert s["rms_dp"] == pytest.approx(math.sqrt((t["p_diff"] ** 2).mean()))
    assert s["same_top"] == pytest.approx(t["same_top"].mean())
    lines = PP.kld_report(t)
    assert f"Mean    KLD: {t['kld'].mean():10.6f} ± " in lines[lines.index("====== KL divergence statistics ======") + 1]
    assert f"Maximum KLD: {t['kld'].max():10.6f}" in lines and f"Median  KLD: {np.median(t['kld']):10.6f}" in lines
    assert f" 5.0%   KLD: {np.quantile(t['kld'], 0.05):10.6f}" in lines
    assert lines[-1] == f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:5.3f} %"
    line = PP.kld_chunk_line(3, s)
    assert line.startswith(f"   3    {s['ppl']:9.4f} ± ") and line.endswith(" %")
