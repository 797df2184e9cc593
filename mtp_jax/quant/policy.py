"""Which ggml type each tensor gets: a port of llama-quantize's type choice (src/llama-quant.cpp).

The source is the llama.cpp tree vendored in llama-cpp-python 0.3.36. ``plan_tensors`` runs what
``llama_model_quantize_impl`` does before it writes data: the tensor order of the model loader
(``weight_name_comparer``), ``init_quantize_state_counters``, ``llama_tensor_get_type`` (with
``llama_tensor_get_type_impl`` and ``tensor_type_fallback``), ``tensor_requires_imatrix`` and the imatrix
checks of the main loop, with llama.cpp's error texts. The one addition is ``mtp_fallback``: a tensor of
the NextN/MTP block that needs an imatrix but has no entry is promoted to that type (llama.cpp errors).
--allow-requantize reads quantized inputs through gguf-py's dequantizers, so it covers the types those know.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from mtp_jax.io.validate import dequantizable
from mtp_jax.quant.base import QuantError

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
FT = LlamaFileType

# tools/quantize/quantize.cpp QUANT_OPTIONS (Q2_0 left out: gguf-py has no such type; COPY: see below)
FTYPES: dict[str, LlamaFileType] = {
    "Q1_0": FT.MOSTLY_Q1_0, "Q4_0": FT.MOSTLY_Q4_0, "Q4_1": FT.MOSTLY_Q4_1, "MXFP4_MOE": FT.MOSTLY_MXFP4_MOE,
    "Q5_0": FT.MOSTLY_Q5_0, "Q5_1": FT.MOSTLY_Q5_1, "IQ2_XXS": FT.MOSTLY_IQ2_XXS, "IQ2_XS": FT.MOSTLY_IQ2_XS,
    "IQ2_S": FT.MOSTLY_IQ2_S, "IQ2_M": FT.MOSTLY_IQ2_M, "IQ1_S": FT.MOSTLY_IQ1_S, "IQ1_M": FT.MOSTLY_IQ1_M,
    "TQ1_0": FT.MOSTLY_TQ1_0, "TQ2_0": FT.MOSTLY_TQ2_0, "Q2_K": FT.MOSTLY_Q2_K, "Q2_K_S": FT.MOSTLY_Q2_K_S,
    "IQ3_XXS": FT.MOSTLY_IQ3_XXS, "IQ3_S": FT.MOSTLY_IQ3_S, "IQ3_M": FT.MOSTLY_IQ3_M, "Q3_K": FT.MOSTLY_Q3_K_M,
    "IQ3_XS": FT.MOSTLY_IQ3_XS, "Q3_K_S": FT.MOSTLY_Q3_K_S, "Q3_K_M": FT.MOSTLY_Q3_K_M,
    "Q3_K_L": FT.MOSTLY_Q3_K_L, "IQ4_NL": FT.MOSTLY_IQ4_NL, "IQ4_XS": FT.MOSTLY_IQ4_XS, "Q4_K": FT.MOSTLY_Q4_K_M,
    "Q4_K_S": FT.MOSTLY_Q4_K_S, "Q4_K_M": FT.MOSTLY_Q4_K_M, "Q5_K": FT.MOSTLY_Q5_K_M, "Q5_K_S": FT.MOSTLY_Q5_K_S,
    "Q5_K_M": FT.MOSTLY_Q5_K_M, "Q6_K": FT.MOSTLY_Q6_K, "Q8_0": FT.MOSTLY_Q8_0, "F16": FT.MOSTLY_F16,
    "BF16": FT.MOSTLY_BF16, "F32": FT.ALL_F32,
}

# llama_ftype_get_default_type
DEFAULT_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    FT.MOSTLY_Q4_0: Q.Q4_0, FT.MOSTLY_Q4_1: Q.Q4_1, FT.MOSTLY_Q5_0: Q.Q5_0, FT.MOSTLY_Q5_1: Q.Q5_1,
    FT.MOSTLY_Q8_0: Q.Q8_0, FT.MOSTLY_F16: Q.F16, FT.MOSTLY_BF16: Q.BF16, FT.ALL_F32: Q.F32,
    FT.MOSTLY_Q1_0: Q.Q1_0, FT.MOSTLY_MXFP4_MOE: Q.MXFP4,
    FT.MOSTLY_Q2_K_S: Q.Q2_K, FT.MOSTLY_Q2_K: Q.Q2_K, FT.MOSTLY_IQ3_XS: Q.IQ3_S,
    FT.MOSTLY_Q3_K_S: Q.Q3_K, FT.MOSTLY_Q3_K_M: Q.Q3_K, FT.MOSTLY_Q3_K_L: Q.Q3_K,
    FT.MOSTLY_Q4_K_S: Q.Q4_K, FT.MOSTLY_Q4_K_M: Q.Q4_K, FT.MOSTLY_Q5_K_S: Q.Q5_K, FT.MOSTLY_Q5_K_M: Q.Q5_K,
    FT.MOSTLY_Q6_K: Q.Q6_K, FT.MOSTLY_TQ1_0: Q.TQ1_0, FT.MOSTLY_TQ2_0: Q.TQ2_0,
    FT.MOSTLY_IQ2_XXS: Q.IQ2_XXS, FT.MOSTLY_IQ2_XS: Q.IQ2_XS, FT.MOSTLY_IQ2_S: Q.IQ2_XS, FT.MOSTLY_IQ2_M: Q.IQ2_S,
    FT.MOSTLY_IQ3_XXS: Q.IQ3_XXS, FT.MOSTLY_IQ1_S: Q.IQ1_S, FT.MOSTLY_IQ1_M: Q.IQ1_M,
    FT.MOSTLY_IQ4_NL: Q.IQ4_NL, FT.MOSTLY_IQ4_XS: Q.IQ4_XS, FT.MOSTLY_IQ3_S: Q.IQ3_S, FT.MOSTLY_IQ3_M: Q.IQ3_S,
}

# quantize.cpp's last QUANT_OPTIONS entry: ALL_F32 with only_copy (every tensor copied as it is); by name
# only, the number 0 is F32
COPY = "COPY"

# llama_model_loader's file type guess (without general.file_type): the most frequent tensor type's ftype,
# marked LLAMA_FTYPE_GUESSED; the types missing here give ALL_F32
_GUESSED_FTYPE: dict[GGMLQuantizationType, LlamaFileType] = {
    Q.F32: FT.ALL_F32, Q.F16: FT.MOSTLY_F16, Q.BF16: FT.MOSTLY_BF16, Q.Q4_0: FT.MOSTLY_Q4_0, Q.Q4_1: FT.MOSTLY_Q4_1,
    Q.Q5_0: FT.MOSTLY_Q5_0, Q.Q5_1: FT.MOSTLY_Q5_1, Q.Q8_0: FT.MOSTLY_Q8_0, Q.Q2_K: FT.MOSTLY_Q2_K,
    Q.Q3_K: FT.MOSTLY_Q3_K_M, Q.Q4_K: FT.MOSTLY_Q4_K_M, Q.Q5_K: FT.MOSTLY_Q5_K_M, Q.Q6_K: FT.MOSTLY_Q6_K,
    Q.TQ1_0: FT.MOSTLY_TQ1_0, Q.TQ2_0: FT.MOSTLY_TQ2_0, Q.IQ2_XXS: FT.MOSTLY_IQ2_XXS, Q.IQ2_XS: FT.MOSTLY_IQ2_XS,
    Q.IQ2_S: FT.MOSTLY_IQ2_S, Q.IQ3_XXS: FT.MOSTLY_IQ3_XXS, Q.IQ1_S: FT.MOSTLY_IQ1_S, Q.IQ1_M: FT.MOSTLY_IQ1_M,
    Q.IQ4_NL: FT.MOSTLY_IQ4_NL, Q.IQ4_XS: FT.MOSTLY_IQ4_XS, Q.IQ3_S: FT.MOSTLY_IQ3_S, Q.NVFP4: FT.MOSTLY_NVFP4,
    Q.Q1_0: FT.MOSTLY_Q1_0,
}

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)  # the inputs we quantize from without --allow-requantize


def ggml_type_name(t: GGMLQuantizationType) -> str:
    """ggml_type_name(): 'q4_K', 'iq2_xxs', 'f16', ..."""
    name = t.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def parse_ftype(text: str | int | LlamaFileType) -> LlamaFileType:
    """A QUANT_OPTIONS name (any case) or its number, as try_parse_ftype in quantize.cpp."""
    if isinstance(text, LlamaFileType):
        return text
    s = str(text).strip().upper()
    if s in FTYPES:
        return FTYPES[s]
    if s.lstrip("+-").isdigit() and int(s) in {int(f) for f in FTYPES.values()}:
        return LlamaFileType(int(s))
    raise QuantError(f"invalid ftype '{text}'; choose one of {', '.join(FTYPES)}")


def ftype_name(ftype: LlamaFileType) -> str:
    return next(n for n, f in FTYPES.items() if f == ftype and n not in ("Q3_K", "Q4_K", "Q5_K"))


def copy_file_type(file_type: int | None, tensors: Sequence[TensorDesc]) -> int:
    """general.file_type of a COPY: the input's, else llama_model_loader's guess from the tensor types (the
    first type, in loader order, to reach the highest count), or-ed with LLAMA_FTYPE_GUESSED."""
    if file_type is not None:
        return file_type
    counts: dict[GGMLQuantizationType, int] = {}
    best, n_best = Q.F32, 0
    for t in loader_order(tensors):
        counts[t.type] = counts.get(t.type, 0) + 1
        if counts[t.type] > n_best:
            best, n_best = t.type, counts[t.type]
    return int(_GUESSED_FTYPE.get(best, FT.ALL_F32)) | int(FT.GUESSED)


def parse_ggml_type(text: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """parse_ggml_type in quantize.cpp: a ggml type name, case-insensitive."""
    if isinstance(text, GGMLQuantizationType):
        return text
    for t in GGMLQuantizationType:
        if t.name.lower() == str(text).strip().lower():
            return t
    raise QuantError(f"invalid ggml_type '{text}'")


def parse_tensor_type(spec: str) -> tuple[str, GGMLQuantizationType]:
    """'PATTERN=TYPE' (--tensor-type) -> (lower-cased regex, type), as parse_tensor_type in quantize.cpp."""
    name, sep, qtype = spec.partition("=")
    if not sep:
        raise QuantError(f"malformed tensor type '{spec}' (expected PATTERN=TYPE)")
    if not name:
        raise QuantError(f"missing tensor name in --tensor-type '{spec}'")
    if not qtype:
        raise QuantError(f"missing quantization type in --tensor-type '{spec}'")
    name = name.lower()
    try:
        re.compile(name)
    except re.error as e:
        raise QuantError(f"bad regular expression '{name}' in --tensor-type: {e}") from None
    return name, parse_ggml_type(qtype)


def is_quantized(t: GGMLQuantizationType) -> bool:
    """ggml_is_quantized: block types (F32/F16/BF16 and the integer types are not)."""
    return GGML_QUANT_SIZES[t][0] > 1


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: GGMLQuantizationType, n: int) -> int:
    """ggml_row_size for a row of n values (n a multiple of the block size)."""
    bs, ts = GGML_QUANT_SIZES[t]
    return n // bs * ts


@dataclass(frozen=True)
class ModelInfo:
    """The hparams llama-quantize's type choice reads (llama_model::load_hparams)."""

    arch: str
    n_layer_all: int  # block_count, NextN blocks included
    n_layer_nextn: int = 0
    n_expert: int = 0
    n_head: int = 0  # of layer 0
    n_head_kv: int = 0  # of layer 0

    @classmethod
    def from_metadata(cls, kv: Mapping[str, Any]) -> ModelInfo:
        """From GGUF key/values (name -> python value, arrays as lists)."""
        arch = kv.get("general.architecture")
        if not isinstance(arch, str):
            raise QuantError("input has no general.architecture")

        def get(key: str, default: int | None = None) -> int:
            v = kv.get(f"{arch}.{key}", default)
            if v is None:
                raise QuantError(f"input has no {arch}.{key}")
            return int(v[0] if isinstance(v, (list, tuple)) else v)

        n_head = get("attention.head_count", 0)
        return cls(arch=arch, n_layer_all=get("block_count"), n_layer_nextn=get("nextn_predict_layers", 0),
                   n_expert=get("expert_count", 0), n_head=n_head, n_head_kv=get("attention.head_count_kv", n_head))

    @property
    def n_layer(self) -> int:
        """Trunk layers (hparams.n_layer()); blocks n_layer.. are NextN/MTP blocks."""
        return self.n_layer_all - self.n_layer_nextn

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """model.type == LLM_TYPE_70B, as the archs' load_arch_hparams decide it (src/models/*.cpp)."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return (self.arch in ("qwen2", "deci", "olmo") and self.n_layer == 80) or (
            self.arch == "jais2" and self.n_layer == 68)


@dataclass(frozen=True)
class TensorDesc:
    name: str
    ne: tuple[int, ...]  # ggml order (ne[0] = row size), trailing 1s dropped as ggml_n_dims does
    type: GGMLQuantizationType

    def dim(self, i: int) -> int:
        return self.ne[i] if i < len(self.ne) else 1


@dataclass(frozen=True)
class QuantOptions:
    """llama_model_quantize_params as far as the type choice goes, plus ``mtp_fallback``.

    only_copy: the COPY file type (ftype is then ALL_F32, as in quantize.cpp); quantize_output_tensor=False:
    --leave-output-tensor; allow_requantize: --allow-requantize.
    """

    ftype: LlamaFileType
    pure: bool = False
    only_copy: bool = False
    quantize_output_tensor: bool = True
    allow_requantize: bool = False
    output_tensor_type: GGMLQuantizationType | None = None
    token_embedding_type: GGMLQuantizationType | None = None
    tensor_types: tuple[tuple[str, GGMLQuantizationType], ...] = ()  # (regex, type); the first that matches
    mtp_fallback: GGMLQuantizationType | None = None

    def __post_init__(self):
        if self.ftype not in DEFAULT_TYPE:
            raise QuantError(f"invalid output file type {int(self.ftype)}")
        if self.mtp_fallback is not None and _requires_imatrix_type(self.mtp_fallback, self.ftype):
            raise QuantError(f"--mtp-fallback {ggml_type_name(self.mtp_fallback)} itself requires an imatrix; "
                             "choose a type such as q4_K, iq4_xs, q6_K or q8_0")


@dataclass(frozen=True)
class TensorPlan:
    desc: TensorDesc
    type: GGMLQuantizationType  # the output type
    requires_imatrix: bool
    use_imatrix: bool  # an imatrix entry of the right size exists and is used
    fallback: bool = False  # tensor_type_fallback changed the type (row size)
    mtp_promoted: bool = False  # promoted by mtp_fallback

    @property
    def name(self) -> str:
        return self.desc.name

    @property
    def converts(self) -> bool:
        return self.type != self.desc.type


class Category(Enum):  # tensor_category
    TOKEN_EMBD = auto()
    ATTENTION_Q = auto()
    ATTENTION_V = auto()
    ATTENTION_K = auto()
    ATTENTION_QKV = auto()
    ATTENTION_KV_B = auto()
    ATTENTION_OUTPUT = auto()
    FFN_UP = auto()
    FFN_GATE = auto()
    FFN_DOWN = auto()
    OUTPUT = auto()
    OTHER = auto()


_CATEGORY_SUBSTRINGS = (  # tensor_get_category, in its order
    ("attn_qkv.weight", Category.ATTENTION_QKV), ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V), ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q), ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP), ("ffn_gate", Category.FFN_GATE), ("ffn_down", Category.FFN_DOWN),
)


def is_token_embd(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight")


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if is_token_embd(name):
        return Category.TOKEN_EMBD
    return next((c for s, c in _CATEGORY_SUBSTRINGS if s in name), Category.OTHER)


def _is_attn_v(cat: Category) -> bool:
    return cat in (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &il)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def loader_order(tensors: Sequence[TensorDesc]) -> list[TensorDesc]:
    """llama_model_loader::weights_map order (weight_name_comparer): by layer (-1 outside blocks), then name."""
    return sorted(tensors, key=lambda t: (-1 if (il := layer_of(t.name)) is None else il, t.name))


_NOT_QUANTIZED = (  # substrings: tensor_allows_quantization
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_NOT_QUANTIZED_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def allows_quantization(opts: QuantOptions, arch: str, t: TensorDesc) -> bool:
    """tensor_allows_quantization: 2-D/3-D weights, minus norms, routers and a list of small tensors; none
    for COPY, and output.weight not with --leave-output-tensor (it keeps its type, overrides included)."""
    if opts.only_copy or len(t.ne) < 2 or not t.name.endswith("weight"):
        return False
    if t.name in ("position_embd.weight", "token_types.weight"):
        return False
    if t.name == "output.weight" and not opts.quantize_output_tensor:
        return False
    return name_allows_quantization(arch, t.name)


def name_allows_quantization(arch: str, name: str) -> bool:
    """The name part of tensor_allows_quantization: not a norm, a router or one of the listed small tensors."""
    banned = _NOT_QUANTIZED + (_NOT_QUANTIZED_GLM5_NEXT if arch == "glm5-next" else ())
    return not any(s in name for s in banned)


def _requires_imatrix_type(t: GGMLQuantizationType, ftype: LlamaFileType) -> bool:
    return t in (Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S) or (
        t == Q.Q2_K and ftype == FT.MOSTLY_Q2_K_S)


def requires_imatrix(name: str, t: GGMLQuantizationType, ftype: LlamaFileType) -> bool:
    """tensor_requires_imatrix."""
    return not (is_token_embd(name) or name == "output.weight") and _requires_imatrix_type(t, ftype)


@dataclass
class _State:
    """quantize_state_impl: the layer counters the mixtures use, advanced as tensors are visited."""

    model: ModelInfo
    opts: QuantOptions
    has_imatrix: bool
    has_tied_embeddings: bool
    n_attention_wv: int
    n_ffn: int  # n_ffn_down = n_ffn_gate = n_ffn_up = n_layer_all
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    fallbacks: set[str] = field(default_factory=set)
    deferred: list[str] | None = None  # plan_tensors' ``deferred``


def _error(qs: _State, msg: str) -> None:
    """Raise one of the errors llama-quantize's dry run does not check for, or note it for the dry run."""
    if qs.deferred is None:
        raise QuantError(msg)
    qs.deferred.append(msg)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_info(qs: _State, i_layer: int, name: str) -> tuple[int, int]:
    n_layer = qs.n_ffn
    if max(1, qs.model.n_expert) > 1:
        il = layer_of(name)
        if il is None:
            raise QuantError(f"Failed to determine layer for tensor {name}")
        if not 0 <= il < n_layer:
            raise QuantError(f"Bad layer {il} for tensor {name}. Must be in [0, {n_layer})")
        i_layer = il
    return i_layer, n_layer


def _fallback(qs: _State, t: TensorDesc, target: GGMLQuantizationType) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose block divides the row size."""
    ncols, qk = t.ne[0], block_size(target)
    if ncols % qk == 0:
        return target
    qs.fallbacks.add(t.name)
    if target in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS):
        new = Q.IQ4_NL
    elif target in (Q.Q2_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0):
        new = Q.Q4_0
    elif target in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        new = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}[target]
    elif qk <= 32:
        new = target
    else:
        raise QuantError(f"no tensor type fallback is defined for type {ggml_type_name(target)}")
    note = ""
    if ncols % block_size(new):
        new, note = Q.F16, " (must use F16 due to unusual shape)"
    log.warning("%-36s - ncols %6d not divisible by %3d (required for type %7s) -> falling back to %7s%s",
                t.name, ncols, qk, ggml_type_name(target), ggml_type_name(new), note)
    return new


_IQ2_FAMILY = (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M,
               FT.MOSTLY_IQ1_M)


def _get_type_impl(qs: _State, new: GGMLQuantizationType, t: TensorDesc, ftype: LlamaFileType,
                   cat: Category) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl: the mixture rules of each ftype."""
    name, m, arch = t.name, qs.model, qs.model.arch
    n_gqa, n_expert = m.n_gqa, m.n_expert

    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in (Q.F32, Q.BF16, Q.F16):
            return Q.Q8_0

    if cat == Category.OUTPUT or (qs.has_tied_embeddings and cat == Category.TOKEN_EMBD):
        if qs.opts.output_tensor_type is not None:
            new = qs.opts.output_tensor_type
        elif ftype == FT.MOSTLY_MXFP4_MOE:
            new = Q.Q8_0
        elif arch == "falcon" or t.ne[0] % block_size(new):
            new = Q.Q8_0
        elif ftype in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S,
                       FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M):
            new = Q.Q5_K
        elif new != Q.Q8_0:
            new = Q.Q6_K
    elif ftype == FT.MOSTLY_MXFP4_MOE:
        is_bailing_expert = arch == "bailingmoe3" and cat in (Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN)
        new = Q.MXFP4 if t.dim(2) > 1 and (arch != "bailingmoe3" or is_bailing_expert) else Q.Q8_0
    elif cat == Category.TOKEN_EMBD:
        if qs.opts.token_embedding_type is not None:
            new = qs.opts.token_embedding_type
        elif ftype in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
            new = Q.Q2_K
        elif ftype in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ3_XXS):
            new = Q.IQ3_S
        elif ftype in (FT.MOSTLY_TQ1_0, FT.MOSTLY_TQ2_0):
            new = Q.Q4_K
    elif ftype in _IQ2_FAMILY:
        iq3s_or_q2k = Q.IQ3_S if ftype in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M) else Q.Q2_K
        if _is_attn_v(cat):
            new = Q.Q4_K if n_gqa >= 4 or n_expert >= 4 else iq3s_or_q2k
            qs.i_attention_wv += 1
        elif n_expert == 8 and cat == Category.ATTENTION_K:
            new = Q.Q4_K
        elif cat == Category.FFN_DOWN:
            if qs.i_ffn_down < qs.n_ffn // 8:
                new = iq3s_or_q2k
            qs.i_ffn_down += 1
        elif cat == Category.ATTENTION_OUTPUT:
            if n_expert == 8:
                new = Q.Q5_K
            elif ftype in (FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
                new = Q.IQ2_XXS
            elif ftype in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M):
                new = Q.IQ3_S
    elif _is_attn_v(cat):
        if ftype == FT.MOSTLY_Q2_K:
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif ftype == FT.MOSTLY_Q2_K_S and n_gqa >= 4:
            new = Q.Q4_K
        elif ftype == FT.MOSTLY_IQ3_XXS:
            new = Q.Q4_K if n_gqa >= 4 else Q.IQ3_S if not qs.has_imatrix else Q.IQ3_XXS
        elif ftype in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and n_gqa >= 4:
            new = Q.Q4_K
        elif ftype == FT.MOSTLY_IQ3_M:
            new = Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new = Q.Q5_K if qs.i_attention_wv < 2 else Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = Q.Q5_K
        elif ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and n_gqa >= 4:
            new = Q.Q5_K
        elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = Q.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new = Q.Q5_K
        if m.is_70b and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K
        if n_expert == 8:
            new = Q.Q8_0
        qs.i_attention_wv += 1
    elif cat == Category.ATTENTION_K:
        if n_expert == 8:
            new = Q.Q8_0
        elif ftype == FT.MOSTLY_IQ3_XS:
            new = Q.IQ3_XXS
        elif ftype == FT.MOSTLY_IQ3_XXS:
            new = Q.IQ2_S
    elif cat == Category.ATTENTION_Q:
        if ftype == FT.MOSTLY_IQ3_XS:
            new = Q.IQ3_XXS
        elif ftype == FT.MOSTLY_IQ3_XXS:
            new = Q.IQ2_S
    elif cat == Category.FFN_DOWN:
        i_layer, n_layer = _layer_info(qs, qs.i_ffn_down, name)
        falcon = arch == "falcon"
        if ftype == FT.MOSTLY_Q2_K:
            new = Q.Q3_K
        elif ftype == FT.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                new = Q.Q4_K
        elif ftype == FT.MOSTLY_IQ3_XXS and not qs.has_imatrix:
            new = Q.Q4_K if i_layer < n_layer // 8 else Q.Q3_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new = (Q.Q5_K if i_layer < n_layer // 16
                   else Q.Q4_K if not falcon or _use_more_bits(i_layer, n_layer) else Q.Q3_K)
        elif ftype == FT.MOSTLY_IQ3_M and (
                i_layer < n_layer // 8 or (n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new = Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = Q.Q4_K if falcon else Q.Q5_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            if falcon:
                new = (Q.Q6_K if i_layer < n_layer // 16
                       else Q.Q5_K if _use_more_bits(i_layer, n_layer) else Q.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new = Q.Q6_K
        elif i_layer < n_layer // 8 and ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and not qs.has_imatrix:
            new = Q.Q5_K
        elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new = Q.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new = Q.Q5_K
        elif ftype in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and qs.has_imatrix and i_layer < n_layer // 8:
            new = Q.Q4_1 if ftype == FT.MOSTLY_Q4_0 else Q.Q5_1
        qs.i_ffn_down += 1
    elif cat == Category.ATTENTION_OUTPUT:
        if arch != "falcon":
            if n_expert == 8:
                if ftype in (FT.MOSTLY_Q2_K, FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M,
                             FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ3_S, FT.MOSTLY_IQ3_M,
                             FT.MOSTLY_IQ4_XS):
                    new = Q.Q5_K
            else:
                new = {FT.MOSTLY_Q2_K: Q.Q3_K, FT.MOSTLY_IQ3_XXS: Q.IQ3_S, FT.MOSTLY_Q3_K_M: Q.Q4_K,
                       FT.MOSTLY_Q3_K_L: Q.Q5_K, FT.MOSTLY_IQ3_M: Q.Q4_K}.get(ftype, new)
        elif ftype == FT.MOSTLY_Q3_K_L:
            new = Q.Q4_K
    elif cat == Category.ATTENTION_QKV:
        if ftype in (FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q3_K_L, FT.MOSTLY_IQ3_M):
            new = Q.Q4_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            new = Q.Q5_K
        elif ftype == FT.MOSTLY_Q5_K_M:
            new = Q.Q6_K
    elif cat in (Category.FFN_GATE, Category.FFN_UP):
        counter = "i_ffn_gate" if cat == Category.FFN_GATE else "i_ffn_up"
        i_layer, n_layer = _layer_info(qs, getattr(qs, counter), name)
        if ftype == FT.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new = Q.IQ3_XXS
        setattr(qs, counter, getattr(qs, counter) + 1)
    return new


def _get_type(qs: _State, t: TensorDesc, default: GGMLQuantizationType, cat: Category) -> GGMLQuantizationType:
    """llama_tensor_get_type for a tensor that allows quantization."""
    o = qs.opts
    if o.token_embedding_type is not None and cat == Category.TOKEN_EMBD:
        # per_layer_token_embd.weight may be named by a --tensor-type pattern instead
        if t.name != "per_layer_token_embd.weight" or not any(re.search(p, t.name) for p, _ in o.tensor_types):
            return o.token_embedding_type
    if o.output_tensor_type is not None and cat == Category.OUTPUT:
        return o.output_tensor_type
    new = default
    if is_quantized(default):
        manual = False
        for pattern, qtype in o.tensor_types:
            if re.search(pattern, t.name):
                if qtype != new:
                    log.info("%-36s - applying manual override: %s -> %s", t.name, ggml_type_name(new),
                             ggml_type_name(qtype))
                    new = qtype
                manual = True
                break
        if not manual and not o.pure:
            new = _get_type_impl(qs, new, t, o.ftype, cat)
        new = _fallback(qs, t, new)
    return new


def _is_mtp(model: ModelInfo, name: str) -> bool:
    il = layer_of(name)
    return model.n_layer_nextn > 0 and il is not None and il >= model.n_layer


def plan_tensors(model: ModelInfo, tensors: Sequence[TensorDesc], opts: QuantOptions,
                 imatrix_sizes: Mapping[str, int] | None = None,
                 deferred: list[str] | None = None, keep_order: bool = False) -> list[TensorPlan]:
    """Every tensor's output type, in llama-quantize's output order; raises llama.cpp's imatrix errors.

    imatrix_sizes: tensor name -> number of imatrix values (K, or n_expert*K for 3-D tensors); None or
    empty = no imatrix (llama-quantize passes none when the file has no entries). deferred: a list for
    --dry-run. llama-quantize's dry run skips the imatrix and requantizing checks (it sizes an IQ2_XXS
    model before there is an imatrix), so their errors are appended to it instead of raised, in the
    order the real run meets them, and the tensor keeps the type chosen before the failed check.
    keep_order: visit ``tensors`` in the order given (--keep-split sorts them by split, then data offset,
    before the type choice, whose layer counters depend on the order) instead of the loader's.
    """
    ordered = list(tensors) if keep_order else loader_order(tensors)
    has_imatrix = bool(imatrix_sizes)
    qs = _State(model=model, opts=opts, has_imatrix=has_imatrix,
                has_tied_embeddings=not any(t.name == "output.weight" for t in tensors),
                n_attention_wv=sum(_is_attn_v(category(t.name)) for t in tensors), n_ffn=model.n_layer_all,
                deferred=deferred)
    default = DEFAULT_TYPE[opts.ftype]

    plans: list[TensorPlan] = []
    for t in ordered:  # the preliminary loop of llama_model_quantize_impl
        allows = allows_quantization(opts, model.arch, t)
        new = _get_type(qs, t, default, category(t.name)) if allows else t.type
        req = requires_imatrix(t.name, new, opts.ftype)
        if not has_imatrix and allows and req and not (opts.mtp_fallback and _is_mtp(model, t.name)):
            _error(qs, f"this quantization requires an imatrix! (offending tensor: {t.name}, target type: "
                       f"{ggml_type_name(new)}; pass an importance matrix with --imatrix)")
        plans.append(TensorPlan(t, new, req, use_imatrix=False, fallback=t.name in qs.fallbacks))

    return [_check_tensor(qs, p, imatrix_sizes or {}) for p in plans]


def _check_tensor(qs: _State, p: TensorPlan, imatrix_sizes: Mapping[str, int]) -> TensorPlan:
    """The per-tensor checks of llama-quantize's main loop (imatrix entry, input type), and mtp_fallback."""
    t = p.desc
    if not p.converts:
        return p
    use = False
    if t.name in imatrix_sizes:
        size, want = imatrix_sizes[t.name], t.ne[0] * t.dim(2)
        if size == want:
            use = True
        elif not is_token_embd(t.name):
            _error(qs, f"imatrix size {size} is different from tensor size {want} for {t.name}")
            return p
    new, promoted = p.type, False
    if p.requires_imatrix and not use:
        if qs.opts.mtp_fallback is None or not _is_mtp(qs.model, t.name):
            msg = f"Missing importance matrix for tensor {t.name} in a very low-bit quantization"
            if _is_mtp(qs.model, t.name):
                msg += (" (a tensor of the NextN/MTP block: collect the imatrix with the MTP layers active, "
                        "or pass --mtp-fallback TYPE)")
            _error(qs, msg)
            return p
        new, promoted = _fallback(qs, t, qs.opts.mtp_fallback), True
        log.warning("%-36s - NextN/MTP tensor has no imatrix entry: %s -> %s (mtp_fallback)", t.name,
                    ggml_type_name(p.type), ggml_type_name(new))
    if new != t.type and t.type not in FLOAT_TYPES:
        src = ggml_type_name(t.type)
        if not qs.opts.allow_requantize:
            _error(qs, f"requantizing from type {src} is disabled (tensor {t.name}; pass --allow-requantize to "
                       "requantize from the dequantized values, at a loss of quality)")
            return p
        if not dequantizable(t.type):
            _error(qs, f"requantizing from type {src} is not supported (tensor {t.name}): gguf-py has no "
                       f"dequantizer for {src}")
            return p
    return TensorPlan(t, new, p.requires_imatrix and not promoted, use, t.name in qs.fallbacks, promoted)
