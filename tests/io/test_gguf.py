"""GGUF reader/writer: exact round trips, llama.cpp's layout conventions, quantized tensors, and bad input."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from gguf import MODEL_ARCH, MODEL_TENSORS, GGMLQuantizationType, GGUFValueType

from mtp_jax import params as P
from mtp_jax.io import tree
from mtp_jax.families import glm4moe
from mtp_jax.io.gguf import GGUFError, open_gguf, read_gguf, write_gguf
from mtp_jax.io.tokenizer import Tokenizer
from tests.helpers import tiny_config, tiny_params
from tests.io.gguf_mutants import rewrite

Q = GGMLQuantizationType


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def numpy_params(cfg, seed=0):
    """Random weights without tracing or compiling anything (params.init compiles per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda i: rng.standard_normal(i.shape).astype(np.float32), P.abstract(cfg),
                        is_leaf=lambda x: isinstance(x, P.ArrayInfo))


# ---- round trips ------------------------------------------------------------------------------------------------


def test_f32_round_trip_is_exact(tiny_gguf, tok):
    path, cfg, params = tiny_gguf
    cfg2, params2 = read_gguf(path)
    assert cfg2 == cfg
    assert_same(params, params2)
    tok2 = Tokenizer.from_gguf(open_gguf(path))
    assert tok2.to_dict() | {"eos_id": None, "bos_id": None, "eot_id": None, "eom_id": None} == \
        tok.to_dict() | {"eos_id": None, "bos_id": None, "eot_id": None, "eom_id": None}
    assert tok2.eos_id == cfg.eos_token_ids[0]  # the model's end-of-generation ids are the config's


@pytest.mark.parametrize("overrides", [
    {"num_nextn_predict_layers": 0},
    {"tie_word_embeddings": True, "use_qk_norm": True, "attention_bias": False},
    {"first_k_dense_replace": 0, "n_shared_experts": 0, "n_group": 1, "topk_group": 1, "eos_token_ids": (0, 7, 9),
     "bos_token_id": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
    {"first_k_dense_replace": 3, "partial_rotary_factor": 1.0},
], ids=["no-mtp", "tied-qknorm-nobias", "all-moe", "all-dense"])
def test_round_trip_variants(io_dir, overrides):
    cfg = tiny_config(**overrides)
    params = numpy_params(cfg)
    path = write_gguf(io_dir / f"variant-{len(overrides)}-{cfg.num_dense_layers}.gguf", cfg, params)
    cfg2, params2 = read_gguf(path)
    assert cfg2 == cfg
    assert_same(params, params2)


def test_nextn_optional_tensors_round_trip(io_dir):
    """shared_head_head / embed_tokens (DeepSeek-style MTP blocks carry them) are written when present."""
    cfg = tiny_config()
    p = tiny_params()
    V, D = cfg.vocab_size, cfg.hidden_size
    nn = dataclasses.replace(p.nextn[0], shared_head_head=jax.random.normal(jax.random.key(1), (D, V)),
                             embed_tokens=jax.random.normal(jax.random.key(2), (V, D)))
    p = dataclasses.replace(p, nextn=(nn,))
    path = write_gguf(io_dir / "nextn-full.gguf", cfg, p)
    names = {t.name for t in open_gguf(path).tensors}
    assert {"blk.3.nextn.shared_head_head.weight", "blk.3.nextn.embed_tokens.weight"} <= names
    assert_same(p, read_gguf(path)[1])


@pytest.mark.parametrize("outtype, qtype, dtype", [("f16", Q.F16, np.float16), ("bf16", Q.BF16, ml_dtypes.bfloat16)])
def test_f16_bf16(io_dir, tiny_gguf, outtype, qtype, dtype):
    _, cfg, params = tiny_gguf
    path = write_gguf(io_dir / f"tiny-{outtype}.gguf", cfg, params, outtype)
    r = open_gguf(path)
    for t in r.tensors:  # convert_hf_to_gguf's rule: 1-D, norms, biases and the router stay F32
        f32 = len(t.shape) == 1 or t.name.endswith(("_norm.weight", ".bias")) or "ffn_gate_inp" in t.name
        assert t.tensor_type == (Q.F32 if f32 else qtype), t.name
    assert read_gguf(path)[0].dtype == np.dtype(dtype).name  # default dtype: the file's own
    _, p32 = read_gguf(path, dtype="float32")
    for leaf in tree.leaf_paths(tree.template_of(cfg, params)):  # each value rounded once (or kept, when F32)
        x, y = np.asarray(tree.get(params, leaf)), np.asarray(tree.get(p32, leaf))
        assert np.array_equal(y, x) or np.array_equal(y, x.astype(dtype).astype(np.float32)), leaf


def test_load_mtp_false_and_trunk_only_files(io_dir, tiny_gguf):
    path, cfg, params = tiny_gguf
    cfg2, p2 = read_gguf(path, load_mtp=False)
    assert cfg2 == cfg and p2.nextn is None
    assert_same(dataclasses.replace(params, nextn=None), p2)
    # a file announcing a NextN layer without its tensors loads trunk-only, as llama.cpp does (trunk_only)
    trunk = rewrite(path, io_dir / "trunk-only.gguf",
                    tensors=lambda n, d, t: None if n.startswith("blk.3.") else (d, t))
    cfg3, p3 = read_gguf(trunk)
    assert cfg3 == cfg and p3.nextn is None
    # but a NextN block with eh_proj and a tensor missing is an error
    bad = rewrite(path, io_dir / "half-mtp.gguf",
                  tensors=lambda n, d, t: None if n == "blk.3.ffn_gate_inp.weight" else (d, t))
    with pytest.raises(GGUFError, match=r"half-mtp\.gguf: missing tensor blk\.3\.ffn_gate_inp\.weight"):
        read_gguf(bad)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_1])
def test_quantized_tensors_are_dequantized(io_dir, tiny_gguf, qtype):
    path, cfg, params = tiny_gguf

    def quantize(name, data, t):
        if data.ndim == 2 and "ffn_gate_inp" not in name:
            return gguf.quants.quantize(data, qtype), qtype
        return data, t

    qpath = rewrite(path, io_dir / f"tiny-{qtype.name}.gguf", tensors=quantize,
                    kv={"general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q8_0), GGUFValueType.UINT32)})
    assert read_gguf(qpath)[0].dtype == "bfloat16"  # the default for quantized files
    _, p32 = read_gguf(qpath, dtype="float32")
    stored = {t.name: t for t in open_gguf(qpath).tensors}
    deq = lambda name: gguf.quants.dequantize(np.array(stored[name].data), qtype)  # noqa: E731
    assert stored["blk.0.attn_q.weight"].tensor_type == qtype
    D, N, H = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    np.testing.assert_array_equal(np.asarray(p32.dense_layers.attn.wq[0]),
                                  deq("blk.0.attn_q.weight").T.reshape(D, N, H))
    np.testing.assert_array_equal(np.asarray(p32.lm_head), deq("output.weight").T)
    err = np.abs(np.asarray(p32.lm_head) - np.asarray(params.lm_head)).max()
    assert 0 < err < 0.3 * np.abs(np.asarray(params.lm_head)).max()


# where each block keeps its f16 scale(s): ggml-common.h block layouts
_F16_AT = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,), Q.IQ2_XXS: (0,)}


@pytest.mark.parametrize("qtype", list(_F16_AT), ids=lambda q: q.name)
def test_k_and_iq_quants_are_dequantized(io_dir, qtype):
    """Rows of 256: random block bytes (sane scales) stand in for a quantizer; what we load is gguf-py's
    dequantization of them, laid out as ours."""
    cfg = tiny_config(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=256)
    path = write_gguf(io_dir / "rows256.gguf", cfg, numpy_params(cfg))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)

    def randomize(name, data, t):
        if data.ndim < 2 or data.shape[-1] % bs or "ffn_gate_inp" in name:
            return data, t
        blocks = rng.integers(0, 256, (data.size // bs, ts), dtype=np.uint8)
        for at in _F16_AT[qtype]:
            blocks[:, at: at + 2] = np.full(len(blocks), 0.01, np.float16).view(np.uint8).reshape(-1, 2)
        return blocks.reshape(*data.shape[:-1], data.shape[-1] // bs * ts), qtype

    qpath = rewrite(path, io_dir / f"rows256-{qtype.name}.gguf", tensors=randomize)
    stored = {t.name: t for t in open_gguf(qpath).tensors}
    deq = lambda name: gguf.quants.dequantize(np.array(stored[name].data), qtype)  # noqa: E731
    _, p = read_gguf(qpath, dtype="float32", check_finite=True)
    assert stored["blk.1.ffn_down_exps.weight"].tensor_type == qtype
    np.testing.assert_array_equal(np.asarray(p.moe_layers.ffn.down[0]),
                                  deq("blk.1.ffn_down_exps.weight").transpose(0, 2, 1))  # [E, out, in] -> [E, F, D]
    np.testing.assert_array_equal(np.asarray(p.nextn[0].layer.attn.wo),
                                  deq("blk.3.attn_output.weight").T.reshape(4, 64, 256))


def test_writer_uses_glm4moe_constants_and_converter_order(tiny_gguf):
    qk = tiny_config(use_qk_norm=True)
    used = {s.tensor for s in glm4moe.nextn_specs(qk) + glm4moe.top_specs(qk)}
    used |= {s.tensor for moe in (False, True) for s in glm4moe.layer_specs(qk, moe)}
    assert used <= set(MODEL_TENSORS[MODEL_ARCH.GLM4_MOE])
    path, cfg, _ = tiny_gguf
    r = open_gguf(path)
    names = [t.name for t in r.tensors]
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    assert "blk.1.exp_probs_b.bias" in names and "blk.1.post_attention_norm.weight" in names
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}  # ggml ne order
    D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    assert shapes["blk.1.ffn_gate_exps.weight"] == (D, F, E)  # glm4-moe.cpp: {n_embd, n_ff_exp, n_expert}
    assert shapes["blk.1.ffn_down_exps.weight"] == (F, D, E)
    assert shapes["blk.3.nextn.eh_proj.weight"] == (2 * D, D)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["glm4moe.block_count"] == cfg.num_hidden_layers + 1 and kv["glm4moe.nextn_predict_layers"] == 1
    assert kv["glm4moe.rope.dimension_count"] == cfg.rotary_dim
    assert kv["glm4moe.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert kv["glm4moe.leading_dense_block_count"] == 1 and kv["glm4moe.expert_shared_count"] == 1


# ---- bad input --------------------------------------------------------------------------------------------------


def test_truncated_file_names_the_tensor(io_dir, tiny_gguf):
    path = tiny_gguf[0]
    data = path.read_bytes()
    cut = io_dir / "truncated.gguf"
    cut.write_bytes(data[:-1000])
    with pytest.raises(GGUFError, match=r"truncated\.gguf: truncated: tensor output\.weight needs bytes up to "
                                        rf"{len(data)}, the file has {len(data) - 1000}$"):
        read_gguf(cut)
    cut.write_bytes(data[:200])
    with pytest.raises(GGUFError, match=r"truncated\.gguf: header: 36 keys cannot fit in the 176 bytes left in "
                                        r"the file$"):
        read_gguf(cut)
    cut.write_bytes(data[:6000])
    with pytest.raises(GGUFError, match=r"truncated\.gguf: truncated: an item of key tokenizer\.ggml\.tokens needs "
                                        r"\d+ bytes at offset \d+, the file has 6000$"):
        read_gguf(cut)


def test_wrong_magic(io_dir, tiny_gguf):
    bad = io_dir / "magic.gguf"
    bad.write_bytes(b"GGML" + tiny_gguf[0].read_bytes()[4:])
    with pytest.raises(GGUFError, match=r"magic\.gguf: not a GGUF file \(magic b'GGML'"):
        read_gguf(bad)
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(io_dir / "absent.gguf")


def test_missing_tensor(io_dir, tiny_gguf):
    bad = rewrite(tiny_gguf[0], io_dir / "missing.gguf",
                  tensors=lambda n, d, t: None if n == "blk.2.ffn_up_exps.weight" else (d, t))
    with pytest.raises(GGUFError, match=r"missing\.gguf: missing tensor blk\.2\.ffn_up_exps\.weight"):
        read_gguf(bad)


def test_wrong_shape(io_dir, tiny_gguf):
    bad = rewrite(tiny_gguf[0], io_dir / "shape.gguf",
                  tensors=lambda n, d, t: (np.ascontiguousarray(d.T), t) if n == "blk.0.ffn_gate.weight" else (d, t))
    with pytest.raises(GGUFError, match=r"shape\.gguf: tensor blk\.0\.ffn_gate\.weight has shape \[64, 128\] "
                                        r"\(numpy order\), expected \[128, 64\]"):
        read_gguf(bad)
    bad = rewrite(tiny_gguf[0], io_dir / "shape2.gguf",
                  tensors=lambda n, d, t: (d[:, :32].copy(), t) if n == "blk.1.attn_q.weight" else (d, t))
    with pytest.raises(GGUFError, match=r"tensor blk\.1\.attn_q\.weight has shape \[64, 32\].*expected \[64, 64\]"):
        read_gguf(bad)


def test_unknown_arch(io_dir, tiny_gguf):
    bad = rewrite(tiny_gguf[0], io_dir / "arch.gguf", arch="llama")
    with pytest.raises(GGUFError, match=r"arch\.gguf: architecture 'llama' is not supported \(supported: .*glm4moe"):
        read_gguf(bad)


def test_nan_with_check_finite(io_dir, tiny_gguf):
    def poison(name, data, t):
        if name == "blk.2.attn_k.weight":
            data = data.copy()
            data[3, 5] = np.nan
        return data, t

    bad = rewrite(tiny_gguf[0], io_dir / "nan.gguf", tensors=poison)
    with pytest.raises(GGUFError, match=r"nan\.gguf: tensor blk\.2\.attn_k\.weight contains non-finite values "
                                        r"\(1 of them; first at flat index 197: nan\)"):
        read_gguf(bad)  # checked by default (llama.cpp needs --check-tensors)
    read_gguf(bad, check_finite=False)


def test_writer_rejects_bad_params_without_leaving_files(io_dir):
    cfg, params = tiny_config(), tiny_params()
    out = io_dir / "bad-write"
    out.mkdir()
    bad = dataclasses.replace(params, final_norm=params.final_norm[:10])
    with pytest.raises(GGUFError, match=r"param final_norm has shape \(10,\), expected \(64,\)"):
        write_gguf(out / "x.gguf", cfg, bad)
    with pytest.raises(GGUFError, match="lack a NextN layer"):
        write_gguf(out / "x.gguf", cfg, dataclasses.replace(params, nextn=None))
    with pytest.raises(GGUFError, match="outtype must be one of"):
        write_gguf(out / "x.gguf", cfg, params, outtype="q4_0")
    with pytest.raises(GGUFError, match="at most 3 end-of-generation ids"):
        write_gguf(out / "x.gguf", cfg.replace(eos_token_ids=(0, 1, 2, 3)), params)
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_load_peak_memory_is_about_the_params():
    """scripts/measure_gguf_load_rss.py at 0.15 GB (the 1 GB run: peak RSS 1.23x the file, see the script): the
    load adds the parameters plus about one tensor, not a second copy of the file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, str(repo / "scripts" / "measure_gguf_load_rss.py"), "--size-gb", "0.15"],
                       capture_output=True, text=True, cwd=repo, timeout=300, check=False)
    r = json.loads(p.stdout[p.stdout.index("{"): p.stdout.rindex("}") + 1])
    assert r["dtype"] == "float16" and r["param_bytes"] <= r["file_bytes"]
    assert r["load_increment_over_file"] < 1.4, r
