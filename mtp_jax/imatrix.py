"""MTP-aware importance matrices: statistics as auxiliary outputs of the trunk and NextN forwards.

What llama-imatrix records (tools/imatrix/imatrix.cpp ``collect_imatrix``, llama.cpp tree of
llama-cpp-python 0.3.36): for every ``MUL_MAT`` whose weight is named ``blk.*`` (and ``output.weight`` with
``--process-output``), the sum over tokens of x^2 per input column and the token count; for every
``MUL_MAT_ID`` (routed experts) the same per expert, counting only the tokens routed to it. It runs the trunk
only, so the NextN block ``blk.{n_layer}.*`` gets nothing. Here the head is driven exactly as while drafting
(the family's drafter on the teacher-forced pairs (h_{j-1}, t_j) of each chunk) and its tensors get entries
under their GGUF names. ``nextn.embed_tokens`` is a row lookup (no statistics can exist), yet llama-quantize
demands an entry for it at IQ1/IQ2/Q2_K_S: a *neutral* entry (counts 0 = uniform importance) is written
for such lookups unless disabled, and recorded in the metadata.

Chunking follows llama-imatrix: the text is tokenized once, cut into chunks of ``chunk_size`` tokens (a
partial tail is dropped; at least 2 chunks are needed), the first token of each chunk becomes BOS when the
tokenizer adds one, and the perplexity printed is over the second half of each chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import drafter, families
from mtp_jax.config import ModelConfig
from mtp_jax.io import tree
from mtp_jax.io.imatrix_gguf import ImatrixData
from mtp_jax.io import table
from mtp_jax.io.table import plan
from mtp_jax.model import forward
from mtp_jax.params import Params

log = logging.getLogger(__name__)

KEY_MTP = "mtp_jax.mtp"  # metadata: statistics include the NextN head
KEY_NEUTRAL = "mtp_jax.neutral_lookups"  # metadata: names given a neutral (count 0) entry


@partial(jax.jit, static_argnames=("cfg", "mtp"))
def chunk_stats(params: Params, tokens: jax.Array, n_valid: jax.Array, cfg: ModelConfig, mtp: bool):
    """One batch of chunks [B, T] (rows with n_valid 0 are padding and add nothing)
    -> (stats tree, trunk nll [B, T-1], first head's nll [B, T-2] or None).

    stats: {"dense_layers"|"moe_layers": {leaf key: {"sum2": [L, C] | [L, E, C], "count": [L] | [L, E]}},
            "top": {"lm_head": ...}, "nextn": ({leaf key: ...}, ...)}; leaf keys as layers.py gives them.
    The heads are driven by the family's drafter on the teacher-forced pairs, as while drafting.
    """
    h, logits, _, stats = forward(params, tokens, None, cfg, n_valid=n_valid, collect_stats=True)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    mtp_nll = None
    if mtp:
        heads = drafter.of(cfg).teacher_forced(params, h, tokens, n_valid, collect_stats=True)
        lg = heads[0][0]  # pair (h_{j-1}, t_j) predicts t_{j+1}; position 0 has no real h
        lp = jax.nn.log_softmax(lg[:, 1:-1], axis=-1)
        mtp_nll = -jnp.take_along_axis(lp, tokens[:, 2:, None], axis=-1)[..., 0]
        stats["nextn"] = tuple(st for _, st in heads)
    return stats, nll, mtp_nll


def _entry(sum2: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (in_sum2 [n_mat, C], counts [n_mat]) in float64 for accumulation."""
    s = np.asarray(sum2, np.float64)
    c = np.asarray(count, np.float64)
    return (s[None], c.reshape(1)) if s.ndim == 1 else (s, c)


def tensor_names(params: Params, cfg: ModelConfig) -> dict[tuple, str]:
    """Where each statistic goes, from the family's tensor table: (stack, leaf key, layer) for the trunk's
    stacks, ("nextn", head, leaf key) for the heads, ("top", leaf key) outside the blocks -> GGUF name."""
    names: dict[tuple, str] = {}
    for slot in plan(cfg, tree.template_of(cfg, params)):
        leaf = slot.leaf
        if leaf[0] == "nextn":
            rest = leaf[3:] if leaf[2] == "layer" else leaf[2:]
            names[("nextn", leaf[1], ".".join(rest))] = slot.name
        elif slot.index is not None:
            names[(leaf[0], ".".join(leaf[1:]), slot.index)] = slot.name
        else:
            names[("top", ".".join(leaf))] = slot.name
    return names


def stats_to_entries(stats, params: Params, cfg: ModelConfig, process_output: bool = False) -> dict:
    """Stats tree -> {GGUF weight name: (in_sum2 [n_mat, C], counts [n_mat])}. Only ``blk.*`` weights get entries,
    and the output matrix with ``process_output`` (llama-imatrix's filter); a head without its own
    shared_head_head feeds the trunk's output matrix."""
    names = tensor_names(params, cfg)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(name: str | None, e: tuple[np.ndarray, np.ndarray]) -> None:
        if name is None or not (name.startswith("blk.") or (process_output and name == "output.weight")):
            return
        if name in out:  # output.weight fed by both trunk and head
            e = (out[name][0] + e[0], out[name][1] + e[1])
        out[name] = e

    for stack, _, _ in table.stacks(cfg):
        for key, st in stats.get(stack, {}).items():
            for j in range(np.asarray(st["sum2"]).shape[0]):
                add(names.get((stack, key, j)), _entry(st["sum2"][j], st["count"][j]))
    for key, st in stats.get("top", {}).items():
        add(names.get(("top", key)), _entry(st["sum2"], st["count"]))
    for n, head in enumerate(stats.get("nextn", ()) if isinstance(params.nextn, tuple) else ()):
        for key, st in head.items():
            name = names.get(("nextn", n, key))
            if name is None and key == "shared_head_head":
                name = names.get(("top", "lm_head"))
            add(name, _entry(st["sum2"], st["count"]))
    return out


def lookup_tensors(params: Params, cfg: ModelConfig) -> dict[str, int]:
    """Row-lookup weights of the NextN blocks that llama-quantize still asks an imatrix for: name -> row length."""
    return {slot.name: cfg.hidden_size for slot in plan(cfg, tree.template_of(cfg, params))
            if slot.leaf[0] == "nextn" and slot.spec.table}


@dataclass
class Collector:
    """Accumulates entries over chunks (float64 on the host) and reports per-chunk perplexity."""

    params: Params
    cfg: ModelConfig
    mtp: bool = True
    process_output: bool = False
    batch: int = 1  # chunks per forward; every call has this shape (one compile)
    sums: dict = field(default_factory=dict)
    head_sums: dict = field(default_factory=dict)  # a drafter with a file of its own (Gemma-4's assistant): its entries
    chunks: int = 0
    nll_sum: float = 0.0
    nll_count: int = 0
    mtp_nll_sum: float = 0.0
    mtp_count: int = 0

    def __post_init__(self):
        if self.mtp and (self.params.nextn is None or not self.cfg.has_mtp):
            log.warning("the model has no NextN layer: collecting trunk statistics only")
            self.mtp = False

    def add(self, tokens: np.ndarray) -> list[float]:
        """tokens [n, T] (full chunks), run ``batch`` at a time. Returns each chunk's perplexity over its second
        half (llama-imatrix scores tokens T/2+1 .. T-1)."""
        return sum((self._add_batch(tokens[i: i + self.batch]) for i in range(0, len(tokens), self.batch)), [])

    def _add_batch(self, tokens: np.ndarray) -> list[float]:
        n, T = tokens.shape
        padded = np.zeros((self.batch, T), np.int32)
        padded[:n] = tokens
        n_valid = np.where(np.arange(self.batch) < n, T, 0).astype(np.int32)
        stats, nll, mtp_nll = chunk_stats(self.params, jnp.asarray(padded), jnp.asarray(n_valid), self.cfg, self.mtp)
        stats = jax.device_get(stats)
        _accumulate(self.sums, stats_to_entries(stats, self.params, self.cfg, self.process_output))
        head_imatrix = families.of(self.cfg).head_imatrix
        if self.mtp and head_imatrix is not None:
            _accumulate(self.head_sums, head_imatrix(stats["nextn"][0], self.params, self.cfg))
        half = np.asarray(nll, np.float64)[:n, T // 2:]
        self.nll_sum += float(half.sum())
        self.nll_count += half.size
        if mtp_nll is not None:
            self.mtp_nll_sum += float(np.asarray(mtp_nll, np.float64)[:n].sum())
            self.mtp_count += int(np.asarray(mtp_nll)[:n].size)
        self.chunks += n
        return np.exp(half.mean(axis=1)).tolist()

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll_sum / max(self.nll_count, 1)))

    @property
    def mtp_perplexity(self) -> float | None:
        """The NextN head's perplexity at predicting t_{j+1} from (h_{j-1}, t_j), over whole chunks."""
        return float(np.exp(self.mtp_nll_sum / self.mtp_count)) if self.mtp_count else None

    def head_result(self, chunk_size: int, datasets: list[str]) -> ImatrixData | None:
        """The drafter's own imatrix, for a drafter that is a file of its own (None otherwise)."""
        if not self.head_sums:
            return None
        in_sum2, counts = _as_float32(self.head_sums)
        return ImatrixData(in_sum2, counts, datasets=list(datasets), chunk_count=self.chunks, chunk_size=chunk_size,
                           metadata={KEY_MTP: True})

    def result(self, chunk_size: int, datasets: list[str], neutral_lookups: bool = True) -> ImatrixData:
        in_sum2, counts = _as_float32(self.sums)
        meta = {KEY_MTP: bool(self.mtp)}
        if neutral_lookups and self.mtp:
            names = []
            for name, cols in lookup_tensors(self.params, self.cfg).items():
                in_sum2[name] = np.zeros((1, cols), np.float32)
                counts[name] = np.zeros((1,), np.float32)
                names.append(name)
                log.info("neutral imatrix entry (counts 0: uniform importance) for row-lookup tensor %s", name)
            if names:
                meta[KEY_NEUTRAL] = names
        return ImatrixData(in_sum2, counts, datasets=list(datasets), chunk_count=self.chunks, chunk_size=chunk_size,
                           metadata=meta)


def _as_float32(sums: dict) -> tuple[dict, dict]:
    """{name: (in_sum2, counts)} accumulated in float64 -> ({name: in_sum2}, {name: counts}) in float32."""
    return ({k: v[0].astype(np.float32) for k, v in sums.items()},
            {k: v[1].astype(np.float32) for k, v in sums.items()})


def _accumulate(into: dict, entries: dict) -> None:
    for name, (s, c) in entries.items():
        if name in into:
            s0, c0 = into[name]
            s, c = s0 + s, c0 + c
        into[name] = (s, c)


def make_chunks(tokens: np.ndarray, chunk_size: int, bos_id: int | None, max_chunks: int | None = None) -> np.ndarray:
    """Token ids -> [n_chunks, chunk_size] as llama-imatrix cuts them (BOS over the first token when set);
    max_chunks: None or negative = all."""
    tokens = np.asarray(tokens, np.int32)
    if chunk_size < 3:
        raise ValueError(f"--chunk-size {chunk_size}: a chunk needs at least 3 tokens")
    if max_chunks == 0:
        raise ValueError("--chunks 0: no chunk to compute (>= 1, or negative for all)")
    if tokens.size < 2 * chunk_size:
        raise ValueError(f"the text has {tokens.size} tokens; at least 2 chunks of {chunk_size} "
                         f"({2 * chunk_size} tokens) are needed (use a longer text or a smaller --chunk-size)")
    n = tokens.size // chunk_size
    if max_chunks is not None and max_chunks > 0:
        n = min(n, max_chunks)
    chunks = tokens[: n * chunk_size].reshape(n, chunk_size).copy()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks
