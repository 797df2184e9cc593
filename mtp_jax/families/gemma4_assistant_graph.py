"""The Gemma-4 MTP assistant's graph, its drafter, and the readers of its weights (the description, conventions and
llama.cpp references are in families/gemma4_assistant.py): query-only layers over the target's cache, the
centroid shortlist head, every draft at the newest token's position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import params as P
from mtp_jax.families.gemma4 import Gemma4Config, Gemma4Params
from mtp_jax.families.gemma4_assistant import (ARCH, HF_NAMES, TOP, Gemma4AssistantConfig, Gemma4AssistantParams,
                                               Tensor, assistant_abstract, assistant_config_from_hf, assistant_stacks,
                                               check_tensors, config_from_gguf, slot_leaf, slot_shape, tensor_slots)
from mtp_jax.families.gemma4_graph import attend_cache, cache_slot, forward, init_cache, rope_pairs
from mtp_jax.io.gguf_model import Metadata
from mtp_jax.io.validate import check_finite as finite
from mtp_jax.io.validate import open_reader
from mtp_jax.kvcache import KVCache
from mtp_jax.layers import at, mlp, rms_norm, sum_squares
from mtp_jax.linear import compute_dtype, linear
from mtp_jax.model import valid_mask
from mtp_jax.params import ArrayInfo
from mtp_jax.pytree import pytree_dataclass


# ---- forward -------------------------------------------------------------------------------------------------


def _masked_logits(h: jax.Array, ap: Gemma4AssistantParams, acfg: Gemma4AssistantConfig) -> jax.Array:
    """The centroid shortlist head (HF Gemma4AssistantMaskedEmbedder): the top-k centroids of h pick k clusters of
    V / C token ids (``ordering`` viewed [C, V / C]); those ids get their lm-head logits, every other id the smallest
    of them over the whole batch minus 1. h [B, T, Da] -> [B, T, V] float32."""
    B, T, _ = h.shape
    C, K, V = acfg.num_centroids, acfg.centroid_top_k, acfg.vocab_size
    hf = h.astype(jnp.float32)
    _, top = jax.lax.top_k(linear(hf, ap.centroids), K)  # [B, T, K]
    ids = ap.ordering.astype(jnp.int32).reshape(C, V // C)[top].reshape(B, T, K * (V // C))
    sel = jnp.einsum("btd,btnd->btn", hf, ap.embed[ids].astype(jnp.float32))
    out = jnp.full((B, T, V), sel.min() - 1.0, jnp.float32)
    return out.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], ids].set(sel)


def assistant_forward(params: Gemma4Params, h, tokens, trunk: KVCache, positions, cfg: Gemma4Config,
                      collect_stats: bool = False, mask=None):
    """The assistant on pairs (h_{p-1}, t_p) at positions p: h [B, T, Db] the target's final-normed hidden (or the
    previous draft step's next hidden), tokens [B, T], positions [B, T]. Each query reads the target's cached
    entries at positions < p (its sliding layers only the newest ones, ``swa_keys``), writes nothing.
    -> (next hidden [B, T, Db], logits [B, T, V] float32, stats)."""
    ap, acfg = params.nextn, cfg.assistant
    B, T = tokens.shape
    eps = acfg.rms_norm_eps
    mask = jnp.ones((B, T), bool) if mask is None else mask
    dt = compute_dtype(cfg.dtype)
    e = params.embed[tokens].astype(dt) * jnp.asarray(cfg.hidden_size ** 0.5, dt)  # the target's scaled embedding
    eh = jnp.concatenate([e, h.astype(dt)], axis=-1)  # [B, T, 2 Db]
    x = linear(eh, ap.pre_proj)
    stats: dict[str, Any] = {}
    where = {i: (attr, j) for attr, ids in assistant_stacks(acfg) for j, i in enumerate(ids)}
    key_pos = jnp.arange(trunk.size)[None, None, :]
    query_pos = positions[:, :, None]
    for i in range(acfg.num_hidden_layers):
        attr, j = where[i]
        lp, swa = getattr(ap, attr), acfg.is_swa(i)
        c, ci = cache_slot(cfg, cfg.last_with_kv(swa))
        xn = rms_norm(x, at(lp.attn_norm, j), eps)
        N, H = lp.attn.wq.shape[-2:]
        q = linear(xn, lp.attn.wq.reshape(*lp.attn.wq.shape[:-2], -1), j).reshape(B, T, N, H)
        q = rope_pairs(rms_norm(q, at(lp.attn.q_norm, j), eps), positions, acfg.rope_freqs(swa))
        visible = key_pos < query_pos
        if swa:
            n_keys = acfg.sliding_window - 1 if acfg.swa_keys == "llama.cpp" else acfg.sliding_window + 1
            visible &= key_pos >= query_pos - n_keys
        o = attend_cache(q, trunk.k[c], trunk.v[c], ci, visible).reshape(B, T, N * H)
        a = linear(o, lp.attn.wo.reshape(*lp.attn.wo.shape[:-3], N * H, -1), j)
        x = x + rms_norm(a, at(lp.attn_post_norm, j), eps)
        f, f_stats = mlp(rms_norm(x, at(lp.ffn_norm, j), eps), lp.mlp, mask, collect_stats, prefix="mlp.", li=j,
                         act="gelu")
        if collect_stats:
            st = {"attn.wq": sum_squares(xn, mask), "attn.wo": sum_squares(o, mask)} | f_stats
            stats.setdefault(attr, []).append(st)
        x = (x + rms_norm(f, at(lp.ffn_post_norm, j), eps)) * at(lp.out_scale, j).astype(x.dtype)
    hn = rms_norm(x, ap.final_norm, eps)
    if acfg.use_ordered_embeddings:
        logits = _masked_logits(hn, ap, acfg)
    else:
        logits = linear(hn.astype(jnp.float32), ap.embed, trans=True)
    nxt = linear(hn, ap.post_proj)
    if collect_stats:
        stats = {a: jax.tree.map(lambda *xs: jnp.stack(xs), *v) for a, v in stats.items()}
        top = {"pre_proj": sum_squares(eh, mask), "post_proj": sum_squares(hn, mask), "embed": sum_squares(hn, mask)}
        if acfg.use_ordered_embeddings:
            top["centroids"] = sum_squares(hn, mask)
        stats["top"] = top
    return nxt, logits, stats


@pytree_dataclass
class AssistantState:
    """The assistant owns no cache; the loop still carries a drafter state (lengths, for the interface)."""

    lengths: Any  # [B] int32, unused by the assistant

    def with_lengths(self, lengths) -> "AssistantState":
        return AssistantState(lengths.astype(jnp.int32))


@dataclass(frozen=True)
class Assistant:
    """The Gemma-4 assistant as a drafter (drafter.py's protocol): every draft step of a speculative step runs the
    assistant at the same position p (the newest token's, not cached yet) over the target's cache, which it reads
    and never writes: step 1 on (h_{p-1}, t_p) with the target's final-normed hidden, step i + 1 on (its step i
    next hidden, d_i) (llama.cpp common/speculative.cpp, transformers SinglePositionMultiTokenCandidateGenerator).
    Nothing rolls back."""

    cfg: Any
    num_draft: int | None = None

    @property
    def max_drafts(self) -> int | None:
        return None

    def init_cache(self, batch: int, size: int, k_type: str | None = None, v_type: str | None = None):
        return AssistantState(jnp.zeros((batch,), jnp.int32))

    def prefill(self, params, state, h, tokens, n_valid, trunk=None):
        return state

    def _run(self, params, h, token, trunk):
        nxt, logits, _ = assistant_forward(params, h, token[:, None], trunk, trunk.lengths[:, None], self.cfg)
        return nxt, logits

    def catch_up(self, params, state, pend_h, pend_tok, n_pend, trunk=None):
        from mtp_jax.model import take_last

        h = take_last(pend_h, n_pend)  # [B, 1, Db] h_{p-1}
        tok = take_last(pend_tok[..., None], n_pend)[:, 0, 0]  # [B] t_p
        nxt, logits = self._run(params, h, tok, trunk)
        return nxt, logits, state

    def step(self, params, state, g, token, i, trunk=None):
        nxt, logits = self._run(params, g, token, trunk)
        return nxt, logits, state

    def commit(self, state, before):
        return state

    def keep(self, new, old, rows):
        return new

    def teacher_forced(self, params, h, tokens, n_valid, collect_stats: bool = False):
        """The assistant on every pair (h_{j-1}, t_j) of known text, each query at j over the target's entries < j
        (a trunk forward over the text fills them) -> [(logits [B, T, V] predicting t_{j+1}, stats)]."""
        from mtp_jax.mtp import shift_hidden

        B, T = tokens.shape
        cache = init_cache(self.cfg, B, T)
        _, _, cache, _ = forward(params, tokens, cache, self.cfg, n_valid, logits="none")
        _, logits, stats = assistant_forward(params, shift_hidden(h), tokens, cache, jnp.broadcast_to(
            jnp.arange(T)[None, :], (B, T)), self.cfg, collect_stats, valid_mask(T, n_valid))
        return [(logits, stats)]


# ---- its weights ---------------------------------------------------------------------------------------------


def read_assistant_gguf(path, target: Gemma4Config, dtype: str | None = None, check_finite: bool = True):
    """A gemma4-assistant GGUF for ``target`` -> (target config with the assistant, assistant params). Keys and
    tensors are checked first (config_from_gguf, check_tensors: GGUFError naming the file and the key or tensor);
    any type gguf-py dequantizes is read."""
    meta = Metadata(open_reader(path), path, ARCH)
    cfg = config_from_gguf(meta, target)
    acfg, dtype = cfg.assistant, dtype or target.dtype
    check_tensors(meta, acfg)
    V = acfg.vocab_size

    def fetch(name: str, t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
        g = meta.tensors[name]
        if t.path == ("ordering",):
            y = np.asarray(g.data, np.int32).reshape(-1)
            if not np.array_equal(np.sort(y), np.arange(V)):
                raise meta.error(f"tensor {name} is not a permutation of the {V} token ids")
            return y
        y = gguf.quants.dequantize(g.data, g.tensor_type).reshape(t.spec().gguf_shape(shape))
        if check_finite:
            finite(np.asarray(y, np.float32), name, path)
        return t.spec().from_gguf(np.ascontiguousarray(y, np.float32), shape).astype(dtype)

    return cfg, _assemble(acfg, fetch)


def _assemble(acfg: Gemma4AssistantConfig, fetch) -> Gemma4AssistantParams:
    """The assistant's params, each tensor from ``fetch(name, tensor, shape)`` (our layout; a stacked layer's
    shape without its layer axis)."""
    template = assistant_abstract(acfg)
    leaves: dict = {}
    for name, t, attr, j in tensor_slots(acfg, template):
        x = fetch(name, t, slot_shape(template, attr, t, j))
        if j is None:
            leaves[(None, t.path)] = x
        else:
            leaves.setdefault((attr, t.path), np.empty(slot_leaf(template, attr, t).shape, x.dtype))[j] = x
    out = {attr: None if getattr(template, attr) is None else
           _fill(getattr(template, attr), {p: v for (a, p), v in leaves.items() if a == attr})
           for attr in ("swa_layers", "full_layers")}
    top = {t.path[0]: jnp.asarray(leaves[(None, t.path)]) if (None, t.path) in leaves else None for t in TOP}
    return Gemma4AssistantParams(**top, **out)


def _fill(template, by_path: dict) -> Any:
    """A stacked layer template with its leaves from ``by_path`` (path tuple -> array)."""

    def walk(obj, prefix):
        if obj is None or isinstance(obj, ArrayInfo):
            return None if obj is None else jnp.asarray(by_path[prefix])
        return dataclasses.replace(obj, **{f.name: walk(getattr(obj, f.name), (*prefix, f.name))
                                           for f in dataclasses.fields(obj)})

    return walk(template, ())


def assistant_from_hf(sd: dict, acfg: Gemma4AssistantConfig, dtype: str = "float32") -> Gemma4AssistantParams:
    """An HF assistant state dict -> our params (KeyError naming a missing tensor)."""
    where = {name: (attr, j) for name, _, attr, j in tensor_slots(acfg, assistant_abstract(acfg))}

    def fetch(name: str, t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
        attr, j = where[name]
        key = HF_NAMES[".".join(t.path)]
        hf = key if attr is None else f"model.layers.{_layer_id(acfg, attr, j)}.{key}"
        if hf not in sd:
            raise KeyError(f"missing tensor {hf}")
        y = np.asarray(sd[hf])
        if t.path == ("ordering",):
            return y.astype(np.int32)
        return t.spec().from_gguf(np.ascontiguousarray(y, np.float32), shape).astype(dtype)

    return _assemble(acfg, fetch)


def _layer_id(acfg: Gemma4AssistantConfig, attr: str, j: int) -> int:
    return dict(assistant_stacks(acfg))[attr][j]


def read_head(path, target: Gemma4Config, dtype: str | None = None, check_finite: bool = True):
    """The assistant from a gemma4-assistant GGUF or an HF ``Gemma4AssistantForCausalLM`` directory (config.json +
    *.safetensors; transformers' window, ``swa_keys="transformers"``) -> (target config with it, its params)."""
    import json
    from pathlib import Path

    from mtp_jax.io.hf import HFError, _Safetensors

    path = Path(path)
    if not path.is_dir():
        return read_assistant_gguf(path, target, dtype, check_finite)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: no readable config.json ({e})") from None
    if hf.get("model_type") != "gemma4_assistant":
        raise HFError(f"{path}: model_type {hf.get('model_type')!r} is not gemma4_assistant")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFError(f"{path}: no *.safetensors files")
    try:
        acfg = assistant_config_from_hf(hf, target)
        cfg = target.replace(assistant=acfg)
        ap = assistant_from_hf(_Safetensors(files), acfg, dtype or target.dtype)
    except (KeyError, ValueError) as e:
        raise HFError(f"{path}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    return cfg, ap


def drafting_params(cfg: Gemma4Config, accept: float = 0.6, seed: int = 0, alpha: float = 24.0, mix: float = 0.0,
                    dtype: str = "float32"):
    """A target + assistant pair whose drafts agree with the trunk at a chosen rate, by construction (tests,
    benchmarks; synthetic.constructed_params' idea): the trunk's greedy continuation is a random permutation
    t -> pi(t) (quiet blocks: post norms at 0.05; lm_head column pi(t) = alpha E[t] / D), and the assistant drafts
    pi'(t) from its input token t, pi' = pi on a random fraction ``accept`` of the tokens: E's rows lie in the span
    of Q [D, Da] (orthonormal columns), pre_proj passes the target embedding through Q, the assistant's tied table
    maps E[t] Q to pi'(t). With ordered embeddings each centroid is the mean table row of its cluster (a
    k-means-like shortlist). ``mix``: the gain of a random hidden half of pre_proj, so that drafts also depend on
    the hidden the assistant is handed (tests telling llama.cpp's semantics from near misses). -> (cfg with an
    untied head, params)."""
    from mtp_jax.synthetic import _head

    cfg = cfg.replace(tie_word_embeddings=False, dtype=dtype)
    rng = np.random.default_rng(seed)
    D, V, Da = cfg.hidden_size, cfg.vocab_size, cfg.assistant.hidden_size
    p = P.init(jax.random.key(seed), cfg, std=0.02)
    quiet = ("attn_post_norm", "ffn_post_norm", "ple_norm")
    p = jax.tree_util.tree_map_with_path(lambda kp, x: x * 0.05 if kp[-1].name in quiet else x, p)
    Q = np.linalg.qr(rng.standard_normal((D, Da)))[0].astype(np.float32)
    e = rng.standard_normal((V, Da)).astype(np.float32)
    e *= np.sqrt(D) / np.linalg.norm(e, axis=1, keepdims=True)  # rows of norm sqrt(D): E rows rms 1
    E = e @ Q.T
    pi = rng.permutation(V)
    other = (pi + 1 + rng.integers(0, V - 1, V)) % V  # != pi(t)
    pi_head = np.where(rng.random(V) < accept, pi, other)
    pre = np.concatenate([Q / np.sqrt(D), mix * rng.standard_normal((D, Da)).astype(np.float32) / np.sqrt(D)])
    table = _head(e, pi_head, alpha).T  # [V, Da]
    a = dataclasses.replace(p.nextn, pre_proj=jnp.asarray(pre, dtype), embed=jnp.asarray(table, dtype))
    if cfg.assistant.use_ordered_embeddings:
        C = cfg.assistant.num_centroids
        clusters = np.asarray(a.ordering).reshape(C, V // C)
        a = dataclasses.replace(a, centroids=jnp.asarray(table[clusters].mean(1).T, dtype))
    return cfg, dataclasses.replace(p, embed=jnp.asarray(E, dtype), lm_head=jnp.asarray(_head(E, pi, alpha), dtype),
                                    nextn=a)
