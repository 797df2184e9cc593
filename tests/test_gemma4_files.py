"""Gemma 4's assistant as a file of its own: the gemma4 + gemma4-assistant GGUF pair round-trips through
``--mtp-head``, a wrong or damaged assistant file is one clear line, and the assistant's imatrix (collected as it
drafts, from the target's cache) lets llama-quantize make an IQ2_XXS assistant, which it refuses without one."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mtp_jax import cli
from mtp_jax import imatrix as IM
from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.io import gguf as G
from mtp_jax.io.imatrix_gguf import write_imatrix_gguf
from mtp_jax.io.load import load_model
from mtp_jax.io.validate import GGUFError
from mtp_jax.qweight import float_arrays

CFG = load_config("gemma4-tiny")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma4-pair")
    params = P.init(jax.random.key(3), CFG, std=0.05)
    return (G.write_gguf(d / "target.gguf", CFG, params), G.write_gguf(d / "assistant.gguf", CFG, params, part="mtp"),
            params)


def test_the_pair_loads_back_and_the_target_file_holds_no_assistant(pair):
    target, assistant, params = pair
    names = {t.name for t in G.open_gguf(target).tensors}
    assert "rope_freqs.weight" in names and not any("nextn" in n for n in names)
    cfg, alone, _ = load_model(target)
    assert cfg == CFG.trunk_only() and alone.nextn is None
    cfg, both, _ = load_model(target, mtp_head=assistant)
    assert cfg == CFG
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(float_arrays(both))):  # float matrices: GGUF rows
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_assistant_for_another_target_is_one_clear_line(pair, tmp_path, capsys):
    target, _, _ = pair
    other = CFG.replace(head_dim_swa=8, assistant=dataclasses.replace(CFG.assistant, head_dim_swa=8))
    path = G.write_gguf(tmp_path / "other.gguf", other, P.init(jax.random.key(1), other), part="mtp")
    with pytest.raises(GGUFError, match="does not fit the target model: the assistant's sliding layers expect"):
        load_model(target, mtp_head=path)
    assert cli.main(["generate", "-m", str(target), "-md", str(path), "-K", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "sliding layers" in err[0]


def test_the_pair_is_checked_without_jax(pair):
    """A Gemma-4 config with an assistant (the YAML's, and the pair's metadata) is built, its tree shaped and both
    files' tensors checked against their tables in a process that never imports jax (the assistant's description,
    families/gemma4_assistant.py; its graph and weight readers are gemma4_assistant_graph.py)."""
    import subprocess
    import sys

    target, assistant, _ = pair
    code = f"""
import sys
from mtp_jax import families
from mtp_jax.config import load_config
from mtp_jax.families import gemma4_assistant as GA
from mtp_jax.io.gguf_model import Metadata, check_tensors, config_from_gguf
from mtp_jax.io.validate import open_reader
cfg = load_config("gemma4-tiny")
assert families.of(cfg).abstract(cfg).nextn is not None
r = open_reader({str(target)!r})
trunk = config_from_gguf(r)
check_tensors(r, trunk)
meta = Metadata(open_reader({str(assistant)!r}), {str(assistant)!r}, GA.ARCH)
both = GA.config_from_gguf(meta, trunk)
GA.check_tensors(meta, both.assistant)
print(both == cfg, "jax" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "False"], proc.stdout + proc.stderr


def _rewrite(src, dst, arch: str, field=None, tensor=None):
    """A copy of a GGUF with one key's value (``field`` = (name, value)) or one tensor (``tensor`` = (name, f(data)))
    replaced."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith(("GGUF.", "general.architecture")):
            continue
        v = field[1] if field and f.name == field[0] else f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, v)
        else:
            w.add_key_value(f.name, v, f.types[0])
    for t in r.tensors:
        data = np.asarray(t.data)
        w.add_tensor(t.name, tensor[1](data) if tensor and t.name == tensor[0] else data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_damaged_assistant_names_the_tensor(pair, tmp_path):
    target, assistant, _ = pair
    bad = _rewrite(assistant, tmp_path / "bad.gguf", "gemma4-assistant",
                   tensor=("blk.1.attn_q.weight", lambda x: x[:-1]))  # one output row short
    with pytest.raises(GGUFError, match=r"bad.gguf: tensor blk.1.attn_q.weight has shape"):
        load_model(target, mtp_head=bad)


def test_a_tokenizer_we_do_not_implement_leaves_token_ids(pair, tmp_path, capsys, caplog):
    """Gemma 4's own files say tokenizer.ggml.model = "gemma4" (a SentencePiece kind not implemented here): the
    model loads without a tokenizer (a warning names why) and decodes --prompt-ids; --prompt is one clear line."""
    from mtp_jax.io.tokenizer import tiny_bpe

    _, assistant, params = pair
    target = G.write_gguf(tmp_path / "t.gguf", CFG, params, tokenizer=tiny_bpe(CFG.vocab_size))
    odd = _rewrite(target, tmp_path / "gemma4-tok.gguf", "gemma4", field=("tokenizer.ggml.model", "gemma4"))
    cfg, _, tok = load_model(odd, mtp_head=assistant)
    assert tok is None and cfg == CFG and "unsupported tokenizer model 'gemma4'" in caplog.text
    assert cli.main(["generate", "-m", str(odd), "-md", str(assistant), "--prompt-ids", "5,9,2", "-n", "4",
                     "-K", "2"]) == 0
    assert cli.main(["generate", "-m", str(odd), "--prompt", "hello", "-n", "4"]) == 2
    err = capsys.readouterr().err
    assert "--prompt needs a model with a tokenizer we read" in err and "Traceback" not in err


# every matrix row a multiple of 256, so IQ2_XXS applies to all of the assistant's matrices
WIDE = dict(hidden_size=256, head_dim=128, head_dim_swa=64, intermediate_size=256, moe_intermediate_size=256)
WIDE_A = dict(hidden_size=256, backbone_hidden_size=256, head_dim=128, head_dim_swa=64, intermediate_size=256)


@pytest.mark.peer
def test_assistant_imatrix_lets_llama_quantize_make_iq2_xxs(peer, tmp_path):
    """The assistant driven as it drafts (teacher-forced pairs (h_{j-1}, t_j), each query over the target's entries
    < j): an entry for every matrix of its file; llama-quantize IQ2_XXS of the assistant GGUF succeeds with that
    imatrix and fails without it (Missing importance matrix)."""
    cfg = CFG.replace(**WIDE, assistant=dataclasses.replace(CFG.assistant, **WIDE_A))
    params = P.init(jax.random.key(2), cfg, std=0.05)
    model = G.write_gguf(tmp_path / "assistant.gguf", cfg, params, part="mtp")
    col = IM.Collector(params, cfg, mtp=True, batch=2)
    col.add(IM.make_chunks(np.random.default_rng(0).integers(1, cfg.vocab_size, 4 * 32), 32, None, max_chunks=4))
    head = col.head_result(32, ["random ids"])
    matrices = {t.name for t in G.open_gguf(model).tensors if len(t.shape) >= 2 and t.name != "masked_embd_ordering"}
    assert set(head.in_sum2) == matrices
    assert all(head.counts[n].min() > 0 for n in matrices)
    without = dataclasses.replace(head, in_sum2={n: v for n, v in head.in_sum2.items() if n.startswith("blk.0.")},
                                  counts={n: v for n, v in head.counts.items() if n.startswith("blk.0.")})
    _, out = peer.quantize_needs_imatrix(model, head, without, tmp_path)
    assert "Missing importance matrix for tensor" in out


def test_imatrix_cli_writes_the_assistant_imatrix_beside(pair, tmp_path, capsys):
    from mtp_jax.io.tokenizer import tiny_bpe

    _, _, params = pair
    tok = tiny_bpe(CFG.vocab_size)
    target = G.write_gguf(tmp_path / "t.gguf", CFG, params, tokenizer=tok)
    assistant = G.write_gguf(tmp_path / "a.gguf", CFG, params, tokenizer=tok, part="mtp")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "im.gguf"
    assert cli.main(["imatrix", "-m", str(target), "-md", str(assistant), "-f", str(text), "-o", str(out),
                     "--chunk-size", "32", "--quiet"]) == 0
    from mtp_jax.io.imatrix_gguf import read_imatrix

    trunk, head = read_imatrix(out), read_imatrix(tmp_path / "im-head.gguf")
    assert "blk.5.attn_q.weight" in trunk.in_sum2 and "nextn.pre_projection.weight" in head.in_sum2
    assert "im-head.gguf" in capsys.readouterr().out


@pytest.mark.peer
def test_our_q4_k_m_of_both_files_is_llama_quantizes_and_the_quantized_pair_drafts(peer, tmp_path):
    """The quantizer's type policy covers both arches: our Q4_K_M of the target and of the assistant (with its
    imatrix) are llama-quantize's files byte for byte; the quantized pair loads (weights kept in their blocks,
    the assistant's dequantized) and greedy MTP equals plain greedy on it."""
    from mtp_jax import speculative
    from mtp_jax.generate import generate
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    cfg = CFG.replace(**WIDE, assistant=dataclasses.replace(CFG.assistant, **WIDE_A))
    params = P.init(jax.random.key(2), cfg, std=0.05)
    files = {"target": G.write_gguf(tmp_path / "t.gguf", cfg, params, outtype="f16"),
             "assistant": G.write_gguf(tmp_path / "a.gguf", cfg, params, outtype="f16", part="mtp")}
    col = IM.Collector(params, cfg, mtp=True, batch=2)
    col.add(IM.make_chunks(np.random.default_rng(0).integers(1, cfg.vocab_size, 4 * 32), 32, None, max_chunks=4))
    imatrix = {"target": write_imatrix_gguf(col.result(32, ["ids"]), tmp_path / "im.gguf"),
               "assistant": write_imatrix_gguf(col.head_result(32, ["ids"]), tmp_path / "im-head.gguf")}
    quantized = {}
    for part, path in files.items():
        ours, ref = tmp_path / f"{part}-q4km-ours.gguf", tmp_path / f"{part}-q4km-llama.gguf"
        quantize_gguf(path, ours, "Q4_K_M", imatrix=imatrix[part], threads=1, progress=False)
        p = peer.run("llama-quantize", "--imatrix", imatrix[part], path, ref, "Q4_K_M", 1, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert ours.read_bytes() == ref.read_bytes(), part
        quantized[part] = ours
    qcfg, qparams, _ = load_model(quantized["target"], mtp_head=quantized["assistant"])
    assert qcfg.has_mtp
    prompts = [[5, 9, 2, 7, 1]]
    ref = generate(qparams, qcfg, prompts, max_new_tokens=8, eos_ids=[])
    assert speculative.generate(qparams, qcfg, prompts, num_draft=2, max_new_tokens=8, eos_ids=[]).tokens == ref.tokens
