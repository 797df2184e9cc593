"""Step-3.5 (family step35): the trunk against transformers' Step3p7TextModel, the config through transformers'
Step3p7TextConfig and back, and greedy speculative decoding with the chained MTP heads (fixed K and auto) against
plain greedy decoding, past the sliding window.

Only the trunk is compared with transformers: its MTP chaining (post-norm hiddens, main-list clamps, full-attention
head counts on sliding MTP layers) is not what llama.cpp runs, and llama.cpp's is the one implemented (step35.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import generate as plain
from mtp_jax import model as M
from mtp_jax import speculative as SP
from mtp_jax import synthetic
from mtp_jax.config import load_config
from mtp_jax.families.step35 import FULL, SWA, config_from_hf, config_to_hf
from mtp_jax.io import hf
from tests.helpers import numpy_init

torch = pytest.importorskip("torch")
tf_config = pytest.importorskip("transformers.models.step3p7.configuration_step3p7")
tf_model = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")

CFG = load_config("step35-tiny")
L = CFG.num_hidden_layers
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 14)).astype(np.int32)  # 14 > sliding_window 4
LIST_FIELDS = ("layer_types", "mlp_layer_types", "swiglu_limits", "swiglu_limits_shared")


def unclamped(cfg):
    """Every clamp that is on raised to 1e3: still a clamp (the code path runs), but never reached."""
    return cfg.replace(**{f: tuple(1e3 if x else 0.0 for x in getattr(cfg, f))
                          for f in ("swiglu_limits", "swiglu_limits_shared")})


VARIANTS = {"tiny": CFG, "trunk-only": CFG.trunk_only(), "unclamped": unclamped(CFG)}


# ---- the trunk against transformers --------------------------------------------------------------------------


_RUNS: dict = {}


def run_both(variant: str):
    """-> (ours: pre-norm hidden, logits; transformers: residual stream after the last layer, logits), memoized.
    Every variant draws the same seed, so the tiny and unclamped ones hold the same weights."""
    if variant in _RUNS:
        return _RUNS[variant]
    cfg = VARIANTS[variant]
    # norms far from 1 so HF's (1 + w) storage is exercised, and a router bias that changes the selection
    params = numpy_init(cfg, seed=0, std=0.08, norm_noise=0.3, bias_noise=0.1)
    sd = hf.to_hf(params, cfg, fused_experts=True)
    # config_to_hf's dict as it is: no extra kwargs are needed (transformers takes architectures / model_type,
    # splits the padded per-block lists into trunk + mtp_* lists and builds rope_parameters per layer type).
    # The only patch: eager attention, the reference implementation of the sliding-window mask.
    hf_cfg = tf_config.Step3p7TextConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager"
    model = tf_model.Step3p7TextModel(hf_cfg).float().eval()
    # the TextModel is model.* without the "model." prefix; lm_head.weight and the MTP blocks
    # (model.layers.{L..}) are not part of it
    trunk = {k[len("model."):]: torch.from_numpy(np.array(v)) for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert not missing, missing
    mtp_prefixes = tuple(f"layers.{b}." for b in range(L, cfg.num_blocks))
    assert all(k.startswith(mtp_prefixes) for k in unexpected), unexpected
    assert bool(unexpected) == cfg.has_mtp
    # hidden_states[-1] is replaced by the normed output (output_capturing's tie_last_hidden_states): take the
    # residual stream from the last decoder layer's own output instead
    seen = {}
    hook = model.layers[-1].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(TOKENS.astype(np.int64)))
    finally:
        hook.remove()
    ref_logits = out.last_hidden_state.numpy() @ sd["lm_head.weight"].T
    h, logits, _, _ = jax.jit(M.forward, static_argnums=3)(params, jnp.asarray(TOKENS), None, cfg)  # compiles faster
    _RUNS[variant] = (np.asarray(h), np.asarray(logits), seen["h"].numpy(), ref_logits)
    return _RUNS[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trunk_matches_transformers(variant):
    """Full and sliding layers (4 vs 6 query heads, partial vs full RoPE with their own bases, window 4 over 14
    tokens), q/k norms, head-wise gates, dense and MoE FFNs with clamps, (1 + w) norms, biased routing."""
    h, logits, ref_h, ref_logits = run_both(variant)
    assert ref_logits.std() > 0.1  # not degenerate
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert np.abs(h - ref_h).max() <= 1e-4  # the hidden the MTP heads take: the residual stream before the norm
    if variant == "unclamped":  # the clamps of the tiny config change the output: ignoring them fails above
        assert np.abs(ref_logits - run_both("tiny")[3]).max() > 1e-3


# ---- config.json through transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny", "trunk-only"])
def test_config_round_trips_through_transformers(variant, tmp_path):
    cfg = VARIANTS[variant]
    n = cfg.num_nextn_predict_layers
    hf_cfg = tf_config.Step3p7TextConfig(**config_to_hf(cfg))
    # transformers read the padded lists: trunk entries, then the MTP ones in mtp_* lists
    assert hf_cfg.layer_types == list(cfg.layer_types[:L]) and hf_cfg.mlp_layer_types == list(cfg.mlp_layer_types[:L])
    if n:
        assert hf_cfg.mtp_layer_types == list(cfg.layer_types[L:])
        assert hf_cfg.mtp_mlp_layer_types == list(cfg.mlp_layer_types[L:])
    assert [hf_cfg.per_layer_config[b].num_attention_heads for b in range(L)] == [cfg.heads(b) for b in range(L)]
    assert hf_cfg.rope_parameters == {
        FULL: {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 0.5},
        SWA: {"rope_type": "default", "rope_theta": cfg.rope_theta_swa, "partial_rotary_factor": 1.0}}
    assert hf_cfg.swiglu_limits == list(cfg.swiglu_limits[:L])
    assert hf_cfg.swiglu_limits_shared == list(cfg.swiglu_limits_shared[:L])
    assert hf_cfg.query_pre_attn_scalar == cfg.head_dim

    assert config_from_hf(config_to_hf(cfg)) == cfg.replace(name="step35")  # the hub form we write
    # transformers' own form (to_dict, and the config.json save_pretrained writes): per-layer-type
    # rope_parameters, trunk lists + mtp_* lists. It keeps the clamps of the trunk layers only (its MTP layer k
    # reuses entry k of the trunk lists: research notes §6.12), so the MTP blocks' clamps read back as 0 (off).
    want = cfg.replace(name="step35", **{f: getattr(cfg, f)[:L] + (0.0,) * n
                                         for f in ("swiglu_limits", "swiglu_limits_shared")})
    hf_cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(hf_cfg.to_dict()) == want
    assert config_from_hf(saved) == want
    # and transformers reads its own dict back to the same layout
    again = tf_config.Step3p7TextConfig(**saved)
    assert (again.layer_types, again.mtp_layer_types, again.rope_parameters) == (
        hf_cfg.layer_types, hf_cfg.mtp_layer_types, hf_cfg.rope_parameters)


# ---- greedy speculative decoding with the chained heads ---------------------------------------------------------


# A two-layer trunk (a full-attention dense block, a sliding MoE one) under the tiny config's three heads (full
# MoE, sliding MoE, sliding dense): each loop compiles several trunk forwards, and test_families already decodes
# the whole tiny trunk speculatively.
GEN_CFG = CFG.replace(num_hidden_layers=2, **{f: getattr(CFG, f)[:2] + getattr(CFG, f)[L:] for f in LIST_FIELDS})
PROMPTS = [[11, 57, 300], [23, 99, 400, 17, 250, 12, 88, 130, 64]]  # 3 and 9 tokens; 24 new: far past the window
NEW = 24
CHEAP = np.ones((2, SP.AUTO_MAX_DRAFT + 2), np.float32) * np.array([[1.0], [0.05]], np.float32)  # verify 1, head .05


@pytest.fixture(scope="module")
def drafting():
    """synthetic.constructed_params for step35 (its construction holds for chained heads: every head maps the
    token it is given through the same pi', eh_proj passing the embedding half through), its P.init swapped for
    the numpy one (same tree, same scales) to save the compiles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic.P, "init", lambda key, cfg, std=0.02: numpy_init(cfg, seed=1, std=std))
        params, pi, _ = synthetic.constructed_params(GEN_CFG, accept=0.7, seed=1)
    ref = plain.generate(params, GEN_CFG, PROMPTS, max_new_tokens=NEW, eos_ids=[])
    assert [len(r) for r in ref.tokens] == [NEW, NEW]
    for p, r in zip(PROMPTS, ref.tokens):  # the trunk follows its permutation
        assert r == [int(pi[t]) for t in [p[-1]] + r[:-1]]
    return params, ref.tokens, {}


def spec(drafting, num_draft):
    """speculative.generate with a trace, memoized per num_draft. Auto gets fixed costs (a verify costs one
    decode, a head step 0.05) instead of measuring them: the same k choices on every machine, and no timing."""
    params, _, runs = drafting
    if num_draft not in runs:
        extra = {"p_min": 0.0, "costs": CHEAP} if num_draft == "auto" else {}
        runs[num_draft] = SP.generate(params, GEN_CFG, PROMPTS, num_draft=num_draft, max_new_tokens=NEW, eos_ids=[],
                                      trace=True, **extra)
    return runs[num_draft]


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_greedy_mtp_equals_plain_past_the_window(K, drafting):
    res = spec(drafting, K)
    assert res.tokens == drafting[1]
    k = min(K, GEN_CFG.num_nextn_predict_layers)  # one head per draft: K = 4 is capped at the 3 heads
    assert res.stats["num_draft"] == k
    hist = res.stats["accept_hist"]
    assert len(hist) == k + 1 and hist[0] > 0 and hist[k] > 0  # rejections and full acceptance both happened
    if k >= 2:
        assert sum(hist[1:k]) > 0  # and partial acceptance
    assert max(len(line["drafted"]) for line in res.stats["trace"]) == k


def test_greedy_auto_equals_plain(drafting):
    res = spec(drafting, "auto")
    assert res.tokens == drafting[1]
    assert res.stats["plain_steps"] == 0
    assert max(len(line["drafted"]) for line in res.stats["trace"]) == GEN_CFG.num_nextn_predict_layers


def _drafts_by_position(res) -> dict[tuple[int, int], list[int]]:
    """(row, output index the step's first draft predicts) -> that step's drafts (the row's first output token
    comes from the prefill, each step emits after it)."""
    at, pos = {}, {}
    for line in res.stats["trace"]:
        row = line["row"]
        s = pos.get(row, 1)
        if line["drafted"]:
            at[(row, s)] = line["drafted"]
        pos[row] = s + len(line["emitted"])
    return at


def test_auto_drafts_equal_fixed_k_drafts(drafting):
    """The auto loop drafts with a traced step index (ChainedHeads.step's lax.switch over the heads, the chain
    padded to its full length); wherever it drafts from the same position as a fixed-K run (Python step index,
    the chain cut to its length), the common prefix of the drafts agrees."""
    auto = _drafts_by_position(spec(drafting, "auto"))
    fixed = {K: _drafts_by_position(spec(drafting, K)) for K in (1, 2, 3)}
    compared = {1: 0, 2: 0, 3: 0}
    for where, a in auto.items():
        for K, f in fixed.items():
            if where in f:
                m = min(len(a), len(f[where]))
                assert a[:m] == f[where][:m], (where, K, a, f[where])
                compared[m] += 1
    assert compared[3] > 0  # third drafts (head 2, through the switch) were compared


def test_postnorm_mode_hands_the_heads_transformers_hiddens(drafting):
    """mtp_hidden: postnorm (transformers' MtpModel) hands head 0 the trunk's final-normed hidden and each head's
    successor its output after shared_head_norm; the default hands both over before the norm (llama.cpp, checked
    in tests/io/test_step35_peer.py). Greedy MTP stays equal to plain either way."""
    from mtp_jax.families.step35_graph import head_forward
    from mtp_jax.layers import rms_norm

    params, want, _ = drafting
    post = GEN_CFG.replace(mtp_hidden="postnorm")
    toks = jnp.asarray(TOKENS)
    h_pre = M.forward(params, toks, None, GEN_CFG)[0]
    h_post = M.forward(params, toks, None, post)[0]
    np.testing.assert_allclose(h_post, rms_norm(h_pre, params.final_norm, GEN_CFG.rms_norm_eps), atol=1e-6)
    nn = params.nextn[1]
    g_pre = head_forward(params, h_pre, toks, None, GEN_CFG, head=1)[0]
    g_post = head_forward(params, h_pre, toks, None, post, head=1)[0]
    np.testing.assert_allclose(g_post, rms_norm(g_pre, nn.shared_head_norm, GEN_CFG.rms_norm_eps), atol=1e-6)
    assert SP.generate(params, post, PROMPTS, num_draft=3, max_new_tokens=NEW, eos_ids=[]).tokens == want
