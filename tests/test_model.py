"""Trunk and NextN head on CPU: cache consistency, sharding, NextN shapes, plain generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import kvcache
from mtp_jax import model as M
from mtp_jax import mtp, sharding
from mtp_jax.generate import generate
from mtp_jax.sampling import Sampling
from tests.helpers import tiny_config, tiny_params

CFG = tiny_config()
PARAMS = tiny_params(0)


def _rows(lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lens]


def test_prefill_then_decode_equals_full_forward():
    """Must-show 2: prefill of T tokens (rows of different lengths) then a one-token decode gives the logits
    of a full forward over T+1 tokens, row by row."""
    lens = [5, 11, 8]
    rows = _rows([n + 1 for n in lens])
    prompts = [r[:-1] for r in rows]
    tokens, n_valid = M.pad_prompts(prompts, CFG)
    cache = kvcache.init_trunk_cache(CFG, 3, 32)
    _, last_logits, cache, _ = M.forward_jit(PARAMS, jnp.asarray(tokens), cache, CFG, n_valid=jnp.asarray(n_valid),
                                             logits="last")
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    nxt = jnp.asarray([[r[-1]] for r in rows])
    _, dec_logits, cache, _ = M.forward_jit(PARAMS, nxt, cache, CFG)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(lens) + 1)
    for b, r in enumerate(rows):
        _, full, _, _ = M.forward(PARAMS, jnp.asarray([r]), None, CFG)
        np.testing.assert_allclose(np.asarray(last_logits[b, 0]), np.asarray(full[0, -2]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(dec_logits[b, 0]), np.asarray(full[0, -1]), atol=2e-5)


def test_multi_token_block_after_cache_matches_full_forward():
    """A verify-style block of 4 tokens on top of a cache equals the full forward at those positions."""
    rows = _rows([12, 9], seed=1)
    cache = kvcache.init_trunk_cache(CFG, 2, 32)
    tokens, n_valid = M.pad_prompts([r[:-4] for r in rows], CFG)
    _, _, cache, _ = M.forward_jit(PARAMS, jnp.asarray(tokens), cache, CFG, n_valid=jnp.asarray(n_valid))
    _, blk, _, _ = M.forward_jit(PARAMS, jnp.asarray([r[-4:] for r in rows]), cache, CFG)
    for b, r in enumerate(rows):
        _, full, _, _ = M.forward(PARAMS, jnp.asarray([r]), None, CFG)
        np.testing.assert_allclose(np.asarray(blk[b]), np.asarray(full[0, -4:]), atol=2e-5)


def test_sharded_forward_equals_single_device():
    """Must-show 3: params sharded over a mesh of 4 fake CPU devices give the same logits."""
    assert len(jax.devices()) >= 4
    tokens = jnp.asarray(_rows([16, 16], seed=2))
    _, ref, _, _ = M.forward(PARAMS, tokens, None, CFG)
    for shape in [dict(model=4), dict(data=2, model=2), dict(expert=4), dict(data=2, expert=2)]:
        mesh = sharding.make_mesh(**shape)
        sp = sharding.shard_params(PARAMS, CFG, mesh)
        assert sharding.sharded_fraction(sp) > 0.4, shape  # experts alone are ~47% of this model
        x = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        _, out, _, _ = jax.jit(M.forward, static_argnames=("cfg",))(sp, x, None, CFG)
        assert len(out.sharding.device_set) == 4
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, err_msg=str(shape))


def test_nextn_head_on_trunk_hidden_states():
    """Must-show 4: the head runs on trunk hidden states; shapes, cache lengths, and its cache-incremental
    form equals the whole-sequence form."""
    rows = _rows([10, 10], seed=3)
    tokens = jnp.asarray(rows)
    h, _, _, _ = M.forward(PARAMS, tokens, None, CFG)
    h_in = mtp.shift_hidden(h)  # (h_{j-1}, t_j), zeros at j = 0 (llama.cpp pending_h)
    nextn = jax.jit(mtp.nextn_forward, static_argnames=("cfg",))
    out_h, logits, _, _ = nextn(PARAMS, h_in, tokens, None, CFG)
    assert out_h.shape == (2, 10, CFG.hidden_size) and logits.shape == (2, 10, CFG.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
    cache = kvcache.init_nextn_cache(CFG, 2, 16)
    _, l1, cache, _ = nextn(PARAMS, h_in[:, :7], tokens[:, :7], cache, CFG)
    _, l2, cache, _ = nextn(PARAMS, h_in[:, 7:], tokens[:, 7:], cache, CFG)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 10])
    np.testing.assert_allclose(np.concatenate([l1, l2], axis=1), np.asarray(logits), atol=2e-5)


_full = jax.jit(M.forward, static_argnames=("cfg",))


def _naive_greedy(prompt, n, width=16):
    """Greedy by full causal forwards without a cache (right padding does not affect earlier positions)."""
    seq = list(prompt)
    for _ in range(n):
        _, lg, _, _ = _full(PARAMS, jnp.asarray([seq + [0] * (width - len(seq))]), None, CFG)
        seq.append(int(jnp.argmax(lg[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_plain_greedy_generate_matches_naive_loop():
    prompts = _rows([3, 7, 5], seed=4)
    res = generate(PARAMS, CFG, prompts, max_new_tokens=6, eos_ids=[])
    for p, got in zip(prompts, res.tokens):
        assert got == _naive_greedy(p, 6)


def test_plain_generate_stops_rows_independently():
    prompts = _rows([4, 6], seed=5)
    free = generate(PARAMS, CFG, prompts, max_new_tokens=8, eos_ids=[]).tokens
    stop_tok = free[0][2]  # row 0 stops at its 3rd token (emitted, then done)
    res = generate(PARAMS, CFG, prompts, max_new_tokens=8, eos_ids=[stop_tok]).tokens
    assert res[0] == free[0][: free[0].index(stop_tok) + 1]
    k = free[1].index(stop_tok) + 1 if stop_tok in free[1] else 8
    assert res[1] == free[1][:k]


def test_sampled_generate_is_seeded_and_valid():
    prompts = _rows([4, 4], seed=6)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(PARAMS, CFG, prompts, max_new_tokens=10, sampling=s, seed=1, eos_ids=[]).tokens
    b = generate(PARAMS, CFG, prompts, max_new_tokens=10, sampling=s, seed=1, eos_ids=[]).tokens
    c = generate(PARAMS, CFG, prompts, max_new_tokens=10, sampling=s, seed=2, eos_ids=[]).tokens
    assert a == b and a != c
    assert all(0 <= t < CFG.vocab_size for row in a for t in row)


def test_cache_full_stops_row():
    res = generate(PARAMS, CFG, [[1, 2, 3]], max_new_tokens=20, eos_ids=[], cache_size=8)
    assert len(res.tokens[0]) == 6  # 3 prompt + 5 generated fill 8 slots... the 6th token needs no slot


# ---- bad input: must-show 5 ------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_routed_experts=9), "multiple of"),
    (dict(topk_group=3), "topk_group"),
    (dict(partial_rotary_factor=0.2), "rotary_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(eos_token_ids=(600,)), "outside the vocabulary"),
])
def test_inconsistent_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**bad)


def test_unknown_yaml_key_is_a_value_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  vocab_size: 10\n  hiden_size: 4\n")
    with pytest.raises(ValueError, match="unknown Glm4MoeConfig keys"):
        from mtp_jax.config import ModelConfig
        ModelConfig.from_yaml(f)


def test_prompt_longer_than_cache_is_a_value_error():
    with pytest.raises(ValueError, match="does not fit a cache"):
        generate(PARAMS, CFG, [list(range(1, 20))], max_new_tokens=4, cache_size=16)


def test_token_out_of_vocab_is_a_value_error():
    with pytest.raises(ValueError, match="out of vocabulary"):
        generate(PARAMS, CFG, [[1, CFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="out of vocabulary"):
        generate(PARAMS, CFG, [[-1, 3]], max_new_tokens=2)


def test_empty_prompt_is_a_value_error():
    with pytest.raises(ValueError, match="empty"):
        generate(PARAMS, CFG, [[1, 2], []], max_new_tokens=2)
