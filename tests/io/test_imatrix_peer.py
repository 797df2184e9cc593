"""MTP-aware imatrix vs llama.cpp (issue: MTP-aware importance matrix, must-show 1 and 2).

A glm4moe model whose every row size is a multiple of 256 (so IQ2_XXS applies everywhere) and whose NextN block
carries its own embed_tokens / shared_head_head copies, as GLM-4.5 GGUFs do. llama-imatrix and ours run over the
same text with the same tokenization and chunking: trunk entries agree; ours also covers the NextN block.
llama-quantize to IQ2_XXS then fails with llama-imatrix's file and succeeds with ours, and the quantized model
still drafts with --spec-type draft-mtp.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import jax
import numpy as np
import pytest

from mtp_jax import imatrix as IM
from mtp_jax import params as P
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.imatrix_gguf import read_imatrix, write_imatrix_gguf
from mtp_jax.llama_cpp import speculative_counts
from tests.helpers import tiny_config

CHUNK = 128


@pytest.fixture(scope="module")
def model256(io_dir, tok):
    cfg = tiny_config(hidden_size=256, head_dim=64, intermediate_size=512, moe_intermediate_size=256)
    p = P.init(jax.random.key(5), cfg, std=0.05)
    # decisive routing: with near-tied expert scores, float rounding (ours vs ggml) could flip a token's expert
    moe = p.moe_layers
    moe = dataclasses.replace(moe, ffn=dataclasses.replace(moe.ffn, router=moe.ffn.router * 20))
    nn = dataclasses.replace(p.nextn[0], embed_tokens=p.embed, shared_head_head=p.lm_head)
    params = dataclasses.replace(p, moe_layers=moe, nextn=(nn,))
    return write_gguf(io_dir / "tiny256-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="module")
def text(io_dir):
    """Python source from the standard library (on every machine), enough for 4 chunks."""
    import json.decoder
    import json.encoder
    path = io_dir / "imatrix-text.txt"
    path.write_text(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    return path


@pytest.fixture(scope="module")
def theirs(peer, model256, text, io_dir):
    out = io_dir / "imatrix-llama.gguf"
    p = peer.run("llama-imatrix", "-m", model256[0], "-f", text, "-o", out, "-c", CHUNK, "-b", CHUNK,
                 "--chunks", 4, "-t", 1, "--no-ppl", timeout=300)
    assert p.returncode == 0 and out.exists(), p.stderr[-3000:]
    return read_imatrix(out)


@pytest.fixture(scope="module")
def ours(model256, text, tok, io_dir):
    _, cfg, params = model256
    bos = tok.bos_id if tok.add_bos else None
    chunks = IM.make_chunks(tok.encode(text.read_text(), add_special=True), CHUNK, bos, max_chunks=4)
    col = IM.Collector(params, cfg, mtp=True, batch=2)
    col.add(chunks)
    data = col.result(CHUNK, [text.name])
    return write_imatrix_gguf(data, io_dir / "imatrix-ours.gguf"), data


@pytest.mark.peer
def test_trunk_entries_agree_with_llama_imatrix(theirs, ours, model256):
    _, data = ours
    cfg = model256[1]
    n = cfg.num_hidden_layers
    assert theirs.chunk_count == data.chunk_count == 4
    assert set(theirs.in_sum2), "llama-imatrix wrote no entries"
    assert not any(name.startswith(f"blk.{n}.") for name in theirs.in_sum2)  # llama.cpp: no MTP statistics
    for name in theirs.in_sum2:
        assert name in data.in_sum2, name
        np.testing.assert_array_equal(data.counts[name], theirs.counts[name], err_msg=name)
        a, b = data.in_sum2[name], theirs.in_sum2[name]
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel <= 1e-3, (name, rel)
    mtp = {k for k in data.in_sum2 if k.startswith(f"blk.{n}.")}
    assert f"blk.{n}.nextn.eh_proj.weight" in mtp and f"blk.{n}.ffn_down_exps.weight" in mtp
    assert f"blk.{n}.nextn.shared_head_head.weight" in mtp
    assert data.counts[f"blk.{n}.nextn.embed_tokens.weight"].tolist() == [0.0]  # the neutral lookup entry
    assert set(data.in_sum2) - set(theirs.in_sum2) == mtp


@pytest.mark.peer
def test_llama_quantize_iq2_xxs_needs_our_imatrix_and_the_result_drafts(peer, theirs, ours, model256, io_dir):
    model, cfg, _ = model256
    n = cfg.num_hidden_layers
    bad = peer.run("llama-quantize", "--imatrix", io_dir / "imatrix-llama.gguf", model, io_dir / "q-theirs.gguf",
                   "IQ2_XXS", 1, timeout=300)
    assert bad.returncode != 0
    assert f"Missing importance matrix for tensor blk.{n}." in bad.stderr + bad.stdout.decode(errors="replace")
    good = peer.run("llama-quantize", "--imatrix", ours[0], model, io_dir / "q-ours.gguf", "IQ2_XXS", 1, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    # --no-repack: this CPU has AMX, and llama.cpp's AMX repacking of quantized weights segfaults here
    # (ggml_backend_amx_mul_mat), with or without MTP
    spec = peer.run_until("llama-speculative-simple", "-m", io_dir / "q-ours.gguf", "--spec-type", "draft-mtp",
                          "-p", "def main():", "-n", 24, "--temp", 0, "-t", 1, "-c", 256, "--no-repack",
                          ok=lambda p: "n_drafted" in p.stderr)
    assert speculative_counts(spec.stderr)[0] > 0


def test_cli_imatrix_end_to_end(model256, text, io_dir, capsys):
    from mtp_jax import cli
    out = io_dir / "imatrix-cli.gguf"
    assert cli.main(["imatrix", "-m", str(model256[0]), "-f", str(text), "-o", str(out), "--chunk-size", str(CHUNK),
                     "--chunks", "3", "--batch", "2", "--save-frequency", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 chunks" in printed and "NextN head perplexity" in printed
    data = read_imatrix(out)
    assert data.chunk_count == 3 and data.metadata.get(IM.KEY_MTP) is True
    assert json.dumps(data.metadata.get(IM.KEY_NEUTRAL)) == json.dumps(
        [f"blk.{model256[1].num_hidden_layers}.nextn.embed_tokens.weight"])


@pytest.mark.peer
def test_our_quantized_gguf_loads_generates_and_drafts_in_llama_cpp(peer, ours, model256, io_dir):
    """Quantizer must-show 3: our Q4_K_M file (MTP block included, our MTP-aware imatrix) is byte-identical to
    llama-quantize's, loads in llama.cpp and drafts with the NextN head; our loader reads it back too."""
    from mtp_jax.io.load import load_model
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    model, cfg, _ = model256
    q = io_dir / "q4km-ours-quantizer.gguf"
    summary = quantize_gguf(model, q, "Q4_K_M", imatrix=ours[0], threads=1, progress=False)
    assert summary.describe()
    ref = io_dir / "q4km-llama-quantize.gguf"
    p = peer.run("llama-quantize", "--imatrix", ours[0], model, ref, "Q4_K_M", 1, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert q.read_bytes() == ref.read_bytes()
    spec = peer.run_until("llama-speculative-simple", "-m", q, "--spec-type", "draft-mtp", "-p", "def main():",
                          "-n", 24, "--temp", 0, "-t", 1, "-c", 256, "--no-repack",
                          ok=lambda p: "n_drafted" in p.stderr)
    assert speculative_counts(spec.stderr)[0] > 0
    cfg2, params2, _ = load_model(q)
    assert cfg2.num_hidden_layers == cfg.num_hidden_layers and params2.nextn is not None
