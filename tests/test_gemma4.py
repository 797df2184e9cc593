"""Gemma 4 (family gemma4) and its MTP assistant against transformers 5.24 (CPU, float32, random weights):
``Gemma4ForCausalLM`` with every text feature on (sliding and full layers with their own head dims and KV heads,
K = V on full layers, proportional RoPE, two KV-shared layers with double-wide MLPs, per-layer input embeddings,
routed experts beside every MLP, logit soft-capping), and ``Gemma4AssistantForCausalLM`` drafting from the target's
cache, with and without its centroid head. Plus the speculative loop with the assistant: greedy output equals plain
greedy for K = 1..4, and sampling stays lossless with the centroid head on."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import kvcache, speculative
from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.families import gemma4
from mtp_jax.families import gemma4_assistant as GA
from mtp_jax.families import gemma4_assistant_graph as GAG
from mtp_jax.generate import generate
from mtp_jax.io.hf import from_hf
from mtp_jax.model import forward
from mtp_jax.sampling import Sampling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
          "full_attention"]


def hf_target(seed: int = 0):
    """A tiny Gemma4ForCausalLM: layers 4 and 5 read the K/V of layers 3 (sliding) and 2 (full)."""
    cfg = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=LAYERS, sliding_window=4,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1_000_000.0}},
        num_kv_shared_layers=2, hidden_size_per_layer_input=4, vocab_size_per_layer_input=64, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, use_double_wide_mlp=True,
        final_logit_softcapping=3.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.1,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(cfg).float().eval()
    _off_defaults(model, seed)
    return model


def hf_assistant(target, ordered: bool, seed: int = 0):
    """A tiny Gemma4AssistantForCausalLM for ``target`` (width 16; its head dims and KV heads are the target's).
    Patched after construction: _init_weights zero-fills ``token_ordering`` (every cluster would hold token 0);
    a checkpoint holds a permutation of the vocabulary, so one is drawn."""
    t = target.config
    text = transformers.Gemma4TextConfig(
        vocab_size=t.vocab_size, hidden_size=16, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=t.sliding_window, rope_parameters=t.rope_parameters, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, enable_moe_block=False, use_double_wide_mlp=False, num_kv_shared_layers=0,
        final_logit_softcapping=None, tie_word_embeddings=True, initializer_range=0.1)
    cfg = transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=t.hidden_size,
                                             use_ordered_embeddings=ordered, num_centroids=8,
                                             centroid_intermediate_top_k=2, tie_word_embeddings=True)
    cfg.text_config._attn_implementation = "eager"
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed + 1)
    model = transformers.Gemma4AssistantForCausalLM(cfg).float().eval()
    _off_defaults(model, seed + 1)
    if ordered:
        g = torch.Generator().manual_seed(seed + 2)
        model.masked_embedding.token_ordering.copy_(torch.randperm(t.vocab_size, generator=g))
    return model


@torch.no_grad()
def _off_defaults(model, seed: int):
    """Norm weights, router scales and layer scalars start at 1: move them so that each must be applied."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("router.scale", "per_expert_scale")):
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(1.0 + 0.2 * torch.randn(b.shape, generator=g))


def _ours(model):
    cfg = gemma4.config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, jax.tree.map(jnp.asarray, from_hf(sd, cfg))


IDS = np.random.default_rng(1).integers(3, 64, (2, 12))


def test_the_tiny_hf_model_exercises_every_feature():
    cfg, _ = _ours(hf_target())
    assert cfg.head_dim != cfg.head_dim_swa and cfg.num_key_value_heads != cfg.num_key_value_heads_swa
    assert cfg.attention_k_eq_v and cfg.num_kv_shared_layers == 2 and cfg.use_double_wide_mlp
    assert [cfg.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]
    assert cfg.hidden_size_per_layer_input and cfg.enable_moe_block and cfg.final_logit_softcapping == 3.0
    assert cfg.rope_angles == 2 and cfg.partial_rotary_factor == 0.25


def test_trunk_logits_match_transformers():
    model = hf_target()
    cfg, params = _ours(model)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(IDS), use_cache=False).logits.numpy()
    ours = np.asarray(forward(params, jnp.asarray(IDS), None, cfg)[1])
    assert np.abs(ours - ref).max() < TOL, np.abs(ours - ref).max()
    # each feature matters at this tolerance (a model that skipped it would fail)
    for change in ({"final_logit_softcapping": 0.0}, {"partial_rotary_factor": 1.0}, {"sliding_window": 64}):
        other = np.asarray(forward(params, jnp.asarray(IDS), None, cfg.replace(**change))[1])
        assert np.abs(other - ref).max() > 100 * TOL, change


@pytest.mark.parametrize("ordered", [False, True], ids=["full-vocab", "centroids"])
def test_assistant_drafts_match_transformers(ordered):
    """Three draft steps at the same position from the same target cache: HF's (target shared_kv_states after
    prefill, its generate's inputs) and ours (our trunk cache, the assistant in transformers' window mode)."""
    target = hf_target()
    asst = hf_assistant(target, ordered)
    cfg, params = _ours(target)
    acfg = GA.assistant_config_from_hf(asst.config.to_dict(), cfg)
    assert acfg.use_ordered_embeddings == ordered and acfg.swa_keys == "transformers"
    sd = {k: v.detach().numpy() for k, v in asst.state_dict().items()}
    cfg = cfg.replace(assistant=acfg)
    params = dataclasses.replace(params, nextn=GAG.assistant_from_hf(sd, acfg))
    ids = torch.tensor(IDS)
    n = ids.shape[1]
    with torch.no_grad():
        out = target(input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    tok = out.logits[:, -1:].argmax(-1)  # t_n, not in the cache
    h = out.hidden_states[-1][:, -1:]  # h_{n-1}, after the final norm
    cache = kvcache.init_trunk_cache(cfg, 2, 16)
    _, _, cache, _ = forward(params, jnp.asarray(IDS), cache, cfg, logits="none")
    ours_tok, ours_h = jnp.asarray(tok.numpy()), jnp.asarray(h.numpy())
    for step in range(3):
        with torch.no_grad():
            o = asst(inputs_embeds=torch.cat([target.get_input_embeddings()(tok), h], -1),
                     position_ids=torch.tensor([[n]]), shared_kv_states=out.shared_kv_states)
        nxt, lg, _ = GAG.assistant_forward(params, ours_h, ours_tok, cache, jnp.full((2, 1), n), cfg)
        ref = o.logits.numpy()
        assert np.abs(np.asarray(lg) - ref).max() < TOL, (step, np.abs(np.asarray(lg) - ref).max())
        assert np.abs(np.asarray(nxt) - o.last_hidden_state.numpy()).max() < TOL
        if ordered:  # exactly K * V / C ids keep their logits, the rest sit at the batch minimum - 1
            assert ((ref > ref.min()).sum(-1) == 2 * 8).all()
        tok, h = o.logits.argmax(-1), o.last_hidden_state
        ours_tok, ours_h = jnp.asarray(tok.numpy()), nxt
    # llama.cpp's window (W - 1 cached keys on sliding layers) gives other drafts
    other = GAG.assistant_forward(params, jnp.asarray(h.numpy()), ours_tok, cache, jnp.full((2, 1), n),
                                  cfg.replace(assistant=dataclasses.replace(acfg, swa_keys="llama.cpp")))[1]
    ref = GAG.assistant_forward(params, jnp.asarray(h.numpy()), ours_tok, cache, jnp.full((2, 1), n), cfg)[1]
    assert np.abs(np.asarray(other) - np.asarray(ref)).max() > 100 * TOL


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("gemma4-tiny")
    return cfg, P.init(jax.random.key(0), cfg, std=0.08)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_greedy_mtp_with_the_assistant_equals_plain_greedy(tiny, K):
    """A drafting assistant (it predicts what the trunk will: tests.spec_fixtures-style construction) so that drafts
    are accepted and rejected; rows of different lengths."""
    cfg, params = drafting(tiny)
    prompts = [[5, 9, 2, 7], [7, 3, 3, 8, 1, 4, 11]]
    ref = generate(params, cfg, prompts, max_new_tokens=20, eos_ids=[])
    res = speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=20, eos_ids=[])
    assert res.tokens == ref.tokens
    hist = res.stats["accept_hist"]
    assert hist[0] > 0 and sum(hist[1:]) > 0, hist


def drafting(tiny, accept: float = 0.6, seed: int = 0):
    """The tiny model made to draft (gemma4_assistant_graph.drafting_params: the assistant drafts the trunk's next
    token on a fraction ``accept`` of the tokens; its drafts also depend on the hidden it is handed)."""
    return GAG.drafting_params(tiny[0], accept, seed, mix=0.3)


def test_sampling_with_the_centroid_head_matches_plain_sampling(tiny):
    """Lossless rejection sampling with drafts sampled from the centroid head's distribution (its shortlist holds
    half the vocabulary, the rest sits at the batch minimum - 1): tokens 1..3 over 3000 rows, MTP (K = 2) vs plain
    sampling, chi-square at p = 0.001 (tests/test_speculative.py's check)."""
    from tests.test_speculative import _CHI2_999, _chi2_homogeneity

    cfg, params = tiny
    a = dataclasses.replace(cfg.assistant, vocab_size=8, use_ordered_embeddings=True, num_centroids=4,
                            centroid_top_k=2)
    cfg = cfg.replace(vocab_size=8, eos_token_ids=(), assistant=a)
    cfg, params = drafting((cfg, None))
    assert params.nextn.centroids is not None
    sampling, n = Sampling(temperature=1.0), 3000
    prompts = [[1, 2, 3]] * n
    ref = np.asarray(generate(params, cfg, prompts, max_new_tokens=3, sampling=sampling, seed=1).tokens)
    r = speculative.generate(params, cfg, prompts, num_draft=2, max_new_tokens=3, sampling=sampling, seed=2,
                             draft_sampling=True)
    assert r.stats["accept_hist"][1] + r.stats["accept_hist"][2] > 0.2 * n  # drafts do get accepted
    got = np.asarray(r.tokens)
    for pos in range(3):
        stat, df = _chi2_homogeneity(np.bincount(ref[:, pos], minlength=8), np.bincount(got[:, pos], minlength=8))
        assert stat < _CHI2_999[df], (pos, stat, df)
        assert df >= 1 or pos == 0


def test_hf_directories_load_as_a_target_and_assistant_pair(tmp_path):
    """``load_model(TARGET_DIR, mtp_head=ASSISTANT_DIR)`` with save_pretrained's directories: the same model as built
    from the state dicts, the assistant in transformers' window mode."""
    from mtp_jax.io.load import load_model

    target, asst = hf_target(), hf_assistant(hf_target(), ordered=True)
    target.save_pretrained(tmp_path / "target")
    asst.save_pretrained(tmp_path / "assistant")
    cfg, params, _ = load_model(tmp_path / "target", mtp_head=tmp_path / "assistant")
    want_cfg, want = _ours(target)
    acfg = GA.assistant_config_from_hf(asst.config.to_dict(), want_cfg)
    want = dataclasses.replace(want, nextn=GAG.assistant_from_hf(
        {k: v.detach().numpy() for k, v in asst.state_dict().items()}, acfg))
    assert cfg.replace(name=want_cfg.name, dtype="float32") == want_cfg.replace(assistant=acfg)
    assert cfg.assistant.swa_keys == "transformers" and cfg.assistant.use_ordered_embeddings
    from mtp_jax.qweight import float_arrays  # load_model keeps the matrices as GGUF rows for the CPU kernel

    for a, b in zip(jax.tree.leaves(float_arrays(params)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("kind, tol", [("turbo4", 0.1)])
def test_quantized_kv_caches_hold_the_target_and_feed_the_assistant(tiny, kind, tol):
    """A TurboQuant trunk cache (the block types' path without the rotation is the same read_layer) (queries
    rotated against a turbo K, outputs rotated back from a turbo V, in the trunk's layers and in the assistant's
    reads of them): prefill + decode logits stay near the cache-free forward's, and greedy MTP with the assistant
    equals plain greedy on the same cache type. The forwards are compiled (op by op they took ~60 s)."""
    from mtp_jax.kvquant import KVTypes

    cfg = tiny[0]  # (block types need head dims that are multiples of 32)
    cfg = cfg.replace(head_dim_swa=32, assistant=dataclasses.replace(cfg.assistant, head_dim_swa=32))
    cfg, params = GAG.drafting_params(cfg, 0.6, mix=0.3)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (2, 14))
    fwd = jax.jit(lambda p, x, c: forward(p, x, c, cfg))
    full = np.asarray(fwd(params, jnp.asarray(ids), None)[1])
    cache = kvcache.init_trunk_cache(cfg, 2, 16, kind, kind)
    _, a, cache, _ = fwd(params, jnp.asarray(ids[:, :10]), cache)
    _, b, _, _ = fwd(params, jnp.asarray(ids[:, 10:]), cache)
    err = np.abs(np.concatenate([np.asarray(a), np.asarray(b)], 1) - full).max()
    assert err < tol * np.abs(full).max(), err
    types = KVTypes(k=kind, v=kind)
    prompts = [[5, 9, 2, 7], [7, 3, 3, 8, 1, 4, 11]]
    ref = generate(params, cfg, prompts, max_new_tokens=8, eos_ids=[], cache_types=types)
    res = speculative.generate(params, cfg, prompts, num_draft=2, max_new_tokens=8, eos_ids=[], cache_types=types)
    assert res.tokens == ref.tokens and sum(res.stats["accept_hist"][1:]) > 0
