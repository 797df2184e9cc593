"""The loops on a device mesh: 4 fake CPU devices in-process (data x expert, and model), placement patterns, and
two processes on localhost (jax.distributed over gloo) giving the same tokens as one process."""

from __future__ import annotations

import socket
import subprocess
import sys

import jax
import pytest

from mtp_jax import sharding, speculative
from mtp_jax.generate import generate
from tests.helpers import tiny_config, tiny_params

CFG = tiny_config()
PARAMS = tiny_params(0)
PROMPTS = [[1, 5, 9, 2], [7, 3, 3, 8, 1, 4], [2, 2], [9, 9, 9, 1]]


@pytest.fixture(scope="module")
def reference():
    plain = generate(PARAMS, CFG, PROMPTS, max_new_tokens=10, eos_ids=[])
    mtp = speculative.generate(PARAMS, CFG, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[])
    assert mtp.tokens == plain.tokens
    return plain.tokens


@pytest.mark.parametrize("mesh", [dict(data=2, expert=2), dict(model=4)], ids=["data2xexpert2", "model4"])
def test_sharded_greedy_equals_one_device(mesh, reference):
    assert len(jax.devices()) >= 4
    params = sharding.shard_params(PARAMS, CFG, sharding.make_mesh(**mesh))
    assert sharding.sharded_fraction(params) > 0.2
    plain = generate(params, CFG, PROMPTS, max_new_tokens=10, eos_ids=[], return_cache=True)
    mtp = speculative.generate(params, CFG, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[], return_cache=True)
    assert plain.tokens == reference and mtp.tokens == reference
    if mesh.get("data", 1) > 1:  # rows (and their caches) live on the data axis
        spec = mtp.stats["cache"].k[1].sharding.spec
        assert spec[1] == "data"


def test_placement_patterns_replicate_the_head():
    mesh = sharding.make_mesh(data=1, expert=4)
    params = sharding.shard_params(PARAMS, CFG, mesh, placement=[(r"mtp\..*", "replicated")])
    assert params.moe_layers.ffn.gate.sharding.spec[1] == "expert"  # trunk experts split
    for x in jax.tree.leaves(params.nextn):
        assert x.sharding.is_fully_replicated
    assert sharding.tensor_name((jax.tree_util.GetAttrKey("nextn"), jax.tree_util.SequenceKey(0),
                                 jax.tree_util.GetAttrKey("eh_proj"))) == "mtp.0.eh_proj"
    with pytest.raises(ValueError, match="replicated"):
        sharding.param_shardings(CFG, mesh, placement=[("x", "sharded")])


def test_gemma4_and_its_assistant_sharded_decode_as_on_one_device():
    """Gemma 4 with its assistant on data x expert: the assistant's tensors are named mtp.* (its layers, pre/post
    projections, table) and replicated by pattern while the trunk's experts split; greedy MTP tokens as on one
    device (drafts accepted: the pair is built to draft)."""
    from mtp_jax.config import load_config
    from mtp_jax.families.gemma4_assistant_graph import drafting_params

    cfg, params = drafting_params(load_config("gemma4-tiny"), accept=0.6)
    ref = speculative.generate(params, cfg, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[])
    mesh = sharding.make_mesh(data=2, expert=2)
    placed = sharding.shard_params(params, cfg, mesh, placement=[(r"mtp\..*", "replicated")])
    assert placed.swa_layers.moe.experts.gate.sharding.spec[1] == "expert"
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(placed.nextn))
    names = {sharding.tensor_name(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {"mtp.pre_proj", "mtp.embed", "mtp.swa_layers.attn.wq", "swa_layers.moe.experts.gate"} <= names
    res = speculative.generate(placed, cfg, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[])
    assert res.tokens == ref.tokens and sum(res.stats["accept_hist"][1:]) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_process_does(tmp_path):
    args = ["--config", "glm4moe-tiny", "--prompt-ids", "1,5,9,2;7,3,3,8", "-K", "2", "--max-new-tokens", "8",
            "--repeats", "1"]
    cmd = [sys.executable, "-m", "mtp_jax.cli", "generate", *args]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    port = _free_port()
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall one process mid-collective
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen([*cmd, "--devices", "2", "--mesh", "data=2", "--coordinator",
                                           f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                                          stdout=o, stderr=e))
    for p in procs:
        p.wait(timeout=300)
    assert all(p.returncode == 0 for p in procs), [err.read_text()[-2000:] for _, err in logs]
    rows = lambda text: [line for line in text.splitlines() if line.startswith(("[0]", "[1]"))]  # noqa: E731
    assert len(rows(one)) == 2
    for out, _ in logs:
        assert rows(out.read_text()) == rows(one)


def test_orbax_restores_straight_into_shards(tmp_path, reference):
    from mtp_jax.io.orbax import load_orbax, save_orbax

    save_orbax(tmp_path / "ckpt", CFG, PARAMS)
    mesh = sharding.make_mesh(data=2, expert=2)
    cfg, params, _ = load_orbax(tmp_path / "ckpt", mesh=mesh, placement=[(r"mtp\..*", "replicated")])
    want = sharding.param_shardings(cfg, mesh)
    assert params.moe_layers.ffn.gate.sharding == want.moe_layers.ffn.gate
    assert not params.moe_layers.ffn.gate.sharding.is_fully_replicated
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params.nextn))
    for a, b in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(params)):
        assert (jax.numpy.asarray(a) == b).all()
    res = speculative.generate(params, cfg, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[])
    assert res.tokens == reference
    _, trunk_only, _ = load_orbax(tmp_path / "ckpt", mesh=mesh, load_mtp=False)
    assert trunk_only.nextn is None


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gguf_reads_straight_into_shards(tmp_path, reference, outtype):
    """read_gguf(mesh=) builds every leaf from its device shards: the shardings param_shardings gives (the head
    replicated by pattern), the values of the one-device read (a quantized file dequantized), the same tokens."""
    import numpy as np

    from mtp_jax.io.gguf import read_gguf, write_gguf
    from mtp_jax.io.load import load_model
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, CFG, PARAMS, outtype="f32")
    if outtype == "q8_0":
        quantize_gguf(path, tmp_path / "q.gguf", "Q8_0")
        path = tmp_path / "q.gguf"
    mesh = sharding.make_mesh(data=2, expert=2)
    placement = [(r"mtp\..*", "replicated")]
    cfg, one = read_gguf(path)
    cfg, params = read_gguf(path, mesh=mesh, placement=placement)
    want = sharding.param_shardings(cfg, mesh, placement=placement)
    assert params.moe_layers.ffn.gate.sharding == want.moe_layers.ffn.gate
    assert not params.moe_layers.ffn.gate.sharding.is_fully_replicated
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params.nextn))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params)):
        assert b.dtype == a.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    if outtype == "f32":
        res = speculative.generate(params, cfg, PROMPTS, num_draft=2, max_new_tokens=10, eos_ids=[])
        assert res.tokens == reference
    # load_model takes a function of the config for the mesh, as the CLI passes it
    _, placed, _ = load_model(path, mesh=lambda c: sharding.make_mesh(model=4), load_mtp=False,
                              quantized="dequantize")
    assert placed.nextn is None and placed.moe_layers.ffn.gate.sharding.spec[-1] == "model"


def test_sharded_gguf_load_keeps_each_process_below_half_the_file(tmp_path):
    """Four localhost processes (one CPU device each, jax.distributed) read a ~1 GB F16 GGUF straight into their
    shards on an expert=2 x model=2 mesh: each process' peak RSS (VmHWM) stays below 0.5 x the file plus a fixed
    256 MiB (the Python + JAX runtime: ~180 MB measured before the read), and above what it held before by no
    more than its shards plus 128 MiB (the read holds one tensor at a time). Loading the whole file would need
    > 1 GB."""
    import json

    import numpy as np

    from mtp_jax.config import load_config
    from mtp_jax.io.gguf import write_gguf
    from mtp_jax.params import ArrayInfo, abstract

    cfg = load_config("bench-l").replace(num_hidden_layers=17, name="rss")  # 17 layers: ~1.07 GB at F16
    v = (0.02 * np.random.default_rng(0).standard_normal(1 << 20)).astype(np.float16)
    params = jax.tree.map(lambda i: np.ones(i.shape, np.float16) if i.init == "ones" else np.resize(v, i.shape),
                          abstract(cfg), is_leaf=lambda x: isinstance(x, ArrayInfo))
    path = tmp_path / "big.gguf"
    write_gguf(path, cfg, params, outtype="f16")
    del params
    size = path.stat().st_size
    assert size > 1e9
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.shard_load_worker", str(path), "expert=2,model=2",
                               f"localhost:{port}", "4", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    for out, _ in outs:
        r = json.loads(out.strip().splitlines()[-1])
        assert r["held"] < 0.35 * size  # each process holds its quarter of the experts and half of the rest
        assert r["peak_rss"] < 0.5 * size + 256 * 2**20, r
        assert r["peak_rss"] - r["peak_rss_before"] < r["held"] + 128 * 2**20, r


@pytest.mark.parametrize("qtype,mesh", [("Q8_0", dict(data=2, expert=2)), ("Q4_K", dict(model=4))],
                         ids=["q8_0-data2xexpert2", "q4_k-model4"])
def test_quantized_weights_sharded_decode_as_on_one_device(qtype, mesh):
    """Weights kept in GGUF blocks (llama-quantize --pure's types, quantized in memory) placed on the mesh: experts
    on ``expert``, output rows on ``model``, the blocks of the inputs never split; greedy plain and MTP tokens equal
    the same quantized model's on one device. Q4_K blocks need 256-value input rows: a wider tiny config."""
    from mtp_jax import qweight
    from tests.helpers import numpy_init

    cfg, params = CFG, PARAMS
    if qtype == "Q4_K":
        cfg = tiny_config(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                          num_hidden_layers=2, n_routed_experts=4)
        params = numpy_init(cfg, std=0.08, bias_noise=0.05)
    params = qweight.quantize_params(cfg, params, qtype)
    assert qweight.is_quant(params.moe_layers.ffn.gate) and params.moe_layers.ffn.gate.types == (qtype,)
    want = generate(params, cfg, PROMPTS, max_new_tokens=8, eos_ids=[]).tokens
    placed = sharding.shard_params(params, cfg, sharding.make_mesh(**mesh))
    gate, down = placed.moe_layers.ffn.gate.groups[0], placed.moe_layers.ffn.down.groups[0]  # [L, E, N, row_bytes]
    L, E, N, rb = gate.shape
    shard = lambda x: x.addressable_shards[0].data.shape  # noqa: E731
    if "expert" in mesh:  # the expert stacks really split: each device holds half of the experts
        assert shard(gate) == (L, E // 2, N, rb) and shard(down) == (L, E // 2, *down.shape[2:])
    else:  # gate's rows (moe_mlp) split 4 ways; down's inputs are moe_mlp, never split: its rows (embed) whole
        assert shard(gate) == (L, E, N // 4, rb) and down.sharding.is_fully_replicated
        head = placed.lm_head.groups[0]  # [V, row_bytes]: vocab rows
        assert shard(head) == (head.shape[0] // 4, head.shape[1])
    assert sharding.sharded_fraction(placed) > 0.2
    assert generate(placed, cfg, PROMPTS, max_new_tokens=8, eos_ids=[]).tokens == want
    assert speculative.generate(placed, cfg, PROMPTS, num_draft=2, max_new_tokens=8, eos_ids=[]).tokens == want


def test_quantized_gguf_reads_straight_into_shards_in_its_blocks(tmp_path):
    """read_gguf(quantized="keep", mesh=) keeps a Q4_K_M file's blocks (stacks mixing Q4_K and Q6_K layers
    included), each device reading its experts / output rows: the same groups and shardings as shard_params of
    the one-device read, and the same greedy tokens."""
    import numpy as np

    from mtp_jax import qweight
    from mtp_jax.io.gguf import read_gguf, write_gguf
    from mtp_jax.quant.gguf_quantize import quantize_gguf
    from tests.helpers import numpy_init

    cfg = tiny_config(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                      num_hidden_layers=3, n_routed_experts=4)
    write_gguf(tmp_path / "m.gguf", cfg, numpy_init(cfg, std=0.08, bias_noise=0.05), outtype="f32")
    quantize_gguf(tmp_path / "m.gguf", tmp_path / "q.gguf", "Q4_K_M")
    mesh = sharding.make_mesh(data=2, expert=2)
    cfg, one = read_gguf(tmp_path / "q.gguf", quantized="keep")
    _, params = read_gguf(tmp_path / "q.gguf", quantized="keep", mesh=mesh)
    down = params.moe_layers.ffn.down
    assert qweight.is_quant(down) and len(down.types) == 2 and down.layer_map is not None  # Q4_K and Q6_K layers
    want = sharding.shard_params(one, cfg, mesh)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params)):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
    assert not down.groups[0].sharding.is_fully_replicated
    ref = generate(one, cfg, PROMPTS, max_new_tokens=8, eos_ids=[]).tokens
    assert speculative.generate(params, cfg, PROMPTS, num_draft=2, max_new_tokens=8, eos_ids=[]).tokens == ref
