"""``mtp-jax plan``: the speculative loop of the real configs compiles on 8 fake devices, and the per-device bytes
agree with the analytic count (params.param_counts, divided by the sharding) and with XLA's memory analysis."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import pytest

from mtp_jax import params as P
from mtp_jax import plan, sharding
from mtp_jax.config import load_config

REAL = ["glm-4.5", "glm-4.5-air", "deepseek-v3", "step-3.5-flash"]


def _routed_params(cfg) -> int:
    """Routed-expert weights (gate, up, down per expert) of the MoE layers, and of the NextN blocks that are MoE
    (GLM-4.5's and DeepSeek-V3's; Step-3.5's three heads have a dense MLP)."""
    heads = cfg.num_nextn_predict_layers if cfg.family in ("glm4moe", "deepseek2") else 0
    return (cfg.num_moe_layers + heads) * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


@pytest.mark.parametrize("name", REAL)
def test_plan_of_a_real_config_on_8_devices(name):
    out = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "plan", "--config", name, "--devices", "8",
                          "--mesh", "expert=8", "--batch", "2", "--ctx", "1024", "--prompt", "64", "--json"],
                         capture_output=True, text=True, timeout=600, check=True)
    p = json.loads(out.stdout)
    cfg = load_config(name)
    counts = P.param_counts(cfg)
    item = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    assert p["weight_bytes_total"] == (counts["total"] + counts.get("nextn_total", 0)) * item
    # experts split 8 ways, everything else replicated (model = data = 1)
    routed = _routed_params(cfg) * item
    want = p["weight_bytes_total"] - routed + routed / 8
    assert abs(p["weight_bytes"] - want) <= 0.02 * want
    # XLA's per-device arguments (compiled in float32) = weights + caches (+ a few small inputs)
    assert p["compiled_dtype"] == "float32"
    args = (p["weight_bytes"] + p["kv_bytes"] + p["kv_bytes_draft"]) * 4 / item
    assert abs(p["argument_bytes"] - args) <= 0.02 * args
    assert p["temp_bytes"] > 0 and p["collectives"]  # experts on 8 devices need collectives
    assert set(p["fits"]) == {label for label, _ in plan.DEVICES.values()}


def test_plan_in_process_on_4_devices_shards_rows_and_experts():
    cfg = load_config("glm4moe-tiny")
    p1 = plan.make_plan(cfg, {"data": 1, "expert": 1, "model": 1}, batch=4, ctx=64, prompt=8, num_draft=2)
    p4 = plan.make_plan(cfg, {"data": 2, "expert": 2, "model": 1}, batch=4, ctx=64, prompt=8, num_draft=2)
    assert p4.kv_bytes * 2 == p1.kv_bytes  # rows on the data axis
    assert p4.weight_bytes < p1.weight_bytes == p1.weight_bytes_total  # experts on the expert axis
    assert not p1.collectives and p4.collectives
    assert "fits:" in plan.describe(p4)


def test_bad_mesh_is_a_value_error():
    cfg = load_config("glm4moe-tiny")
    with pytest.raises(ValueError, match="uses 4 devices"):
        sharding.parse_mesh("data=2,expert=2", 8, cfg)
    with pytest.raises(ValueError, match="expected data=N"):
        sharding.parse_mesh("pipeline=2", 2, cfg)
    assert sharding.parse_mesh(None, 8, cfg) == {"data": 1, "expert": 8, "model": 1}


def _quantizable_params(cfg) -> int:
    """Weights llama-quantize quantizes: every matrix and table (per layer: 2+ dims), the MoE routers excepted."""
    flat = jax.tree_util.tree_flatten_with_path(P.abstract(cfg), is_leaf=lambda x: isinstance(x, P.ArrayInfo))[0]
    return sum(math.prod(i.shape) for path, i in flat
               if sum(a != "layers" for a in i.axes) >= 2 and path[-1].name != "router")


def test_plan_with_q4_k_weights_and_q8_0_caches_on_8_devices():
    """DeepSeek-V3 as llama-quantize --pure Q4_K gives it (144 bytes per 256 weights; attn_k_b's 128-value rows
    fall back to Q5_0, 0.1 % of the bytes) with q8_0 caches (34 bytes per 32 values), experts split 8 ways."""
    name = "deepseek-v3"
    out = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "plan", "--config", name, "--devices", "8",
                          "--mesh", "expert=8", "--batch", "2", "--ctx", "1024", "--prompt", "64", "--weights", "q4_k",
                          "--cache-type", "q8_0", "--json"], capture_output=True, text=True, timeout=600, check=True)
    p = json.loads(out.stdout)
    cfg = load_config(name)
    counts = P.param_counts(cfg)
    quant = _quantizable_params(cfg)
    rest = counts["total"] + counts["nextn_total"] - quant
    assert p["weights"] == "Q4_K" and set(p["weight_types"]) == {"Q4_K", "Q5_0", "bfloat16"}
    assert p["weight_types"]["bfloat16"] == rest * 2  # norms, routers, expert biases stay in the config's dtype
    q4 = 144 / 256
    assert abs(p["weight_bytes_total"] - (quant * q4 + rest * 2)) <= 0.02 * p["weight_bytes_total"]
    routed = _routed_params(cfg)
    want = (quant - routed) * q4 + routed * q4 / 8 + rest * 2
    assert abs(p["weight_bytes"] - want) <= 0.02 * want
    # one latent entry per token (MLA), rows and heads unsplit here (data = model = 1), plus the [B] int32 lengths
    (heads, dim), _ = cfg.cache_dims()
    entries = 2 * 1024 * heads * dim
    assert p["kv_types"] == dict.fromkeys(("k", "v", "k_draft", "v_draft"), "q8_0")
    assert p["kv_bytes"] == cfg.num_hidden_layers * entries * 34 // 32 + 2 * 4
    assert p["kv_bytes_draft"] == cfg.num_nextn_predict_layers * entries * 34 // 32 + 2 * 4
    assert "weights Q4_K (Q4_K" in plan.describe(plan.Plan(**{k: p[k] for k in plan.Plan.__dataclass_fields__}))


def test_pure_types_fall_back_where_rows_do_not_split_into_blocks():
    """GLM-4.5-Air's ffn_down rows (1408 and 10944 values) are not multiples of 256: Q4_K falls back to Q5_0 as
    llama-quantize's tensor_type_fallback does; the router stays float; tables are quantized (--pure)."""
    from mtp_jax import qweight

    cfg = load_config("glm-4.5-air")
    kept = qweight.pure_types(cfg, P.abstract(cfg), "Q4_K")
    assert kept[("moe_layers", "ffn", "down")] == ("Q5_0", 2, 1) and kept[("dense_layers", "ffn", "down")][0] == "Q5_0"
    assert kept[("moe_layers", "ffn", "gate")] == ("Q4_K", 2, 1) and kept[("embed",)] == ("Q4_K", 0, None)
    assert ("moe_layers", "ffn", "router") not in kept and ("final_norm",) not in kept


def test_plan_refuses_an_unknown_weight_type(capsys):
    from mtp_jax import cli

    assert cli.main(["plan", "--config", "glm4moe-tiny", "--weights", "q4_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtp-jax plan: error: --weights q4_x: expected one of q8_0") and "\n" not in err
