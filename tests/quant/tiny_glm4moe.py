"""A tiny glm4moe GGUF with a NextN/MTP layer (random weights), and access to the built llama.cpp tools.

Written by mtp_jax.io.gguf.write_gguf with tiny_bpe's vocabulary; the NextN block carries all six nextn tensors.
Every row size is a multiple of 256 except the dense FFN's ``intermediate_size`` (blk.*.ffn_down.weight rows),
which exercises llama-quantize's fallback types.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from mtp_jax import params as P
from mtp_jax.families.glm4moe import Glm4MoeConfig
from mtp_jax.io import tree
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.imatrix_gguf import ImatrixData
from mtp_jax.io.table import plan
from mtp_jax.io.tokenizer import GLM_SPECIALS, tiny_bpe
from mtp_jax.llama_cpp import bin_dir

# 7 trunk layers (3 dense, 4 MoE) + the NextN block; 4 experts, GQA 2; tiny_bpe puts GLM_SPECIALS first
TINY = Glm4MoeConfig(
    vocab_size=300, hidden_size=256, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, intermediate_size=288, moe_intermediate_size=256, n_routed_experts=4, num_experts_per_tok=2,
    first_k_dense_replace=3, routed_scaling_factor=2.5, rope_theta=1_000_000.0, attention_bias=True,
    use_qk_norm=True, max_position_embeddings=4096, bos_token_id=GLM_SPECIALS.index("[gMASK]"),
    eos_token_ids=tuple(map(GLM_SPECIALS.index, ("<|endoftext|>", "<|user|>", "<|observation|>"))),
    name="tiny-glm4moe",
)
# for runs that quantize every tensor: 4 blocks (1 dense, 2 MoE, the NextN block), 2 experts
SMALL = TINY.replace(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=2, num_experts_per_tok=1)


def _random_params(template: P.Params, seed: int) -> P.Params:
    """numpy weights: normal(0, 0.05), norms 1 + normal(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def draw(info: P.ArrayInfo) -> np.ndarray:
        x = rng.standard_normal(info.shape, np.float32)
        return 1 + 0.1 * x if info.init == "ones" else 0.05 * x

    return jax.tree.map(draw, template, is_leaf=lambda x: isinstance(x, P.ArrayInfo))


def write_tiny_glm4moe(path: Path, cfg: Glm4MoeConfig = TINY, outtype: str = "f32", seed: int = 0,
                       nan_tensor: str | None = None) -> Path:
    """Write the model (``outtype`` as write_gguf's); ``nan_tensor``: a GGUF tensor name that gets one NaN."""
    template = tree.template(cfg)
    params = _random_params(template, seed)
    if nan_tensor is not None:
        slot = next(s for s in plan(cfg, template) if s.name == nan_tensor)
        x = tree.get(params, slot.leaf)
        (x if slot.index is None else x[slot.index]).flat[7] = np.nan
    return write_gguf(path, cfg, params, outtype, tiny_bpe(cfg.vocab_size))


def llama_tool(name: str) -> Path:
    """A built llama.cpp tool; skips locally when absent, fails under CI (like the libggml fixture)."""
    path = bin_dir() / name
    if not path.exists():
        msg = f"{name} not found at {path} (run ../shared/tools/build-llama-cpp.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_tool(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; returns the completed process (stdout and stderr as text, not checked)."""
    return subprocess.run([str(llama_tool(name)), *map(str, args)], capture_output=True, text=True, timeout=120)


def llama_error(proc: subprocess.CompletedProcess) -> str | None:
    """The exception text of a failed llama-quantize run ('failed to quantize: <what>'), else None."""
    for line in (proc.stdout + proc.stderr).splitlines():
        if "failed to quantize: " in line:
            return line.split("failed to quantize: ", 1)[1].strip()
    return None


def gguf_types(path: Path) -> dict[str, gguf.GGMLQuantizationType]:
    """Tensor name -> type of a GGUF file, in file order."""
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def tiny_imatrix(cfg: Glm4MoeConfig = TINY, seed: int = 0, skip: str | None = None,
                 chunks: int = 3, chunk_size: int = 512) -> ImatrixData:
    """A synthetic imatrix for the tiny model: an entry per matmul weight (token_embd excluded), per
    expert for the 3-D ones (one expert never routed: count 0). ``skip``: a regex of names to leave out."""
    rng = np.random.default_rng(seed)
    n_tok = chunks * chunk_size
    sums, counts = {}, {}
    template = tree.template(cfg)
    for s in plan(cfg, template):
        info = tree.get(template, s.leaf)
        shape = s.spec.gguf_shape(info.shape if s.index is None else info.shape[1:])
        if len(shape) < 2 or s.name == "token_embd.weight" or (skip and re.search(skip, s.name)):
            continue
        n_mat = shape[0] if len(shape) == 3 else 1
        c = np.full(n_mat, n_tok, np.float32)
        if n_mat > 1:
            c = rng.integers(1, n_tok, n_mat).astype(np.float32)
            c[-1] = 0
        sums[s.name] = (rng.gamma(2.0, 1.0, (n_mat, shape[-1])) * c[:, None]).astype(np.float32)
        counts[s.name] = c
    return ImatrixData(sums, counts, datasets=["tiny.txt"], chunk_count=chunks, chunk_size=chunk_size)
