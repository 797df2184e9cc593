"""Must-show 1: trunk logits equal HF transformers' Glm4MoeForCausalLM with the same random weights."""

import jax
import numpy as np
import pytest
import torch

from mtp_jax import model as M
from mtp_jax.io import hf
from tests.helpers import tiny_config, tiny_params

transformers = pytest.importorskip("transformers")


def hf_model(cfg, params):
    hf_cfg = transformers.Glm4MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                          if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    model = transformers.Glm4MoeForCausalLM(hf_cfg).float().eval()
    sd = hf.to_hf(params, cfg, fused_experts=True, with_mtp=False)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    # the buffers HF does not persist (rotary inv_freq) may be missing; nothing else
    assert not unexpected, unexpected
    if cfg.tie_word_embeddings:  # tied: lm_head.weight is the embedding itself
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        missing = [m for m in missing if m != "lm_head.weight"]
    assert all("rotary" in m for m in missing), missing
    return model


@pytest.mark.parametrize("overrides", [
    {},  # dense lead layer, MoE with shared expert, group-limited routing, partial rotary, bias
    {"use_qk_norm": True, "attention_bias": False, "tie_word_embeddings": True, "norm_topk_prob": False},
])
def test_trunk_logits_match_transformers(overrides):
    cfg = tiny_config(**overrides)
    params = tiny_params(0, **overrides)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    with torch.no_grad():
        ref = hf_model(cfg, params)(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    _, ours, _, _ = M.forward(params, tokens, None, cfg)
    diff = np.abs(np.asarray(ours) - ref).max()
    assert ref.std() > 0.1  # logits are not degenerate
    assert diff <= 1e-4, f"max |diff| = {diff}"


def test_hf_names_round_trip_both_expert_layouts():
    cfg = tiny_config()
    params = tiny_params(0)
    for fused in (True, False):
        sd = hf.to_hf(params, cfg, fused_experts=fused)
        assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in sd
        back = hf.from_hf(sd, cfg)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), b)
