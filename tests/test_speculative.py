"""Speculative decoding with the NextN head: losslessness, rollback, statistics, edge cases."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import generate as plain
from mtp_jax import kvcache
from mtp_jax import model as M
from mtp_jax import speculative as SP
from mtp_jax.sampling import Sampling, verify_drafts
from tests.spec_fixtures import drafting_params

CFG, PARAMS = drafting_params(0.06)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [1, 2]]


@pytest.fixture(scope="module")
def greedy_ref():
    return plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=24, eos_ids=[]).tokens


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_greedy_mtp_equals_plain_greedy_with_eos_midway(K, greedy_ref):
    """Must-show 1: token-for-token equality, batch 3, different prompt lengths, EOS mid-way in one row."""
    eos = greedy_ref[1][6]
    assert eos not in greedy_ref[1][:6]
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=24, eos_ids=[eos]).tokens
    assert len(ref[1]) == 7 and ref[1][-1] == eos
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=K, max_new_tokens=24, eos_ids=[eos])
    assert res.tokens == ref
    hist = res.stats["accept_hist"]
    assert len(hist) == K + 1 and hist[0] > 0 and hist[K] > 0  # both rejections and full acceptance happened
    if K >= 2:
        assert sum(hist[1:K]) > 0  # and partial acceptance: rows accept different counts


def test_cache_after_loop_equals_fresh_prefill():
    """Must-show 2: the trunk cache up to each row's length equals a fresh prefill of its final sequence."""
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=3, max_new_tokens=17, eos_ids=[], return_cache=True)
    cache = res.stats["cache"]
    lengths = np.asarray(cache.lengths)
    for b, (p, out) in enumerate(zip(PROMPTS, res.tokens)):
        seq = p + out[:-1]  # the newest token is emitted, not yet cached
        assert lengths[b] == len(seq)
        fresh = kvcache.init_trunk_cache(CFG, 1, len(seq))
        _, _, fresh, _ = M.forward(PARAMS, jnp.asarray([seq]), fresh, CFG)
        for ours, ref in zip(cache.k + cache.v, fresh.k + fresh.v):
            np.testing.assert_allclose(np.asarray(ours[:, b, : len(seq)]), np.asarray(ref[:, 0]), atol=1e-4)


def _tv(counts, p):
    return 0.5 * np.abs(counts / counts.sum() - p).sum()


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_rejection_sampler_reproduces_target(greedy_draft):
    """Must-show 3: for random p, q over 10 tokens, 100k draws of the first emitted token follow p, not q."""
    rng = np.random.default_rng(0)
    V, N = 10, 100_000
    p = rng.dirichlet(np.ones(V)).astype(np.float32)
    q = rng.dirichlet(np.ones(V)).astype(np.float32)
    key_d, key_v = jax.random.split(jax.random.key(0))
    if greedy_draft:  # a deterministic draft is a one-hot q
        drafts = jnp.full((N, 1), int(np.argmax(q)), jnp.int32)
        qs = jax.nn.one_hot(drafts, V)
    else:
        drafts = jax.random.categorical(key_d, jnp.log(q), shape=(N, 1)).astype(jnp.int32)
        qs = jnp.broadcast_to(jnp.asarray(q), (N, 1, V))
    target = jnp.broadcast_to(jnp.log(jnp.asarray(p)), (N, 2, V))
    n_acc, nxt = verify_drafts(key_v, target, qs, drafts, Sampling(temperature=1.0))
    first = np.where(np.asarray(n_acc) > 0, np.asarray(drafts[:, 0]), np.asarray(nxt))
    counts = np.bincount(first, minlength=V).astype(np.float64)
    assert _tv(counts, p) < 0.01
    assert _tv(counts, q) > 0.1


def _chi2_homogeneity(a, b):
    """Two-sample chi-square statistic over the categories seen; returns (stat, degrees of freedom)."""
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    tot = a + b
    ea, eb = tot * a.sum() / tot.sum(), tot * b.sum() / tot.sum()
    return float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum()), int(keep.sum() - 1)


# chi-square critical values at p = 0.001
_CHI2_999 = {d: c for d, c in [(0, 1e-9), (1, 10.83), (2, 13.82), (3, 16.27), (4, 18.47), (5, 20.52), (6, 22.46), (7, 24.32)]}


@pytest.mark.parametrize("sampling, draft_sampling", [
    (Sampling(temperature=1.0), False),
    (Sampling(temperature=1.0), True),
    (Sampling(temperature=1.5, top_k=5, top_p=0.9), True),
])
def test_end_to_end_sampling_matches_plain_distribution(sampling, draft_sampling):
    """Must-show 4: tokens 1..3 over 3000 independent rows, MTP (K=2) vs plain sampling: chi-square."""
    cfg, params = drafting_params(0.06, vocab_size=8, eos_token_ids=())
    n = 3000
    prompts = [[1, 2, 3]] * n
    a = plain.generate(params, cfg, prompts, max_new_tokens=3, sampling=sampling, seed=1).tokens
    r = SP.generate(params, cfg, prompts, num_draft=2, max_new_tokens=3, sampling=sampling, seed=2,
                    draft_sampling=draft_sampling)
    assert r.stats["accept_hist"][1] + r.stats["accept_hist"][2] > 0.2 * n  # drafts do get accepted
    a, b = np.asarray(a), np.asarray(r.tokens)
    for pos in range(3):
        stat, df = _chi2_homogeneity(np.bincount(a[:, pos], minlength=8), np.bincount(b[:, pos], minlength=8))
        assert stat < _CHI2_999[df], (pos, stat, df)
        assert df >= 1 or pos == 0  # the later positions are genuinely random


# ---- statistics and trace --------------------------------------------------------------------------


def test_statistics_and_ndjson_trace(tmp_path, greedy_ref):
    """The trace's lines against the result and against greedy decoding: each row's steps in order; accepted
    drafts are the greedy tokens, a rejected draft is not; emitted = accepted drafts + the target's token (cut only
    at the budget), together the row's output after the prefill's token; statistics are the lines' counts."""
    path = tmp_path / "trace.ndjson"
    K, budget = 3, 12
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=K, max_new_tokens=budget, eos_ids=[], trace=path)
    assert res.tokens == [r[:budget] for r in greedy_ref]
    s = res.stats
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sum(s["accept_hist"]) == s["row_steps"] == len(lines)
    for b, ref in enumerate(greedy_ref):
        rows = [ln for ln in lines if ln["row"] == b]
        assert [ln["step"] for ln in rows] == list(range(len(rows)))
        pos = 1  # the prefill emitted ref[0]
        for i, ln in enumerate(rows):
            a, drafted, emitted = ln["accepted"], ln["drafted"], ln["emitted"]
            assert len(drafted) == K and 0 <= a <= K
            assert drafted[:a] == ref[pos: pos + a] and (a == K or drafted[a] != ref[pos + a])
            assert emitted == ref[pos: pos + len(emitted)]
            last = i == len(rows) - 1
            assert len(emitted) == a + 1 or (last and len(emitted) < a + 1 and pos + len(emitted) == budget)
            pos += len(emitted)
        assert pos == len(res.tokens[b]) == budget
    hist = np.bincount([ln["accepted"] for ln in lines], minlength=K + 1)
    assert s["accept_hist"] == hist.tolist()
    per_pos = [sum(ln["accepted"] > i for ln in lines) for i in range(K)]
    assert np.allclose(np.asarray(s["accept_rate_per_pos"]) * len(lines), per_pos)
    assert np.isclose(s["mean_tokens_per_step"], (hist * np.arange(1, K + 2)).sum() / hist.sum())
    assert s["trunk_forwards"] == max(ln["step"] for ln in lines) + 2  # verify steps + prefill


def test_trace_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.ndjson"
    monkeypatch.setenv("MTP_JAX_TRACE", str(path))
    SP.generate(PARAMS, CFG, PROMPTS[:1], num_draft=2, max_new_tokens=4, eos_ids=[])
    assert path.read_text().count("\n") >= 1


# ---- edge cases: must-show 5 -----------------------------------------------------------------------


def test_k0_falls_back_to_plain(greedy_ref):
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=0, max_new_tokens=24, eos_ids=[])
    assert res.tokens == greedy_ref


def test_budget_smaller_than_k_plus_1(greedy_ref):
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=4, max_new_tokens=2, eos_ids=[])
    assert res.tokens == [r[:2] for r in greedy_ref]
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=4, max_new_tokens=1, eos_ids=[])
    assert res.tokens == [r[:1] for r in greedy_ref]


def test_cache_nearly_full_stops_rows_cleanly(greedy_ref):
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=3, max_new_tokens=24, eos_ids=[], cache_size=14)
    for p, got, ref in zip(PROMPTS, res.tokens, greedy_ref):
        assert 1 <= len(got) < 24 and got == ref[: len(got)]
        assert len(p) + len(got) - 1 + 3 + 1 <= 14 + 3  # never ran a verify past the cache


def test_row_done_at_prefill(greedy_ref):
    eos = greedy_ref[0][0]  # row 0's first token is EOS: done right after prefill
    ref = plain.generate(PARAMS, CFG, PROMPTS, max_new_tokens=10, eos_ids=[eos]).tokens
    res = SP.generate(PARAMS, CFG, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[eos])
    assert res.tokens[0] == [eos] and res.tokens == ref


def test_empty_prompt_and_bad_k_are_errors():
    with pytest.raises(ValueError, match="empty"):
        SP.generate(PARAMS, CFG, [[1], []], num_draft=2)
    with pytest.raises(ValueError, match="num_draft"):
        SP.generate(PARAMS, CFG, [[1]], num_draft=-1)


def test_model_without_nextn_is_an_error():
    import dataclasses
    with pytest.raises(ValueError, match="NextN"):
        SP.generate(dataclasses.replace(PARAMS, nextn=None), CFG, [[1]], num_draft=2)


# ---- one compiled program: must-show 6 -------------------------------------------------------------


def _hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Compiled HLO text -> ({computation name: its instruction lines}, the entry computation's name)."""
    comps, entry, lines = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            lines = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif line == "}":
            lines = None
        elif lines is not None:
            lines.append(line)
    return comps, entry


def _reachable(comps: dict[str, list[str]], root: str) -> set[str]:
    """``root`` and every computation it calls (fusions, nested whiles, reductions ...), transitively."""
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo += [n for line in comps[c] for n in re.findall(r"%([\w.\-]+)", line) if n in comps]
    return seen


@pytest.mark.parametrize("auto", [False, True])
def test_draft_and_verify_run_inside_the_while_body(auto):
    """Must-show 6: one executable whose top-level while loop's body computation (and what it calls) holds every
    matmul of the "draft" (NextN block) and "verify" (trunk: both layer stacks) named scopes. XLA may hoist what
    does not depend on the loop state, such as the causal mask's iota, out of the loop: matmuls it cannot."""
    tokens, lens = M.pad_prompts(PROMPTS, CFG)
    B, S = len(PROMPTS), 40
    c = SP._Static(CFG, Sampling(), 3, 16, False, False, auto=auto, p_min=0.5 if auto else 0.0)
    args = (PARAMS, jnp.asarray(tokens), jnp.asarray(lens), kvcache.init_trunk_cache(CFG, B, S),
            kvcache.init_nextn_cache(CFG, B, S), jax.random.key(0), jnp.full((B,), 16, jnp.int32),
            jnp.asarray([-1], jnp.int32), jnp.ones((2, 5), jnp.float32), (jnp.zeros(3, jnp.int32),) * 2)
    hlo = SP._spec_loop.lower(*args, c=c).compile().as_text()
    assert hlo.count("HloModule") == 1  # one executable
    comps, entry = _hlo_computations(hlo)
    loops = [ln for ln in comps[entry] if " while(" in ln and 'op_name="jit(_spec_loop)/while"' in ln]
    # the speculative loop is one while in the entry computation (auto: then a loop of plain stretches and
    # probes, with loops of plain steps and of speculative steps inside, for when drafting stops paying)
    assert len(loops) == (2 if auto else 1)
    inside = set().union(*(_reachable(comps, re.search(r"body=%([\w.\-]+)", lp).group(1)) for lp in loops))

    def ops(scope: str, kinds: str, within: set[str]) -> list[str]:
        return [ln for n in within for ln in comps[n]
                if re.search(rf" ({kinds})\(", ln) and re.search(rf'op_name="[^"]*/{scope}/', ln)]

    matmuls = "dot|convolution|custom-call"  # weight matmuls may be custom calls (mtp_jax kernels)
    for scope in ("draft", "verify"):
        assert ops(scope, matmuls, inside), f"no {scope} matmul in the while body"
        assert not ops(scope, matmuls, set(comps) - inside), f"{scope} matmuls outside the while body"
    assert ops("prefill", matmuls, set(comps) - inside) and not ops("prefill", matmuls, inside)  # runs once, before
    verify, draft = ops("verify", matmuls, inside), ops("draft", matmuls, inside)
    # (auto mode: the verify is one of K+1 run-once loops over its lengths, the head steps a nested while)
    assert all(any(re.search(f"/verify/(.*/)?{stack}/", ln) for ln in verify) for stack in ("dense_layers", "moe_layers"))
    assert all(any(re.search(f"/draft/(.*/)?{part}/", ln) for ln in draft) for part in ("attention", "ffn"))
