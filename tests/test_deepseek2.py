"""DeepSeek-V3 (family deepseek2): trunk logits equal transformers' DeepseekV3ForCausalLM; the latent cache holds
one (kv_lora_rank + qk_rope_head_dim) entry per token; GGUFs we write (directly, or converted from an HF
DeepSeek-V3-layout directory with its MTP layer) run in llama.cpp: same logits, same greedy text, and MTP
speculative decoding drafts the same tokens and accepts the same count at every step; greedy MTP output equals
plain greedy output for K = 1..4; our HF -> GGUF equals llama.cpp's converter on every tensor it keeps."""

from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import imatrix as IM
from mtp_jax import kvcache, speculative
from mtp_jax import model as M
from mtp_jax import params as P
from mtp_jax.cli import main as cli_main
from mtp_jax.config import load_config
from mtp_jax.generate import generate
from mtp_jax.io import hf
from mtp_jax.io.gguf import read_gguf, write_gguf
from mtp_jax.io.imatrix_gguf import read_imatrix, write_imatrix_gguf
from mtp_jax.io.tokenizer import tiny_bpe
from mtp_jax.llama_cpp import speculative_counts
from tests.io.conftest import printable_head
from tests.io.test_peer import COMMON, PROMPT

# q-LoRA off, plain RoPE, one expert group, unnormalized weights, tied embeddings: the other branches
NO_LORA = dict(q_lora_rank=None, rope_scaling="none", rope_factor=1.0, rope_mscale=1.0, rope_mscale_all_dim=1.0,
               n_group=1, topk_group=1, norm_topk_prob=False, tie_word_embeddings=True)
LOGIT_TOL = 1e-5  # vs llama.cpp: f32 weights and KV cache, no flash attention
DRAFTING = (0.075, 1)  # drafting_params' (noise, seed): every acceptance count 0..3 occurs in the K = 3 peer run


@lru_cache(maxsize=None)
def tiny(**overrides):
    return load_config("deepseek2-tiny").replace(**overrides)


def _with_bias(layer: P.Layer, key) -> P.Layer:
    """A nonzero router correction bias, so that selection differs from weighting."""
    ffn = dataclasses.replace(layer.ffn, bias=0.05 * jax.random.normal(key, layer.ffn.bias.shape))
    return dataclasses.replace(layer, ffn=ffn)


@lru_cache(maxsize=None)
def random_params(seed: int = 0, **overrides) -> P.Params:
    """std 0.08 weights (the logits depend on every layer) and nonzero correction biases."""
    cfg = tiny(**overrides)
    p = P.init(jax.random.key(seed), cfg, std=0.08)
    k1, k2 = jax.random.split(jax.random.key(seed + 1000))
    nextn = tuple(dataclasses.replace(n, layer=_with_bias(n.layer, k2)) for n in p.nextn)
    return dataclasses.replace(p, moe_layers=_with_bias(p.moe_layers, k1), nextn=nextn)


@lru_cache(maxsize=None)
def drafting_params(noise: float, seed: int = 0) -> P.Params:
    """A head that agrees with the trunk part of the time (tests/spec_fixtures.py's construction): large embedding
    and lm_head, small blocks, eh_proj passing the embedding half through."""
    cfg = tiny()
    p = P.init(jax.random.key(seed), cfg, std=noise)
    D = cfg.hidden_size
    embed = jax.random.normal(jax.random.key(seed + 1), (cfg.vocab_size, D))
    head = jax.random.normal(jax.random.key(seed + 2), (D, cfg.vocab_size))
    eh = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], 0)
    nextn = tuple(dataclasses.replace(n, eh_proj=eh) for n in p.nextn)
    return dataclasses.replace(p, embed=embed, lm_head=head, nextn=nextn)


# ---- transformers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},  # q-LoRA, YaRN (mscale = mscale_all_dim = 0.707), 4 groups of which 2 used, dense lead layer, shared expert
    NO_LORA,
], ids=["lora-yarn-groups", "plain"])
def test_trunk_logits_match_transformers(overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params = tiny(**overrides), random_params(0, **overrides)
    keys = {f.name for f in dataclasses.fields(transformers.DeepseekV3Config)}
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k in keys})
    hf_cfg._attn_implementation = "eager"
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    sd = hf.to_hf(params, cfg, fused_experts=True, with_mtp=False)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (cfg.tie_word_embeddings and m == "lm_head.weight") for m in missing), missing
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    _, ours, _, _ = M.forward(params, jnp.asarray(tokens, jnp.int32), None, cfg)
    diff = np.abs(np.asarray(ours) - ref).max()
    assert ref.std() > 0.1  # logits are not degenerate
    assert diff <= 1e-4, f"max |diff| = {diff}"


def test_yarn_is_active_in_the_tiny_config():
    """The tiny config's YaRN ramp blends some rope pairs and scales the scores (what the parity tests check)."""
    cfg, plain = tiny(), tiny(rope_scaling="none")
    f, f0 = cfg.rope_freqs(), plain.rope_freqs()
    assert f[0] == f0[0] and np.isclose(f[-1], f0[-1] / cfg.rope_factor) and (f != f0).sum() >= 3
    assert cfg.attn_scale > plain.attn_scale and np.isclose(plain.attn_scale, cfg.qk_head_dim ** -0.5)


# ---- the latent cache --------------------------------------------------------------------------------------------


def test_latent_cache_is_one_entry_per_token_and_decode_equals_full_forward():
    cfg, params = tiny(), random_params()
    C, R, S = cfg.kv_lora_rank, cfg.qk_rope_head_dim, 32
    cache = kvcache.init_trunk_cache(cfg, 2, S)
    assert [k.shape for k in cache.k] == [(1, 2, S, 1, C + R), (2, 2, S, 1, C + R)]  # dense lead, MoE stacks
    assert cache.v == (None, None)
    head = kvcache.init_nextn_cache(cfg, 2, S)
    assert head.k[0].shape == (1, 2, S, 1, C + R) and head.v == (None,)
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (9, 14)]
    tokens, n_valid = M.pad_prompts([r[:5] for r in rows], cfg)
    _, _, cache, _ = M.forward(params, jnp.asarray(tokens), cache, cfg, n_valid=jnp.asarray(n_valid))
    for s in cache.k:
        assert np.asarray(s[:, :, :5]).any(axis=-1).all()  # an entry in every written slot
        assert not np.asarray(s[:, :, 5:]).any()  # nothing past the prompt
    full = [np.asarray(M.forward(params, jnp.asarray([r]), None, cfg)[1][0]) for r in rows]
    for t in range(5, 9):  # decode step by step
        _, lg, cache, _ = M.forward(params, jnp.asarray([[r[t]] for r in rows]), cache, cfg)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(lg[b, 0]), full[b][t], atol=5e-5)
    assert np.asarray(cache.lengths).tolist() == [9, 9]


# ---- llama.cpp ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe(tiny().vocab_size)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("deepseek2")


@pytest.fixture(scope="module")
def random_model(files, tok):
    """(path, cfg, params): random weights, printable output head, f32 GGUF with the NextN block."""
    cfg, params = tiny(), printable_head(random_params(), tok)
    return write_gguf(files / "random-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="module")
def drafting_model(files, tok):
    """(path, cfg, params): a head that agrees with the trunk part of the time, f32 GGUF written by us."""
    cfg, params = tiny(), printable_head(drafting_params(*DRAFTING), tok)
    return write_gguf(files / "drafting-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="module")
def converted_model(files, tok, drafting_model):
    """The drafting model as an HF DeepSeek-V3 directory (MTP layer = model.layers.{num_hidden_layers}, per-expert
    tensors, kv_b_proj whole), converted by ``mtp-jax convert``."""
    _, cfg, params = drafting_model
    src = hf.write_hf(files / "hf-drafting", cfg, params, dtype="float32", tokenizer=tok)
    dst = files / "converted-f32.gguf"
    assert cli_main(["convert", str(src), str(dst), "--outtype", "f32"]) == 0
    return dst, cfg.replace(name="deepseek2"), params


@pytest.mark.peer
@pytest.mark.parametrize("overrides", [{}, {"scoring_func": "softmax"}, NO_LORA],
                         ids=["lora-yarn-groups", "softmax-gating", "plain"])
def test_logits_match_llama_cpp(peer, tok, tmp_path, overrides):
    """softmax: expert_gating_func 1 (DeepSeek-V2), with the correction bias and groups; plain: no q-LoRA (written
    as q_lora_rank 0), no YaRN, tied output."""
    cfg, params = tiny(**overrides), random_params(0, **overrides)
    path = write_gguf(tmp_path / "m.gguf", cfg, params, "f32", tok)
    ids = tok.encode(PROMPT + " in the northern valley.")
    peer.logits_agree(path, cfg, params, ids, LOGIT_TOL)


@pytest.mark.peer
def test_greedy_generation_matches_llama_completion(peer, random_model, tok):
    path, cfg, params = random_model
    ids = tok.encode(PROMPT)
    ours = generate(params, cfg, [ids], max_new_tokens=64).tokens[0]
    assert len(ours) == 64
    want = PROMPT.encode() + tok.decode_bytes(ours)
    p = peer.run_until("llama-completion", "-m", path, "-p", PROMPT, "-n", 64, "-no-cnv", *COMMON,
                       ok=lambda p: len(p.stdout) >= len(want))
    assert p.stdout[: len(want)] == want
    assert p.stdout[len(want):].strip() == b""


@pytest.mark.peer
@pytest.mark.parametrize("which", ["written", "converted-from-hf"])
def test_mtp_speculative_matches_llama_speculative_simple(peer, drafting_model, converted_model, tok, tmp_path,
                                                          which):
    """Greedy draft-mtp, K = 3: the same drafted tokens and accepted count at every step and the same text
    (llama_cpp_peer.draft_mtp_agrees), every count 0..3 taken."""
    hist = peer.draft_mtp_agrees(*(drafting_model if which == "written" else converted_model), tok, tmp_path)
    assert (hist > 0).all(), f"acceptance counts {hist} do not exercise every path"


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_greedy_mtp_equals_plain_greedy(K):
    """On the drafting model (acceptance neither 0 nor 1), two rows of different lengths."""
    cfg, params = tiny(), drafting_params(*DRAFTING)
    prompts = [[11, 57, 300, 42, 7], [3, 99, 200]]
    ref = generate(params, cfg, prompts, max_new_tokens=24, eos_ids=[])
    res = speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=24, eos_ids=[])
    assert res.tokens == ref.tokens
    hist = res.stats["accept_hist"]
    assert sum(hist[1:]) > 0 and hist[0] > 0  # drafts are accepted and rejected


@pytest.mark.peer
def test_hf_to_gguf_matches_llama_cpp_converter(peer, converted_model, files, tmp_path):
    """convert_hf_to_gguf.py on the same HF directory (it drops the MTP layer for DeepseekV3ForCausalLM): every
    tensor it writes is ours with the same type, shape and bytes (kv_b_proj cut into attn_k_b / attn_v_b), and its
    deepseek2.* keys are ours but the block count; ours keep blk.{n_layer}."""
    path, cfg, _ = converted_model
    theirs = tmp_path / "theirs.gguf"
    p = peer.convert_hf(files / "hf-drafting", theirs, "f16")
    assert p.returncode == 0, p.stderr[-3000:]
    ours = hf.hf_to_gguf(files / "hf-drafting", tmp_path / "ours.gguf", "f16")
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    ta = {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in a.tensors}
    tb = {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in b.tensors}
    head = f"blk.{cfg.num_hidden_layers}."
    assert sorted(ta) == sorted(n for n in tb if not n.startswith(head))
    assert {"attn_k_b", "attn_v_b", "attn_q_a", "attn_kv_a_mqa"} <= {n.split(".")[2] for n in ta if "blk." in n}
    assert f"{head}nextn.eh_proj.weight" in tb and f"{head}attn_k_b.weight" in tb
    for name in ta:
        assert ta[name] == tb[name], name
    kv = lambda r: {k: f.contents() for k, f in r.fields.items() if k.startswith("deepseek2.")}  # noqa: E731
    ka, kb = kv(a), kv(b)
    assert kb.pop("deepseek2.block_count") == ka.pop("deepseek2.block_count") + cfg.num_nextn_predict_layers
    assert kb.pop("deepseek2.nextn_predict_layers") == cfg.num_nextn_predict_layers
    assert ka == kb
    cfg2, _ = read_gguf(theirs, dtype="float32", load_mtp=False)  # the converter's file reads back (no NextN)
    assert cfg2.num_hidden_layers == cfg.num_hidden_layers


# ---- imatrix and quantization ------------------------------------------------------------------------------------

CHUNK = 128
# every row a multiple of 256 (IQ2_XXS and the k-quants apply everywhere): attn_k_b rows are qk_nope_head_dim long,
# attn_v_b rows kv_lora_rank, attn_output rows heads x v_head_dim
WIDE = dict(hidden_size=256, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=256, qk_rope_head_dim=64,
            v_head_dim=64, intermediate_size=256, moe_intermediate_size=256)


@pytest.fixture(scope="module")
def model256(files, tok):
    """The wide model; decisive routing (router x 20: float rounding, ours vs ggml, cannot flip an expert) and a
    NextN block with its own embed_tokens / shared_head_head copies, as DeepSeek-V3's MTP module has them."""
    cfg = tiny(**WIDE)
    p = P.init(jax.random.key(5), cfg, std=0.05)
    ffn = p.moe_layers.ffn
    moe = dataclasses.replace(p.moe_layers, ffn=dataclasses.replace(ffn, router=ffn.router * 20))
    nn = dataclasses.replace(p.nextn[0], embed_tokens=p.embed, shared_head_head=p.lm_head)
    params = dataclasses.replace(p, moe_layers=moe, nextn=(nn,))
    return write_gguf(files / "wide-f32.gguf", cfg, params, "f32", tok), cfg, params


@pytest.fixture(scope="module")
def text(files):
    import json.decoder
    import json.encoder
    path = files / "imatrix-text.txt"
    path.write_text(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    return path


@pytest.fixture(scope="module")
def imatrix_theirs(peer, model256, text, files):
    out = files / "imatrix-llama.gguf"
    p = peer.run("llama-imatrix", "-m", model256[0], "-f", text, "-o", out, "-c", CHUNK, "-b", CHUNK, "--chunks", 4,
                 "-t", 1, "-fa", "off", "--no-ppl", timeout=300)
    assert p.returncode == 0 and out.exists(), p.stderr[-3000:]
    return out, read_imatrix(out)


@pytest.fixture(scope="module")
def imatrix_ours(model256, text, tok, files):
    _, cfg, params = model256
    bos = tok.bos_id if tok.add_bos else None
    chunks = IM.make_chunks(tok.encode(text.read_text(), add_special=True), CHUNK, bos, max_chunks=4)
    col = IM.Collector(params, cfg, mtp=True, batch=2)
    col.add(chunks)
    data = col.result(CHUNK, [text.name])
    return write_imatrix_gguf(data, files / "imatrix-ours.gguf"), data


@pytest.mark.peer
def test_imatrix_trunk_entries_agree_with_llama_imatrix_and_cover_the_head(imatrix_theirs, imatrix_ours, model256):
    """Every MLA matmul included: attn_k_b / attn_v_b are 3-D (one matrix per head), one count per tensor."""
    (_, theirs), (_, data), cfg = imatrix_theirs, imatrix_ours, model256[1]
    n = cfg.num_hidden_layers
    assert theirs.chunk_count == data.chunk_count == 4
    assert not any(name.startswith(f"blk.{n}.") for name in theirs.in_sum2)  # llama.cpp: no MTP statistics
    mla = {"attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output"}
    assert {f"blk.{i}.{t}.weight" for i in range(n) for t in mla} <= set(theirs.in_sum2)
    for name in theirs.in_sum2:
        assert name in data.in_sum2, name
        np.testing.assert_array_equal(data.counts[name], theirs.counts[name], err_msg=name)
        a, b = data.in_sum2[name], theirs.in_sum2[name]
        assert a.shape == b.shape, name
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel <= 1e-3, (name, rel)
    head = {k for k in data.in_sum2 if k.startswith(f"blk.{n}.")}
    assert {f"blk.{n}.{t}.weight" for t in mla | {"ffn_down_exps", "nextn.eh_proj", "nextn.shared_head_head"}} <= head
    assert set(data.in_sum2) - set(theirs.in_sum2) == head


@pytest.mark.peer
def test_llama_quantize_iq2_xxs_with_our_imatrix_and_the_result_drafts(peer, imatrix_theirs, imatrix_ours, model256,
                                                                        files):
    model, cfg, _ = model256
    bad = peer.run("llama-quantize", "--imatrix", imatrix_theirs[0], model, files / "iq2-theirs.gguf", "IQ2_XXS", 1,
                   timeout=300)
    assert bad.returncode != 0
    assert f"Missing importance matrix for tensor blk.{cfg.num_hidden_layers}." in (
        bad.stderr + bad.stdout.decode(errors="replace"))
    good = peer.run("llama-quantize", "--imatrix", imatrix_ours[0], model, files / "iq2-ours.gguf", "IQ2_XXS", 1,
                    timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files / "iq2-ours.gguf").tensors}
    assert types[f"blk.{cfg.num_hidden_layers}.attn_k_b.weight"] != "F32"
    # --no-repack: llama.cpp's AMX repacking of quantized weights segfaults on this CPU (test_imatrix_peer.py)
    spec = peer.run_until("llama-speculative-simple", "-m", files / "iq2-ours.gguf", "--spec-type", "draft-mtp",
                          "-p", "def main():", "-n", 24, "--temp", 0, "-t", 1, "-c", 256, "--no-repack",
                          ok=lambda p: "n_drafted" in p.stderr)
    assert speculative_counts(spec.stderr)[0] > 0


@pytest.mark.peer
def test_our_q4_k_m_equals_llama_quantize(peer, imatrix_ours, model256, files):
    """Our quantizer on the deepseek2 file (MLA tensors, MTP block, our imatrix): llama-quantize's bytes."""
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    model = model256[0]
    ours = files / "q4km-ours.gguf"
    quantize_gguf(model, ours, "Q4_K_M", imatrix=imatrix_ours[0], threads=1, progress=False)
    ref = files / "q4km-llama.gguf"
    p = peer.run("llama-quantize", "--imatrix", imatrix_ours[0], model, ref, "Q4_K_M", 1, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    if ours.read_bytes() != ref.read_bytes():
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
        differ = [(t.name, t.tensor_type.name, u.tensor_type.name) for t, u in zip(a.tensors, b.tensors)
                  if t.tensor_type != u.tensor_type or not np.array_equal(t.data, u.data)]
        pytest.fail(f"tensors differ from llama-quantize's: {differ}" if differ else "the metadata differs")
