"""A tiny glm4moe GGUF with a NextN/MTP layer (random weights), and access to the built llama.cpp tools.

Metadata follows convert_hf_to_gguf's Glm4MoeModel (conversion/glm.py): block_count counts the NextN
layer, nextn_predict_layers = 1, sigmoid gating, partial rope, a gpt2-style BPE vocab. Tensor shapes
follow src/models/glm4-moe.cpp. Every row size is a multiple of 256 except the dense FFN's ``n_ff``
(blk.*.ffn_down.weight rows), which exercises llama-quantize's fallback types.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES

from mtp_jax.io.tokenizer import byte_decoder
from mtp_jax.llama_cpp import bin_dir

ARCH = gguf.MODEL_ARCH_NAMES[MODEL_ARCH.GLM4_MOE]  # "glm4moe"


@dataclass(frozen=True)
class TinyGlm4Moe:
    n_layer: int = 7  # trunk layers; the file has n_layer + 1 blocks (the last is NextN)
    n_dense: int = 3  # leading dense blocks
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 288  # dense FFN: not a multiple of 256 -> fallback types for ffn_down
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_expert_shared: int = 1
    dtype: type = np.float32  # of the 2-D/3-D weights; norms and biases are always F32

    @property
    def block_count(self) -> int:
        return self.n_layer + 1


# for runs that quantize every tensor: 4 blocks (1 dense, 2 MoE, the NextN block), 2 experts
SMALL = TinyGlm4Moe(n_layer=3, n_dense=1, n_expert=2, n_expert_used=1)


def _vocab() -> tuple[list[str], list[int], list[str]]:
    """256 byte-level tokens (GPT-2's byte->unicode map), two merges, and the GLM special tokens."""
    dec = byte_decoder()
    tokens = sorted(dec, key=dec.get)  # the stand-in characters of bytes 0..255
    types = [gguf.TokenType.NORMAL] * 256
    merges = ["Ġ t", "h e"]
    tokens += ["Ġt", "he"]
    types += [gguf.TokenType.NORMAL] * 2
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>"]
    tokens += specials
    types += [gguf.TokenType.CONTROL] * len(specials)
    return tokens, [int(t) for t in types], merges


def tensor_shapes(cfg: TinyGlm4Moe, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy shape (the reverse of ggml's ne), in the order a converter writes them."""
    def tn(t: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        return TENSOR_NAMES[t].format(bid=bid) + "." + suffix

    E, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        tn(MODEL_TENSOR.TOKEN_EMBD): (n_vocab, E),
        tn(MODEL_TENSOR.OUTPUT_NORM): (E,),
        tn(MODEL_TENSOR.OUTPUT): (n_vocab, E),
    }
    for i in range(cfg.block_count):
        shapes |= {
            tn(MODEL_TENSOR.ATTN_NORM, i): (E,),
            tn(MODEL_TENSOR.ATTN_Q, i): (H * D, E),
            tn(MODEL_TENSOR.ATTN_Q, i, "bias"): (H * D,),
            tn(MODEL_TENSOR.ATTN_K, i): (Hkv * D, E),
            tn(MODEL_TENSOR.ATTN_K, i, "bias"): (Hkv * D,),
            tn(MODEL_TENSOR.ATTN_V, i): (Hkv * D, E),
            tn(MODEL_TENSOR.ATTN_V, i, "bias"): (Hkv * D,),
            tn(MODEL_TENSOR.ATTN_OUT, i): (E, H * D),
            tn(MODEL_TENSOR.ATTN_Q_NORM, i): (D,),
            tn(MODEL_TENSOR.ATTN_K_NORM, i): (D,),
            tn(MODEL_TENSOR.ATTN_POST_NORM, i): (E,),
        }
        if i < cfg.n_dense:
            shapes |= {
                tn(MODEL_TENSOR.FFN_GATE, i): (cfg.n_ff, E),
                tn(MODEL_TENSOR.FFN_DOWN, i): (E, cfg.n_ff),
                tn(MODEL_TENSOR.FFN_UP, i): (cfg.n_ff, E),
            }
        else:
            X, F, S = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_exp * cfg.n_expert_shared
            shapes |= {
                tn(MODEL_TENSOR.FFN_GATE_INP, i): (X, E),
                tn(MODEL_TENSOR.FFN_EXP_PROBS_B, i, "bias"): (X,),
                tn(MODEL_TENSOR.FFN_GATE_EXP, i): (X, F, E),
                tn(MODEL_TENSOR.FFN_DOWN_EXP, i): (X, E, F),
                tn(MODEL_TENSOR.FFN_UP_EXP, i): (X, F, E),
                tn(MODEL_TENSOR.FFN_GATE_SHEXP, i): (S, E),
                tn(MODEL_TENSOR.FFN_DOWN_SHEXP, i): (E, S),
                tn(MODEL_TENSOR.FFN_UP_SHEXP, i): (S, E),
            }
        if i == cfg.n_layer:  # the NextN block
            shapes |= {
                tn(MODEL_TENSOR.NEXTN_EH_PROJ, i): (E, 2 * E),
                tn(MODEL_TENSOR.NEXTN_ENORM, i): (E,),
                tn(MODEL_TENSOR.NEXTN_HNORM, i): (E,),
                tn(MODEL_TENSOR.NEXTN_EMBED_TOKENS, i): (n_vocab, E),
                tn(MODEL_TENSOR.NEXTN_SHARED_HEAD_HEAD, i): (n_vocab, E),
                tn(MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM, i): (E,),
            }
    return shapes


def write_tiny_glm4moe(path: Path, cfg: TinyGlm4Moe = TinyGlm4Moe(), seed: int = 0,
                       edit: dict[str, np.ndarray] | None = None) -> Path:
    """Write the model; ``edit`` replaces some tensors' data (name -> array of the same shape)."""
    tokens, toktypes, merges = _vocab()
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name("tiny-glm4moe")
    w.add_type("model")
    w.add_block_count(cfg.block_count)
    w.add_context_length(4096)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim // 2)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.n_ff_exp)
    w.add_expert_shared_count(cfg.n_expert_shared)
    w.add_leading_dense_block_count(cfg.n_dense)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_nextn_predict_layers(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if cfg.dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("[gMASK]"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_eot_token_id(tokens.index("<|user|>"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    rng = np.random.default_rng(seed)
    for name, shape in tensor_shapes(cfg, len(tokens)).items():
        if len(shape) == 1:
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            data = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(cfg.dtype)
        w.add_tensor(name, (edit or {}).get(name, data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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


def tiny_imatrix(cfg: TinyGlm4Moe = TinyGlm4Moe(), seed: int = 0, skip: str | None = None,
                 chunks: int = 3, chunk_size: int = 512):
    """A synthetic imatrix for the tiny model: an entry per matmul weight (token_embd excluded), per
    expert for the 3-D ones (one expert never routed: count 0). ``skip``: a regex of names to leave out."""
    import re

    from mtp_jax.io.imatrix_gguf import ImatrixData

    rng = np.random.default_rng(seed)
    n_tok = chunks * chunk_size
    sums, counts = {}, {}
    for name, shape in tensor_shapes(cfg, len(_vocab()[0])).items():
        if len(shape) < 2 or name == "token_embd.weight" or (skip and re.search(skip, name)):
            continue
        n_mat = shape[0] if len(shape) == 3 else 1
        c = np.full(n_mat, n_tok, np.float32)
        if n_mat > 1:
            c = rng.integers(1, n_tok, n_mat).astype(np.float32)
            c[-1] = 0
        sums[name] = (rng.gamma(2.0, 1.0, (n_mat, shape[-1])) * c[:, None]).astype(np.float32)
        counts[name] = c
    return ImatrixData(sums, counts, datasets=["tiny.txt"], chunk_count=chunks, chunk_size=chunk_size)
