"""``mtp-jax plan``: the speculative loop of the real configs compiles on 8 fake devices, and the per-device bytes
agree with the analytic count (params.param_counts, divided by the sharding) and with XLA's memory analysis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtp_jax import params as P
from mtp_jax import plan, sharding
from mtp_jax.config import CONFIGS, load_config

REAL = [name for name in ("glm-4.5", "glm-4.5-air", "deepseek-v3") if (CONFIGS / f"{name}.yaml").exists()]


def _routed_params(cfg) -> int:
    """Routed-expert weights of the MoE layers and the NextN blocks (gate, up, down per expert)."""
    layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers
    return layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


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
