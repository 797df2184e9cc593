"""Step-3.5 model files (issue 15): trunk-only and MTP-only GGUFs (llama.cpp's converter --no-mtp / --mtp),
``--mtp-head`` attaching a head file to a trunk file, and the MTP tensors left unread by plain decoding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtp_jax import cli, speculative
from mtp_jax.config import load_config
from mtp_jax.io import gguf as G
from mtp_jax.io.load import load_model
from mtp_jax.io.table import stacks
from tests.helpers import numpy_init

CFG = load_config("step35-tiny")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("step35")
    params = numpy_init(CFG, seed=1, std=0.08)
    paths = {part: d / f"{part}.gguf" for part in ("all", "trunk", "mtp")}
    for part, path in paths.items():
        G.write_gguf(path, CFG, params, part=part)
    return paths


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_mtp_only_file_holds_the_heads_and_the_shared_tensors_only(files):
    cfg, params = G.read_gguf(files["mtp"])
    assert cfg == CFG
    assert all(getattr(params, attr) is None for attr, _, _ in stacks(cfg))
    assert len(params.nextn) == 3 and params.embed is not None and params.lm_head is not None
    names = {t.name for t in G.open_gguf(files["mtp"]).tensors}
    assert not any(n.startswith(f"blk.{b}.") for n in names for b in range(CFG.num_hidden_layers))
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.5.nextn.eh_proj.weight",
            "blk.7.nextn.hnorm.weight"} <= names


def test_mtp_head_file_beside_a_trunk_file_equals_the_combined_file(files):
    cfg_all, p_all, _ = load_model(files["all"])
    cfg, params, _ = load_model(files["trunk"], mtp_head=files["mtp"])
    assert cfg == cfg_all and _same(params, p_all)
    for K in (1, 3):
        a = speculative.generate(p_all, cfg_all, PROMPTS, num_draft=K, max_new_tokens=10)
        b = speculative.generate(params, cfg, PROMPTS, num_draft=K, max_new_tokens=10)
        assert a.tokens == b.tokens


def test_mtp_head_for_another_trunk_is_one_clear_line(files, tmp_path, capsys):
    other = CFG.replace(sliding_window=3)
    G.write_gguf(tmp_path / "mtp.gguf", other, numpy_init(other), part="mtp")
    assert cli.main(["generate", "-m", str(files["trunk"]), "-md", str(tmp_path / "mtp.gguf"), "-K", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different trunk" in err and "Traceback" not in err


@pytest.mark.parametrize("K, reads_heads", [(0, False), (2, True)])
def test_plain_decoding_leaves_the_mtp_tensors_unread(files, monkeypatch, capsys, K, reads_heads):
    """The loader copies every tensor it loads through _source (floats) or _raw (kept quantized): record them."""
    read: list[str] = []
    for fn in ("_source", "_raw"):
        orig = getattr(G, fn)
        monkeypatch.setattr(G, fn, lambda mm, t, orig=orig: read.append(t.name) or orig(mm, t))
    args = ["generate", "-m", str(files["all"]), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--repeats", "1",
            "-K", str(K)]
    assert cli.main(args) == 0
    heads = [n for n in read if any(n.startswith(f"blk.{CFG.num_hidden_layers + k}.") for k in range(3))]
    assert "blk.0.attn_q.weight" in read and "output.weight" in read
    assert bool(heads) == reads_heads
    assert ("MTP speculative" in capsys.readouterr().out) == reads_heads


# every row a multiple of 256, so IQ2_XXS applies to every matrix: hidden 256, heads x head_dim 256 (full) / 512
WIDE = dict(hidden_size=256, head_dim=128, num_attention_heads=2, num_sliding_attention_heads=4,
            num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=256, shared_intermediate_size=256)


@pytest.mark.peer
def test_imatrix_covers_the_heads_llama_quantize_takes_it_and_our_q4_k_m_is_its_bytes(peer, tmp_path):
    """The heads are driven as they draft (head k on head k-1's outputs, drafter.ChainedHeads.teacher_forced): every
    matmul of blk.5..7 gets an entry, and llama-quantize IQ2_XXS (which refuses any matrix without one) succeeds with
    our imatrix and fails with it minus the heads' entries; our Q4_K_M with it is llama-quantize's file, byte for
    byte."""
    from mtp_jax import imatrix as IM
    from mtp_jax.io.imatrix_gguf import ImatrixData
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    cfg = CFG.replace(**WIDE)
    params = numpy_init(cfg, seed=2, std=0.05)
    model = G.write_gguf(tmp_path / "wide.gguf", cfg, params)
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, 4 * 32)
    col = IM.Collector(params, cfg, mtp=True, batch=2)
    col.add(IM.make_chunks(tokens, 32, None, max_chunks=4))
    data = col.result(32, ["random ids"])
    L = cfg.num_hidden_layers
    matmuls = {t.name for t in G.open_gguf(model).tensors
               if t.name.startswith("blk.") and not t.name.endswith(("norm.weight", ".bias"))}
    for k in range(3):
        head = {n for n in matmuls if n.startswith(f"blk.{L + k}.")}
        assert head and head <= set(data.in_sum2), (k, sorted(head - set(data.in_sum2)))
        assert all(data.counts[n].min() > 0 for n in head if "exps" not in n), k
    trunk_only = ImatrixData({n: v for n, v in data.in_sum2.items() if int(n.split(".")[1]) < L},
                             {n: v for n, v in data.counts.items() if int(n.split(".")[1]) < L},
                             data.datasets, data.chunk_count, data.chunk_size)
    imatrix, out = peer.quantize_needs_imatrix(model, data, trunk_only, tmp_path)
    assert f"Missing importance matrix for tensor blk.{L}." in out
    # our quantizer writes llama-quantize's bytes for this arch too (its type policy covers attn_gate, the heads)
    ours, ref = tmp_path / "q4km-ours.gguf", tmp_path / "q4km-llama.gguf"
    quantize_gguf(model, ours, "Q4_K_M", imatrix=imatrix, threads=1, progress=False)
    p = peer.run("llama-quantize", "--imatrix", imatrix, model, ref, "Q4_K_M", 1, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ours.read_bytes() == ref.read_bytes()
