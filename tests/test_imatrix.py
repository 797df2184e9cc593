"""imatrix statistics as auxiliary outputs: what is recorded, masking, MTP entries, merge == concatenation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import imatrix as IM
from mtp_jax import model as M
from mtp_jax.io.imatrix_gguf import combine
from tests.helpers import tiny_config, tiny_params

CFG = tiny_config()
PARAMS = tiny_params(0)


def _chunks(n, T=32, seed=0):
    return np.random.default_rng(seed).integers(1, CFG.vocab_size, (n, T)).astype(np.int32)


def _names(cfg):
    """The weights llama-imatrix records for this model (trunk), plus the NextN block's (ours only)."""
    trunk = []
    for i in range(cfg.num_hidden_layers):
        trunk += [f"blk.{i}.attn_{t}.weight" for t in ("q", "k", "v", "output")]
        if i < cfg.num_dense_layers:
            trunk += [f"blk.{i}.ffn_{t}.weight" for t in ("gate", "up", "down")]
        else:
            trunk += [f"blk.{i}.ffn_{t}.weight" for t in ("gate_inp", "gate_exps", "up_exps", "down_exps",
                                                           "gate_shexp", "up_shexp", "down_shexp")]
    n = cfg.num_hidden_layers
    mtp = [f"blk.{n}.nextn.eh_proj.weight"] + [f"blk.{n}.attn_{t}.weight" for t in ("q", "k", "v", "output")]
    mtp += [f"blk.{n}.ffn_{t}.weight" for t in ("gate_inp", "gate_exps", "up_exps", "down_exps", "gate_shexp",
                                                "up_shexp", "down_shexp")]
    return trunk, mtp


def test_entries_cover_trunk_and_nextn_with_right_shapes():
    col = IM.Collector(PARAMS, CFG, mtp=True, batch=2)
    col.add(_chunks(2))
    data = col.result(chunk_size=32, datasets=["t"])
    trunk, mtp = _names(CFG)
    neutral = f"blk.{CFG.num_hidden_layers}.nextn.embed_tokens.weight"
    assert set(data.in_sum2) == set(trunk) | set(mtp)  # embed_tokens: no separate tensor in this model
    E, D, F = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    assert data.in_sum2["blk.1.ffn_down_exps.weight"].shape == (E, F)
    assert data.in_sum2["blk.1.ffn_gate_exps.weight"].shape == (E, D)
    assert data.in_sum2[f"blk.{CFG.num_hidden_layers}.nextn.eh_proj.weight"].shape == (1, 2 * D)
    assert data.counts["blk.0.attn_q.weight"].tolist() == [64]  # tokens, not chunks
    # routed experts: per-expert counts add up to tokens x experts per token
    assert data.counts["blk.1.ffn_up_exps.weight"].sum() == 64 * CFG.num_experts_per_tok
    assert neutral not in data.in_sum2
    trunk_only = IM.Collector(PARAMS, CFG, mtp=False, batch=2)
    trunk_only.add(_chunks(2))
    assert set(trunk_only.result(32, ["t"]).in_sum2) == set(trunk)


def test_sum2_is_sum_of_squared_inputs():
    """blk.0.attn_q's input is the normed embedding of layer 0: check against a direct computation."""
    from mtp_jax.layers import rms_norm
    toks = _chunks(1)
    col = IM.Collector(PARAMS, CFG, mtp=False, batch=2)
    col.add(toks)
    x = rms_norm(PARAMS.embed[jnp.asarray(toks)], PARAMS.dense_layers.attn_norm[0], CFG.rms_norm_eps)
    np.testing.assert_allclose(col.sums["blk.0.attn_q.weight"][0][0], np.square(np.asarray(x)).sum((0, 1)),
                               rtol=1e-5)


def test_padding_is_masked():
    """Statistics from a forward with right padding equal those of the unpadded rows."""
    toks = _chunks(1, T=24)
    padded = np.concatenate([toks, np.zeros((1, 8), np.int32)], axis=1)
    fwd = jax.jit(M.forward, static_argnames=("cfg", "collect_stats"))
    _, _, _, s_pad = fwd(PARAMS, jnp.asarray(padded), None, CFG, n_valid=jnp.asarray([24]), collect_stats=True)
    _, _, _, s_ref = fwd(PARAMS, jnp.asarray(toks), None, CFG, collect_stats=True)
    a = IM.stats_to_entries(s_pad, PARAMS, CFG)
    b = IM.stats_to_entries(s_ref, PARAMS, CFG)
    for name in b:
        np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(a[name][1], b[name][1])


def test_merge_equals_collecting_over_concatenated_text():
    """Must-show 3: two files (chunks 0-1 and 2-4) combined == one collection over chunks 0-4."""
    toks = _chunks(5, seed=3)
    parts = []
    for sl in (slice(0, 2), slice(2, 5)):
        c = IM.Collector(PARAMS, CFG, batch=2)
        c.add(toks[sl])
        parts.append(c.result(32, ["a.txt"]))
    whole = IM.Collector(PARAMS, CFG, batch=2)
    whole.add(toks)
    ref = whole.result(32, ["a.txt"])
    merged = combine(parts)
    assert merged.chunk_count == ref.chunk_count == 5
    assert set(merged.in_sum2) == set(ref.in_sum2)
    for name in ref.in_sum2:
        np.testing.assert_allclose(merged.in_sum2[name], ref.in_sum2[name], rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(merged.counts[name], ref.counts[name])


def test_neutral_lookup_entries_when_the_head_has_its_own_embedding():
    import dataclasses
    nn = dataclasses.replace(PARAMS.nextn[0], embed_tokens=PARAMS.embed)
    params = dataclasses.replace(PARAMS, nextn=(nn,))
    col = IM.Collector(params, CFG, batch=2)
    col.add(_chunks(2))
    name = f"blk.{CFG.num_hidden_layers}.nextn.embed_tokens.weight"
    data = col.result(32, ["t"])
    assert data.counts[name].tolist() == [0.0] and data.in_sum2[name].shape == (1, CFG.hidden_size)
    assert data.metadata[IM.KEY_NEUTRAL] == [name]
    assert name not in col.result(32, ["t"], neutral_lookups=False).in_sum2


def test_model_without_nextn_warns_and_collects_trunk(caplog):
    import dataclasses
    col = IM.Collector(dataclasses.replace(PARAMS, nextn=None), CFG, mtp=True, batch=2)
    assert not col.mtp and "no NextN layer" in caplog.text
    col.add(_chunks(2))
    assert not any(".nextn." in n for n in col.result(32, ["t"]).in_sum2)


def test_text_shorter_than_two_chunks_is_an_error():
    with pytest.raises(ValueError, match="at least 2 chunks"):
        IM.make_chunks(np.arange(100), 64, bos_id=None)
    ch = IM.make_chunks(np.arange(300), 64, bos_id=7, max_chunks=3)
    assert ch.shape == (3, 64) and (ch[:, 0] == 7).all() and ch[1, 1] == 65
