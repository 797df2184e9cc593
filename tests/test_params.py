"""Parameter counts: exact against a closed form of the GLM-4.5 architecture, and against the published totals."""

import pytest

from mtp_jax import params as P
from mtp_jax.config import ModelConfig, load_config

# zai-org's model cards and the GLM-4.5 report: (total, active per token), in billions
PUBLISHED = {"glm-4.5": (355, 32), "glm-4.5-air": (106, 12)}


def closed_form(c: ModelConfig) -> dict[str, int]:
    """HF Glm4MoeForCausalLM's parameters, layer by layer: q/k/v/o projections (q/k/v biases with attention_bias,
    per-head q/k norms with use_qk_norm) and two RMSNorms per block; SwiGLU FFNs (gate, up, down); a MoE FFN is a
    router (+ its correction bias) per expert, the routed experts and the shared ones; untied embedding and head;
    the NextN layer adds enorm, hnorm, eh_proj [2D, D], one MoE block and shared_head.norm (its embedding and
    head are the model's). Active: without the embedding rows and the routed experts a token does not use."""
    D, H, KV, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = (D * H * hd + 2 * D * KV * hd + H * hd * D + (H * hd + 2 * KV * hd) * c.attention_bias
            + 2 * hd * c.use_qk_norm + 2 * D)
    expert = 3 * D * c.moe_intermediate_size
    moe = c.n_routed_experts * (D + 1 + expert) + c.n_shared_experts * expert
    unused = (c.n_routed_experts - c.num_experts_per_tok) * expert
    n_dense = c.num_dense_layers
    n_moe = c.num_hidden_layers - n_dense
    total = 2 * c.vocab_size * D + D + n_dense * (attn + 3 * D * c.intermediate_size) + n_moe * (attn + moe)
    nextn = 2 * D + 2 * D * D + attn + moe + D
    return {"total": total, "active_per_token": total - c.vocab_size * D - n_moe * unused,
            "nextn_total": nextn, "nextn_active_per_token": nextn - unused}


@pytest.mark.parametrize("name", ["glm-4.5", "glm-4.5-air", "glm4moe-tiny", "glm4moe-stdlib"])
def test_counts_equal_the_closed_form(name):
    assert P.param_counts(load_config(name)) == closed_form(load_config(name))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_agree_with_the_published_totals(name):
    """Active: 32.86 B and 12.80 B here, published as 32 B and 12 B: whole billions, truncated (to nearest would
    be 33 and 13). Total: the cards do not say whether the NextN layer, the embedding and the output head are
    counted, and no one choice gives both figures (GLM-4.5: 352.80 B trunk, 356.79 B with the NextN layer;
    GLM-4.5-Air: 106.85 B, 109.23 B), so the published total must lie between the trunk without embedding and
    head and the trunk with the NextN layer: 351.25..356.79 B and 105.61..109.23 B (the exact check is the closed
    form's)."""
    cfg = load_config(name)
    n = P.param_counts(cfg)
    total, active = PUBLISHED[name]
    assert active <= n["active_per_token"] / 1e9 < active + 1
    assert (n["total"] - 2 * cfg.vocab_size * cfg.hidden_size) / 1e9 <= total <= (n["total"] + n["nextn_total"]) / 1e9


def step35_closed_form(c) -> dict[str, int]:
    """HF Step3p7TextModel + lm_head, block by block: q/k/v/o with the block's head count, per-head q/k norms, the
    head-wise gate g_proj [heads, D], two norms; a dense SwiGLU or the MoE (router + bias per expert, routed experts,
    one shared expert of shared_intermediate_size); each MTP head adds enorm, hnorm, eh_proj and shared_head.norm."""
    D, KV, hd, E = c.hidden_size, c.num_key_value_heads, c.head_dim, c.n_routed_experts
    attn = lambda N: 2 * D * N * hd + 2 * D * KV * hd + 2 * hd + D * N + 2 * D  # noqa: E731
    expert = 3 * D * c.moe_intermediate_size
    ffn = lambda b: E * (D + 1 + expert) + 3 * D * c.shared_intermediate_size if c.is_moe(b) \
        else 3 * D * c.intermediate_size  # noqa: E731
    unused = lambda b: (E - c.num_experts_per_tok) * expert if c.is_moe(b) else 0  # noqa: E731
    L = c.num_hidden_layers
    total = 2 * c.vocab_size * D + D + sum(attn(c.heads(b)) + ffn(b) for b in range(L))
    heads = range(L, L + c.num_nextn_predict_layers)
    nextn = sum(3 * D + 2 * D * D + attn(c.heads(b)) + ffn(b) for b in heads)
    return {"total": total, "active_per_token": total - c.vocab_size * D - sum(unused(b) for b in range(L)),
            "nextn_total": nextn, "nextn_active_per_token": nextn - sum(unused(b) for b in heads)}


@pytest.mark.parametrize("name", ["step-3.5-flash", "step35-tiny"])
def test_step35_counts_equal_the_closed_form(name):
    assert P.param_counts(load_config(name)) == step35_closed_form(load_config(name))


def test_step35_flash_agrees_with_the_published_totals():
    """The model card: 196 B parameters, 11 B active (whole billions): 196.96 B and 11.46 B here."""
    counts = P.param_counts(load_config("step-3.5-flash"))
    assert int(counts["total"] / 1e9) == 196 and int(counts["active_per_token"] / 1e9) == 11


@pytest.mark.parametrize("name", ["glm-4.5", "glm4moe-stdlib", "deepseek2-tiny"])
def test_routed_counts_equal_the_closed_form(name):
    """Every routed expert's gate, up and down, in the trunk's MoE layers and in each NextN block."""
    c = load_config(name)
    expert = 3 * c.hidden_size * c.moe_intermediate_size * c.n_routed_experts
    assert P.routed_counts(c) == {"trunk": (c.num_hidden_layers - c.num_dense_layers) * expert,
                                  "nextn": c.num_nextn_predict_layers * expert}
