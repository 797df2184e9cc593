"""KV-cache types (mtp_jax/kvquant.py, kvcache.QuantStack): ggml's q8_0 / q4_0 bytes, TurboQuant's rotation, layout
and error bounds, rollback and greedy equality with a q4_0 MTP cache in both families, device bytes, the CLI."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from jax.sharding import NamedSharding

from mtp_jax import cli, drafter, kvcache, kvquant, layers, plan, sharding, speculative
from mtp_jax import generate as plain
from mtp_jax import model as M
from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.kvquant import KVTypes

GLM32 = load_config("glm4moe-tiny").replace(head_dim=32)  # q8_0 / q4_0 need head dims that are multiples of 32
DS64 = load_config("deepseek2-tiny").replace(kv_lora_rank=48)  # MLA latent 48 + 16 rope dims
GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


@lru_cache(maxsize=None)
def drafting_params(cfg, noise: float, seed: int) -> P.Params:
    """tests/spec_fixtures.py's head that drafts part of the time (large embedding and lm_head, small blocks,
    eh_proj passing the embedding half through), drawn on the host: P.init compiles a sampler per leaf shape."""
    rng = np.random.default_rng(seed)
    fill = {"normal": lambda s: noise * rng.standard_normal(s), "ones": np.ones, "zeros": np.zeros}
    p = jax.tree.map(lambda i: jnp.asarray(fill[i.init](i.shape), jnp.float32), P.abstract(cfg),
                     is_leaf=lambda x: isinstance(x, P.ArrayInfo))
    D, V = cfg.hidden_size, cfg.vocab_size
    eh = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], 0)  # [2D, D]
    return dataclasses.replace(p, embed=jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
                               lm_head=jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
                               nextn=tuple(dataclasses.replace(n, eh_proj=eh) for n in p.nextn))


def _ggml_blocks(rng: np.random.Generator) -> np.ndarray:
    """[256, 32] f32 blocks: random magnitudes over 10 decades; exact ties after scaling (q8_0: amax = 127·2^e so
    that x/d = k + 1/2; q4_0: the first max = ±8·2^e so that x/d + 8.5 is an integer); all zeros, -0.0 first;
    negative maxima; equal magnitudes of both signs (the first wins in q4_0); tiny blocks whose d is an f16
    subnormal or rounds to 0."""
    e = 2.0 ** rng.integers(-8, 6, (32, 1))
    sign = rng.choice([-1.0, 1.0], (32,))
    ties8 = e * (rng.integers(-127, 127, (32, 32)) + 0.5)
    ties8[:, 7] = 127 * e[:, 0] * sign
    ties4 = e * (rng.integers(-8, 8, (32, 32)) + 0.5)
    ties4[:, 3] = 8 * e[:, 0] * sign
    ties4[:, 20] = -ties4[:, 3]  # the same magnitude, other sign, later: not the max
    special = np.zeros((32, 32))
    special[1, 0] = -0.0
    special[2] = -np.abs(rng.standard_normal(32))  # negative max
    special[3, :2] = [-3.0, 3.0]
    special[4, :2] = [3.0, -3.0]
    special[5:18] = rng.standard_normal((13, 32)) * 1e-4  # d = amax/127 or max/-8: an f16 subnormal
    special[18:32] = rng.standard_normal((14, 32)) * 1e-8  # d rounds to 0 in f16 (1/d from the f32 d)
    random = rng.standard_normal((160, 32)) * np.exp(rng.uniform(-12, 11, (160, 1)))
    return np.concatenate([ties8, ties4, special, random]).astype(np.float32)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_cache_blocks_are_ggml_bytes(ggml, kind):
    """The blocks the cache writes (d's two bytes, then the quants) are libggml's quantize_row_*_ref bytes of the same
    values, and the cache reads them back as gguf-py's dequantizer does."""
    blocks = _ggml_blocks(np.random.default_rng(0))
    B, T, K = 2, 64, GLM32.num_key_value_heads
    new = blocks.reshape(B, T, K, 32)  # one block per head entry (head_dim 32)
    lengths = jnp.asarray([3, 0], jnp.int32)  # rows write at different slots
    stack = kvcache.init_trunk_cache(GLM32, B, T + 3, kind, kind).k[1]  # MoE stack [2, B, S, K, 32]

    @jax.jit
    def write_read(stack):
        stack = kvcache.write_block(stack, 1, jnp.asarray(new), lengths)
        return stack, kvcache.read_layer(stack, 1, jnp.float32)

    stack, read = write_read(stack)
    ours = []
    for b, start in enumerate([3, 0]):
        d = np.asarray(stack.d[1, b, start: start + T]).view(np.uint8).reshape(T * K, 2)
        q = np.asarray(stack.q[1, b, start: start + T]).view(np.uint8).reshape(T * K, -1)
        ours.append(np.concatenate([d, q], axis=1))
    ours = np.concatenate(ours)
    want = ggml.ggml_quantize(blocks, GGML_TYPE[kind]).reshape(B * T * K, -1)
    np.testing.assert_array_equal(ours, want)
    deq = gguf_dequantize(want.reshape(-1), GGML_TYPE[kind]).reshape(B, T, K, 32)
    got = np.stack([np.asarray(read[b, s: s + T]) for b, s in enumerate([3, 0])])
    np.testing.assert_array_equal(got, deq)
    assert not np.asarray(stack.d[1, 0, :3]).any() and not np.asarray(stack.d[0]).any()  # nothing else written


def test_block_types_refuse_head_dims_they_do_not_divide():
    with pytest.raises(ValueError, match=r"q4_0 stores blocks of 32 values: a cache entry of 16 values"):
        kvcache.init_trunk_cache(load_config("glm4moe-tiny"), 1, 8, "q4_0")
    with pytest.raises(ValueError, match=r"q8_0 .* entry of 48 values"):  # MLA latent kv_lora 32 + rope 16
        kvcache.init_nextn_cache(load_config("deepseek2-tiny"), 1, 8, "q8_0")
    with pytest.raises(ValueError, match=r"KVTypes.v_draft: unknown KV cache type 'q5_0' \(allowed: f32, f16"):
        KVTypes(v_draft="q5_0")
    with pytest.raises(ValueError, match=r"V cache type \(q8_0\) must be unset or equal the K cache type \(q4_0\)"):
        kvcache.init_trunk_cache(DS64, 1, 8, "q4_0", "q8_0")


# ---- TurboQuant ------------------------------------------------------------------------------------------------


def test_wht_is_the_signed_orthonormal_sylvester_hadamard():
    h = np.array([[1.0]])
    for _ in range(7):
        h = np.block([[h, h], [h, -h]])  # Sylvester order: what the butterfly over pairs (j, j + 2^s) computes
    R = np.diag(kvquant._S2) @ h @ np.diag(kvquant._S1) / np.sqrt(128)
    rows = np.asarray(jax.jit(kvquant.wht)(np.eye(256, dtype=np.float32)))  # two groups: row i = R e_i
    np.testing.assert_allclose(rows[:128, :128], R.T, atol=1e-7)
    np.testing.assert_array_equal(rows[:128, 128:], 0)
    x = np.random.default_rng(1).standard_normal((64, 80)).astype(np.float32)  # padded to one group of 128
    y, back = jax.jit(lambda x: (y := kvquant.rotate(x), kvquant.unrotate(y, 80)))(x)
    assert y.shape == (64, 128)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=1), np.linalg.norm(x, axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)  # the round trip, unquantized


# the paper's TurboQuant_mse bound (√3·π/2)·4^-b for b = 2, 3; turbo4 uses the fork's 4-bit table, measured 0.018
MSE_BOUND = {"turbo2": 0.170, "turbo3": 0.0425, "turbo4": 0.02}


def _fork_bytes(idx: np.ndarray, kind: str) -> np.ndarray:
    """[n, 128] centroid indices -> [n, q bytes] as quantize_row_turbo{2,3,4}_0_ref packs them (its loops)."""
    if kind == "turbo4":
        qs = np.zeros((len(idx), 64), np.int64)
        for j in range(128):
            qs[:, j // 2] |= idx[:, j] << ((j % 2) * 4)
        return qs
    qs, signs = np.zeros((len(idx), 32), np.int64), np.zeros((len(idx), 16), np.int64)
    for j in range(128):
        qs[:, j // 4] |= (idx[:, j] & 3) << ((j % 4) * 2)
        signs[:, j // 8] |= ((idx[:, j] >> 2) & 1) << (j % 8)
    return qs if kind == "turbo2" else np.concatenate([qs, signs], axis=1)


@pytest.mark.parametrize("kind", kvquant.TURBO)
def test_turbo_round_trip_error_and_layout(kind):
    """Relative MSE of Gaussian vectors within the bound; the bytes are the fork's block layout of the indices
    chosen by nearest centroid (computed here in float64 with the explicit rotation matrix), the f16 norm is
    ||x|| / ||c[idx]||; a head of 80 values is zero-padded to one group."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2048, 128)).astype(np.float32)
    x[:, :4] *= 10  # outlier channels: the rotation spreads them
    q, d = jax.jit(lambda a: kvquant.quantize(kind, a))(x)
    back = np.asarray(jax.jit(lambda q, d: kvquant.wht_inverse(kvquant.dequantize(kind, q, d)))(q, d))
    assert (((back - x) ** 2).sum(1) / (x**2).sum(1)).mean() < MSE_BOUND[kind]

    h = np.array([[1.0]])
    for _ in range(7):
        h = np.block([[h, h], [h, -h]])
    y = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True) @ (
        np.diag(kvquant._S2) @ h @ np.diag(kvquant._S1) / np.sqrt(128)).T
    centroids = np.asarray(kvquant._CENTROIDS[kind])
    idx = np.abs(y[..., None] - centroids).argmin(-1)
    # groups with no rotated value within float noise of a decision threshold (the fork's rounded midpoints)
    clear = (np.abs(y[..., None] - np.asarray(kvquant._THRESHOLDS[kind])).min(-1) > 1e-6).all(1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(q)[clear], _fork_bytes(idx, kind)[clear])
    norm = np.linalg.norm(x, axis=1) / np.linalg.norm(centroids[idx], axis=1)
    np.testing.assert_allclose(np.asarray(d)[clear, 0].astype(np.float64), norm[clear], rtol=2**-10)

    # a head of 80 values: zero-padded to one group, one norm and one group of indices per head
    stack = kvcache.init_trunk_cache(load_config("glm4moe-tiny").replace(head_dim=80), 1, 64, kind).k[0]
    assert stack.shape == (1, 1, 64, 2, 80) and stack.d.shape[-1] == 1
    assert stack.q.shape[-1] == {"turbo2": 32, "turbo3": 48, "turbo4": 64}[kind]
    entries = rng.standard_normal((1, 64, 2, 80)).astype(np.float32)

    @jax.jit
    def write_read(stack, new):
        stack = kvcache.write_block(stack, 0, new, jnp.zeros((1,), jnp.int32))
        return kvquant.unrotate(kvcache.read_layer(stack, 0, jnp.float32), 80)

    back = np.asarray(write_read(stack, entries))
    assert (((back - entries) ** 2).sum(-1) / (entries**2).sum(-1)).mean() < MSE_BOUND[kind]


@pytest.mark.parametrize("cfg", [GLM32, DS64], ids=["glm4moe", "deepseek2"])
def test_turbo4_attention_stays_close_to_f32(cfg):
    """GQA (head_dim 32 padded to 128) and MLA (latent 64 padded to 128, V = its first 48 values): queries rotated,
    outputs rotated back; the attention output within 20 % (relative L2) of the f32 cache's (measured 10 %). A
    missing rotation of either side gives ~100 %."""
    mla = cfg is DS64
    p = drafting_params(cfg, 0.08, 0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, cfg.hidden_size)), jnp.float32)
    pos, mask = jnp.broadcast_to(jnp.arange(24), (2, 24)), jnp.ones((2, 24), bool)
    attend = layers.mla_attention if mla else layers.attention
    run = jax.jit(lambda c: attend(x, p.dense_layers.attn, pos, cfg, mask, (c.k[0], c.v[0], 0), c.lengths, li=0)[0])
    ref = np.asarray(run(kvcache.init_trunk_cache(cfg, 2, 32)))
    out = np.asarray(run(kvcache.init_trunk_cache(cfg, 2, 32, "turbo4", None if mla else "turbo4")))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.2


# ---- the loops ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GLM32, DS64], ids=["glm4moe", "deepseek2"])
def test_q4_0_mtp_cache_beside_f16_trunk_rolls_back_and_stays_lossless(cfg):
    """Greedy MTP == plain greedy with the same cache types; after the loop the trunk cache's valid slots equal a
    fresh prefill of the same tokens (f16: to float noise between a verify and a prefill) and the head's q4_0
    cache's valid slots are the fresh head prefill's bytes."""
    mla = cfg is DS64
    params = drafting_params(cfg, 0.08, 0)
    types = KVTypes("f16", None if mla else "f16", "q4_0", None if mla else "q4_0")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    K = 2
    res = speculative.generate(params, cfg, prompts, num_draft=K, max_new_tokens=14, eos_ids=[], cache_types=types,
                               return_cache=True)
    assert res.tokens == plain.generate(params, cfg, prompts, max_new_tokens=14, eos_ids=[], cache_types=types).tokens
    hist = res.stats["accept_hist"]
    assert hist[0] > 0 and hist[K] > 0  # rejections (rollbacks) and full acceptance happened
    trunk, head = res.stats["cache"], res.stats["draft_cache"]
    assert isinstance(head.k[0], kvcache.QuantStack) and trunk.k[0].dtype == jnp.float16

    seqs = [p + out[:-1] for p, out in zip(prompts, res.tokens)]  # the newest token is emitted, not yet cached
    tokens, lens = M.pad_prompts(seqs, cfg)
    np.testing.assert_array_equal(np.asarray(trunk.lengths), lens)
    dr = drafter.of(cfg)

    @jax.jit
    def prefill(tokens, n_valid):  # trunk and head caches of the final sequences, as fresh prefills
        fresh = kvcache.init_trunk_cache(cfg, len(seqs), trunk.size, types.k, types.v)
        h, _, fresh, _ = M.forward(params, tokens, fresh, cfg, n_valid=n_valid, logits="none")
        head = dr.init_cache(len(seqs), trunk.size, types.k_draft, types.v_draft)
        return fresh, dr.prefill(params, head, h, tokens, n_valid)

    fresh, fresh_head = prefill(jnp.asarray(tokens), jnp.asarray(lens))
    for b, L in enumerate(lens):
        for ours, ref in zip(jax.tree.leaves((trunk.k, trunk.v)), jax.tree.leaves((fresh.k, fresh.v))):
            np.testing.assert_allclose(np.asarray(ours[:, b, :L], np.float32), np.asarray(ref[:, b, :L], np.float32),
                                       rtol=2e-3, atol=1e-4)
        m = int(head.lengths[b])  # the head caught up to the last pair it was fed
        assert L - K <= m <= L
        for ours, ref in zip(jax.tree.leaves((head.k, head.v)), jax.tree.leaves((fresh_head.k, fresh_head.v))):
            np.testing.assert_array_equal(np.asarray(ours[:, b, :m]), np.asarray(ref[:, b, :m]))


def test_device_bytes_of_quantized_caches():
    """nbytes of the caches' arrays: q4_0 = 18/64 = 0.28x and q8_0 = 34/64 = 0.53x of f16 (GQA and the MLA latent);
    turbo4 66/256 of f16 at head_dim 128. The quantized leaves shard like a plain stack (rows on data, heads on
    model) and plan.abstract_cache counts them."""
    ds = DS64

    def nbytes(cfg, kind):
        cache = kvcache.init_trunk_cache(cfg, 2, 64, kind, None if cfg is ds else kind)
        return sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v)))

    for cfg in (GLM32, ds):
        f16 = nbytes(cfg, "f16")
        assert nbytes(cfg, "q4_0") / f16 == 0.28125 and nbytes(cfg, "q8_0") / f16 == 0.53125
        assert nbytes(cfg, "f32") == 2 * f16 == 2 * nbytes(cfg, "bf16")
        dim = cfg.cache_dims()[0][1]  # 32 (GQA head) or 64 (MLA latent): turbo pads an entry to 128 values
        for kind in kvquant.TYPES:
            assert nbytes(cfg, kind) == f16 // 2 * kvquant.stored_dim(kind, dim) // dim * kvquant.bytes_per_value(kind)
    glm128 = GLM32.replace(head_dim=128)
    assert nbytes(glm128, "turbo4") / nbytes(glm128, "f16") == 66 / 256

    mesh = sharding.make_mesh(data=2, model=2)
    placed = sharding.place_rows(kvcache.init_trunk_cache(GLM32, 2, 64, "q4_0", "turbo3"), mesh)
    for leaf in jax.tree.leaves((placed.k, placed.v)):
        assert isinstance(leaf.sharding, NamedSharding) and tuple(leaf.sharding.spec)[:4] == (None, "data", None,
                                                                                              "model")
    big = load_config("glm-4.5")
    one = sharding.make_mesh()
    _, f16 = plan.abstract_cache(jax.eval_shape(lambda: kvcache.init_trunk_cache(big, 1, 4096, "f16", "f16")), one)
    _, q4 = plan.abstract_cache(jax.eval_shape(lambda: kvcache.init_trunk_cache(big, 1, 4096, "q4_0", "q4_0")), one)
    assert (q4 - 4) / (f16 - 4) == 0.28125  # abstract_cache counts the row lengths too (int32 [1])


# ---- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_generate_with_quantized_caches_on_the_embedded_model(capsys, monkeypatch):
    assert cli.EMBEDDED_MODEL.exists()
    seen, run = [], speculative.generate
    monkeypatch.setattr(speculative, "generate", lambda *a, **kw: seen.append(kw["cache_types"]) or run(*a, **kw))
    args = ["generate", "-ctk", "q8_0", "-ctv", "q4_0", "-ctkd", "q4_0", "-K", "2", "--max-new-tokens", "4",
            "--repeats", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "MTP speculative, K=2" in out and "tok/s" in out
    assert seen == [KVTypes("q8_0", "q4_0", "q4_0", None)] * 2  # the warm-up call and the timed one


def test_cli_bad_cache_type_is_one_line(capsys):
    assert cli.main(["generate", "-ctvd", "q5_0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--cache-type-v-draft: unknown KV cache type 'q5_0' (allowed: " + ", ".join(kvquant.TYPES) + ")" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert all(t in help_text for t in kvquant.TYPES)  # the jax-free help names every type
