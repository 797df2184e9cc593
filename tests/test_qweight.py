"""Weights kept in their GGUF block format (mtp_jax.qweight): the in-graph dequantizers are gguf-py's bit for bit,
a model's logits with quantized leaves equal those with the same weights dequantized to f32 on the host, stacks
that mix types (llama-quantize's Q4_K_M) work, device bytes are the file's tensor bytes, greedy MTP == plain."""

from functools import partial

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import generate as plain
from mtp_jax import model, speculative
from mtp_jax import params as P
from mtp_jax import qweight
from mtp_jax.config import load_config
from mtp_jax.io.gguf import read_gguf, write_gguf
from mtp_jax.quant import registry
from mtp_jax.quant.gguf_quantize import quantize_gguf
from tests.helpers import tiny_config

# ftype -> the one block type a --pure quantization gives every weight matrix
PURE = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K",
        "Q3_K_S": "Q3_K", "Q4_K_S": "Q4_K", "Q5_K_S": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL",
        "IQ4_XS": "IQ4_XS", "TQ2_0": "TQ2_0"}


def _quant_leaves(params):
    return [x for x in jax.tree.leaves(params, is_leaf=qweight.is_quant) if qweight.is_quant(x)]


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    """A GLM-style model whose every matrix has a multiple of 256 inputs (K-quant blocks fit), as an F32 GGUF."""
    cfg = tiny_config(hidden_size=256, head_dim=64, intermediate_size=512, moe_intermediate_size=256)
    path = tmp_path_factory.mktemp("qweight") / "f32.gguf"
    write_gguf(path, cfg, P.init(jax.random.key(0), cfg, std=0.08), outtype="f32")
    return path


def _quantized(src, ftype, pure=True):
    out = src.with_name(f"{ftype}{'-pure' if pure else ''}.gguf")
    if not out.exists():
        quantize_gguf(src, out, ftype, pure=pure, threads=1, progress=False)
    return out


@partial(jax.jit, static_argnums=2)
def _forward(params, tokens, cfg):
    return model.forward(params, tokens, None, cfg)[1]


def _logits(params, cfg, tokens):
    return np.asarray(_forward(params, tokens, cfg))  # float params of one shape compile once


def _close(a, b):
    """Equal up to f32 summation order: the dequantized values are the host's bit for bit (tested above), but a
    quantized [N, K] row block and a float [K, N] leaf are summed over K in different orders. 1e-5 of the
    logits' scale."""
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)


@pytest.mark.parametrize("qtype", sorted(qweight.DEQUANTIZERS))
def test_dequantizer_is_gguf_py_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0] = 0  # all-zero blocks
    x[1, :256] = -np.abs(x[1, :256]) * 1e-6  # negative maxima, tiny (subnormal f16) scales
    x[2] *= 1e4
    x[3, ::7] = 0.5  # ties after scaling
    blocks = registry.quantize(x, qtype)
    want = registry.dequantize(blocks, qtype)
    got = np.asarray(jax.jit(lambda b: qweight.dequantize(b, qtype))(jnp.asarray(blocks)))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("ftype", sorted(PURE))
def test_logits_with_quantized_leaves_equal_host_dequantized(f32_model, ftype):
    path = _quantized(f32_model, ftype)
    cfg, kept = read_gguf(path, dtype="float32", quantized="keep")
    _, host = read_gguf(path, dtype="float32", quantized="dequantize")
    leaves = _quant_leaves(kept)
    # every quantized tensor of the file stays quantized, byte for byte, all of them in the one type
    quantized = [t for t in gguf.GGUFReader(path).tensors if t.tensor_type.name not in qweight.FLOAT_TYPES]
    assert sum(q.nbytes for q in leaves) == sum(int(t.n_bytes) for t in quantized) > 0
    assert {t for q in leaves for t in q.types} == {PURE[ftype]}
    assert not _quant_leaves(host)
    _close(_logits(kept, cfg, TOKENS), _logits(host, cfg, TOKENS))
    for q in leaves[:3]:  # the leaf's own dequantization is the host's
        assert q.dequantized().shape == q.shape


def test_mixed_type_stack_and_device_bytes(f32_model):
    """llama-quantize's Q4_K_M rule gives ffn_down Q4_K in some layers and Q6_K in others: one stack, two
    groups picked per layer; the device holds exactly the file's tensor bytes."""
    path = _quantized(f32_model, "Q4_K_M", pure=False)
    cfg, kept = read_gguf(path, dtype="float32", quantized="keep")
    _, host = read_gguf(path, dtype="float32", quantized="dequantize")
    mixed = [q for q in _quant_leaves(kept) if q.layer_map is not None]
    assert mixed and all(len(q.types) == 2 for q in mixed)
    _close(_logits(kept, cfg, TOKENS), _logits(host, cfg, TOKENS))
    for q in mixed:  # each layer's rows dequantize to the host's values
        np.testing.assert_array_equal(np.asarray(q.dequantized()), np.asarray(_host_leaf(host, kept, q)))
    held = sum(x.nbytes for x in jax.tree.leaves(kept))
    on_file = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert held == on_file


def _host_leaf(host, kept, q):
    flat_k = jax.tree.leaves(kept, is_leaf=qweight.is_quant)
    return jax.tree.leaves(host)[next(i for i, x in enumerate(flat_k) if x is q)]


def test_greedy_mtp_equals_plain_with_quantized_weights(f32_model):
    cfg, params = read_gguf(_quantized(f32_model, "Q8_0"), dtype="float32", quantized="keep")
    assert qweight.is_quant(params.nextn[0].eh_proj) and qweight.is_quant(params.embed)
    prompts = [[5, 9, 17, 33], [100, 7]]
    want = plain.generate(params, cfg, prompts, max_new_tokens=12).tokens
    got = speculative.generate(params, cfg, prompts, max_new_tokens=12, num_draft=2).tokens
    assert got == want


def test_per_head_weights_of_mla(tmp_path):
    """DeepSeek's attn_k_b / attn_v_b hold one matrix per head (linear(heads=True)); Q8_0 blocks fit 32 inputs."""
    cfg = load_config("deepseek2-tiny").replace(qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                                                 kv_lora_rank=64, q_lora_rank=64)
    src = tmp_path / "f32.gguf"
    write_gguf(src, cfg, P.init(jax.random.key(1), cfg, std=0.08), outtype="f32")
    path = _quantized(src, "Q8_0")
    cfg, kept = read_gguf(path, dtype="float32", quantized="keep")
    _, host = read_gguf(path, dtype="float32", quantized="dequantize")
    assert qweight.is_quant(kept.moe_layers.attn.wk_b) and qweight.is_quant(kept.moe_layers.attn.wv_b)
    _close(_logits(kept, cfg, TOKENS), _logits(host, cfg, TOKENS))


def test_reshape_keeps_inputs_and_outputs_apart():
    rows = jnp.zeros((3, 8 * 4, 64 // 32 * 34), jnp.uint8)  # [L, N = 8*4, K = 64 as Q8_0 rows]
    q = qweight.QuantWeight((rows,), ("Q8_0",), (3, 64, 8, 4), n_lead=1, n_in=1)
    assert q.reshape(3, 64, 32).shape == (3, 64, 32) and q.reshape(3, 64, -1).n_in == 1
    assert q.reshape(3, 8, 8, 32).n_in == 2  # inputs split
    with pytest.raises(ValueError, match="mixes input and output"):
        q.reshape(3, 128, 16)
    with pytest.raises(ValueError, match="cannot reshape"):
        q.reshape(96, 64)
    with pytest.raises(TypeError, match="table"):
        q[jnp.zeros((2,), jnp.int32)]


def test_xla_path_reads_a_mixed_type_stack(f32_model):
    """Without the CPU kernels (the path accelerators take), a prefill routes enough tokens for XLA's grouped
    matmuls over the whole layer's experts: a stack mixing Q4_K and Q6_K layers is dequantized per layer there."""
    from mtp_jax import kernels

    path = _quantized(f32_model, "Q4_K_M", pure=False)
    cfg, kept = read_gguf(path, dtype="float32", quantized="keep")
    _, host = read_gguf(path, dtype="float32", quantized="dequantize")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 16)), jnp.int32)  # 64 pairs > 8 experts / 2
    with kernels.disabled():
        got = model.forward(kept, tokens, None, cfg)[1]
        want = model.forward(host, tokens, None, cfg)[1]
    _close(np.asarray(got), np.asarray(want))
