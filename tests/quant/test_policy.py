"""Per-tensor type choice (mtp_jax.quant.policy) against llama-quantize's, on the tiny glm4moe with NextN."""

from __future__ import annotations

import ctypes
import re

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, LlamaFileType

from mtp_jax.config import ModelConfig
from mtp_jax.io.imatrix_gguf import write_imatrix_gguf
from mtp_jax.quant import policy
from mtp_jax.quant.base import QuantError
from mtp_jax.quant.policy import ModelInfo, QuantOptions, TensorDesc
from tests.quant.tiny_glm4moe import TINY, llama_error, run_tool, tiny_imatrix, write_tiny_glm4moe

# (a) the default: gqa 2, 4 experts, n_ff 288 (fallbacks to 32-blocks);
# (b) gqa 4, 8 experts (the n_expert == 8 rules), n_ff 200 (no 32-block fits: F16), 8 trunk layers
CONFIGS = {"a": TINY, "b": TINY.replace(num_hidden_layers=8, num_key_value_heads=1, n_routed_experts=8,
                                        intermediate_size=200)}


class Model:
    def __init__(self, root, cfg: ModelConfig):
        self.path = write_tiny_glm4moe(root / "model.gguf", cfg)
        self.imatrix = tiny_imatrix(cfg)
        self.imatrix_path = write_imatrix_gguf(self.imatrix, root / "imatrix.gguf")
        r = GGUFReader(self.path)
        self.info = ModelInfo.from_metadata({k: f.contents() for k, f in r.fields.items()})
        self.tensors = [TensorDesc(t.name, tuple(int(n) for n in t.shape), Q(t.tensor_type)) for t in r.tensors]
        self.sizes = {k: v.size for k, v in self.imatrix.in_sum2.items()}

    def plan(self, ftype, imatrix=True, deferred=None, **kw):
        return policy.plan_tensors(self.info, self.tensors, QuantOptions(policy.parse_ftype(ftype), **kw),
                                   self.sizes if imatrix else None, deferred)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: Model(tmp_path_factory.mktemp(f"policy-{k}"), cfg) for k, cfg in CONFIGS.items()}


def _types(plans):
    return {p.name: policy.ggml_type_name(p.type) for p in plans}


# --- without llama.cpp ---------------------------------------------------------------------------------------


def test_model_info(models):
    m = models["a"].info
    assert (m.arch, m.n_layer_all, m.n_layer_nextn, m.n_layer, m.n_expert, m.n_gqa) == ("glm4moe", 8, 1, 7, 4, 2)
    assert not m.is_70b
    assert ModelInfo("llama", 80, n_head=64, n_head_kv=8).is_70b


def test_parsing():
    assert policy.parse_ftype("q4_k_m") == policy.parse_ftype("Q4_K") == policy.parse_ftype("15") == \
        LlamaFileType.MOSTLY_Q4_K_M
    assert policy.ftype_name(LlamaFileType.MOSTLY_Q4_K_M) == "Q4_K_M"
    with pytest.raises(QuantError, match="invalid ftype 'Q9_K'"):
        policy.parse_ftype("Q9_K")
    assert policy.parse_ggml_type("IQ4_xs") == Q.IQ4_XS
    with pytest.raises(QuantError, match="invalid ggml_type 'q9'"):
        policy.parse_ggml_type("q9")
    assert policy.parse_tensor_type(r"FFN_DOWN\.=Q6_k") == (r"ffn_down\.", Q.Q6_K)  # the name is lower-cased
    for bad, msg in [("ffn_down", "malformed"), ("=q4_0", "missing tensor name"), ("x=", "missing quantization"),
                     ("x=q9", "invalid ggml_type"), ("(=q4_0", "bad regular expression")]:
        with pytest.raises(QuantError, match=msg):
            policy.parse_tensor_type(bad)
    assert [policy.ggml_type_name(t) for t in (Q.Q4_K, Q.IQ2_XXS, Q.BF16)] == ["q4_K", "iq2_xxs", "bf16"]


def test_which_tensors_are_quantized(models):
    quantized = {p.name for p in models["a"].plan("Q8_0") if p.converts}
    assert {"blk.7.nextn.eh_proj.weight", "blk.7.nextn.shared_head_head.weight", "blk.7.ffn_down_exps.weight",
            "token_embd.weight", "output.weight"} <= quantized
    assert not quantized & {"blk.7.nextn.enorm.weight", "blk.1.ffn_gate_inp.weight", "blk.0.attn_norm.weight",
                            "blk.0.attn_q.bias", "blk.7.exp_probs_b.bias", "output_norm.weight"}


def test_loader_order():
    names = ["blk.10.a.weight", "blk.9.b.weight", "token_embd.weight", "blk.9.a.weight", "output.weight"]
    ordered = policy.loader_order([TensorDesc(n, (32, 32), Q.F32) for n in names])
    assert [t.name for t in ordered] == ["output.weight", "token_embd.weight", "blk.9.a.weight", "blk.9.b.weight",
                                         "blk.10.a.weight"]


def test_fallbacks(models):
    by = {p.name: p for p in models["b"].plan("Q4_K_M")}
    assert by["blk.0.ffn_down.weight"].type == Q.F16 and by["blk.0.ffn_down.weight"].fallback  # 200 % 32 != 0
    a = {p.name: p.type for p in models["a"].plan("Q4_K_M")}
    assert a["blk.0.ffn_down.weight"] == Q.Q8_0  # Q6_K (use_more_bits) -> Q8_0: 288 % 256 != 0
    assert a["blk.1.ffn_down.weight"] == Q.Q5_0  # Q4_K -> Q5_0
    with pytest.raises(QuantError, match="no tensor type fallback is defined for type q1_0"):
        models["a"].plan("Q1_0")


def test_requires_imatrix(models):
    assert policy.requires_imatrix("blk.0.attn_q.weight", Q.IQ3_XXS, LlamaFileType.MOSTLY_Q4_K_M)
    assert policy.requires_imatrix("blk.0.attn_q.weight", Q.Q2_K, LlamaFileType.MOSTLY_Q2_K_S)
    assert not policy.requires_imatrix("blk.0.attn_q.weight", Q.Q2_K, LlamaFileType.MOSTLY_Q2_K)
    assert not policy.requires_imatrix("token_embd.weight", Q.IQ1_S, LlamaFileType.MOSTLY_IQ1_S)
    with pytest.raises(QuantError, match=r"^this quantization requires an imatrix! \(offending tensor: "
                                         r"blk\.0\.attn_k\.weight, target type: iq2_xxs"):
        models["a"].plan("IQ2_XXS", imatrix=False)
    models["a"].plan("Q4_K_M", imatrix=False)


def test_imatrix_entry_checks(models):
    m = models["a"]
    bad = dict(m.sizes, **{"blk.3.ffn_up_exps.weight": 256})
    with pytest.raises(QuantError, match="^imatrix size 256 is different from tensor size 1024 for "
                                         r"blk\.3\.ffn_up_exps\.weight$"):
        policy.plan_tensors(m.info, m.tensors, QuantOptions(LlamaFileType.MOSTLY_Q4_K_M), bad)
    ok = dict(m.sizes, **{"token_embd.weight": 7})  # ignored for token embeddings, as in llama.cpp
    plans = policy.plan_tensors(m.info, m.tensors, QuantOptions(LlamaFileType.MOSTLY_Q4_K_M), ok)
    use = {p.name: p.use_imatrix for p in plans}
    assert not use["token_embd.weight"] and use["blk.3.ffn_up_exps.weight"] and not use["blk.0.attn_norm.weight"]


def test_requantizing_is_refused():
    t = [TensorDesc("blk.0.attn_q.weight", (256, 256), Q.Q8_0)]
    with pytest.raises(QuantError, match="^requantizing from type q8_0 is disabled .*pass --allow-requantize"):
        policy.plan_tensors(ModelInfo("llama", 1), t, QuantOptions(LlamaFileType.MOSTLY_Q4_0))
    plans = policy.plan_tensors(ModelInfo("llama", 1), t, QuantOptions(LlamaFileType.MOSTLY_Q4_0,
                                                                        allow_requantize=True))
    assert [p.type for p in plans] == [Q.Q4_0]
    q1 = [TensorDesc("blk.0.attn_q.weight", (256, 256), Q.Q1_0)]  # gguf-py has no Q1_0 dequantizer
    with pytest.raises(QuantError, match="^requantizing from type q1_0 is not supported .*no dequantizer"):
        policy.plan_tensors(ModelInfo("llama", 1), q1, QuantOptions(LlamaFileType.MOSTLY_Q4_0, allow_requantize=True))
    assert policy.dequantizable(Q.IQ2_XXS) and policy.dequantizable(Q.BF16) and not policy.dequantizable(Q.I32)


def test_copy_file_type():
    """llama_model_loader's guess: the first type, in loader order, to reach the top count; GUESSED set."""
    guessed = int(LlamaFileType.GUESSED)
    descs = [TensorDesc(n, (32, 32), t) for n, t in [("blk.0.b.weight", Q.F32), ("blk.0.a.weight", Q.Q8_0),
                                                      ("blk.1.a.weight", Q.Q8_0), ("output.weight", Q.F32)]]
    assert policy.copy_file_type(None, descs) == guessed | LlamaFileType.ALL_F32  # output.weight comes first
    assert policy.copy_file_type(None, descs[:3]) == guessed | LlamaFileType.MOSTLY_Q8_0
    assert policy.copy_file_type(None, [TensorDesc("x", (32,), Q.MXFP4)]) == guessed | LlamaFileType.ALL_F32
    assert policy.copy_file_type(15, descs) == 15  # general.file_type, when there is one


def test_copy_and_leave_output_tensor(models):
    m = models["a"]
    plans = policy.plan_tensors(m.info, m.tensors, QuantOptions(LlamaFileType.ALL_F32, only_copy=True))
    assert not any(p.converts for p in plans)
    types = _types(m.plan("Q4_K_M", quantize_output_tensor=False, output_tensor_type=Q.Q8_0))
    assert types["output.weight"] == "f32" and types["token_embd.weight"] == "q4_K"


def test_deferred_errors(models):
    """deferred (--dry-run): the imatrix errors are collected in the real run's order, not raised."""
    m = models["a"]
    deferred = []
    types = _types(m.plan("IQ2_XXS", imatrix=False, deferred=deferred))
    assert deferred[0].startswith("this quantization requires an imatrix! (offending tensor: blk.0.attn_k.weight")
    assert types["blk.0.attn_k.weight"] == "iq2_xxs"
    deferred = []
    bad = dict(m.sizes, **{"blk.3.ffn_up_exps.weight": 256})
    policy.plan_tensors(m.info, m.tensors, QuantOptions(LlamaFileType.MOSTLY_Q4_K_M), bad, deferred)
    assert deferred == ["imatrix size 256 is different from tensor size 1024 for blk.3.ffn_up_exps.weight"]


def test_mtp_fallback(models, caplog):
    m = models["a"]
    no_nextn = {k: v for k, v in m.sizes.items() if ".nextn." not in k}
    opts = QuantOptions(LlamaFileType.MOSTLY_IQ2_XXS)
    with pytest.raises(QuantError, match=r"^Missing importance matrix for tensor blk\.7\.nextn\.eh_proj\.weight "
                                         r"in a very low-bit quantization \(a tensor of the NextN/MTP block"):
        policy.plan_tensors(m.info, m.tensors, opts, no_nextn)
    with caplog.at_level("WARNING", logger="mtp_jax.quant.policy"):
        plans = policy.plan_tensors(m.info, m.tensors, QuantOptions(opts.ftype, mtp_fallback=Q.Q8_0), no_nextn)
    promoted = {p.name: p.type for p in plans if p.mtp_promoted}
    assert promoted == {"blk.7.nextn.eh_proj.weight": Q.Q8_0, "blk.7.nextn.embed_tokens.weight": Q.Q8_0,
                        "blk.7.nextn.shared_head_head.weight": Q.Q8_0}
    assert all(f"{n}" in caplog.text for n in promoted) and "mtp_fallback" in caplog.text
    # everything else as llama.cpp decides it
    assert {p.name: p.type for p in plans if not p.mtp_promoted} == \
        {p.name: p.type for p in m.plan("IQ2_XXS") if p.name not in promoted}

    # without any imatrix, the MTP block is promoted, the trunk still fails as in llama.cpp
    no_mtp_entries = {k: v for k, v in m.sizes.items() if not k.startswith("blk.7.")}
    plans = policy.plan_tensors(m.info, m.tensors, QuantOptions(opts.ftype, mtp_fallback=Q.IQ4_XS), no_mtp_entries)
    assert {p.name for p in plans if p.mtp_promoted} >= {"blk.7.attn_q.weight", "blk.7.ffn_up_exps.weight"}
    with pytest.raises(QuantError, match="this quantization requires an imatrix"):
        policy.plan_tensors(m.info, m.tensors, QuantOptions(opts.ftype, mtp_fallback=Q.IQ4_XS), None)
    with pytest.raises(QuantError, match="itself requires an imatrix"):
        QuantOptions(opts.ftype, mtp_fallback=Q.IQ2_XS)


# --- against llama-quantize ----------------------------------------------------------------------------------

_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\S+), size = .*?(?:\((\S+)\))?$")


def llama_plan(model: Model, ftype: str, imatrix: bool, *options: str, out=None) -> dict[str, str] | str:
    """llama-quantize's types (name -> ggml type name, in its order) from --dry-run, or its error text.

    With ``out``, a real run (--dry-run only warns where an imatrix is missing)."""
    run = ["--dry-run"] if out is None else []
    proc = run_tool("llama-quantize", *run, *options, *(["--imatrix", model.imatrix_path] if imatrix else []),
                    model.path, *([out] if out else []), ftype)
    types = {m.group(1): m.group(3) or m.group(2) for m in map(_LINE.search, (proc.stdout + proc.stderr).splitlines())
             if m}
    if proc.returncode:
        return llama_error(proc) or proc.stderr[-2000:]
    assert types, proc.stdout[-2000:] + proc.stderr[-2000:]
    return types


@pytest.mark.peer
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("ftype", list(policy.FTYPES))
def test_types_match_llama_quantize(models, config, ftype, tmp_path):
    """Each ftype, with and without an imatrix: the same types in the same order, or the same error."""
    m = models[config]
    for imatrix in (True, False):
        try:
            ours = _types(m.plan(ftype, imatrix))
        except QuantError as e:
            needs_imatrix = str(e).startswith("this quantization requires an imatrix!")
            ref = llama_plan(m, ftype, imatrix, out=tmp_path / "out.gguf" if needs_imatrix else None)
            assert isinstance(ref, str) and str(e).startswith(ref), (ftype, imatrix, str(e))
            if needs_imatrix:  # llama-quantize's dry run sizes it all the same, as ours does
                deferred = []
                assert _types(m.plan(ftype, imatrix, deferred)) == llama_plan(m, ftype, imatrix)
                assert deferred[0] == str(e)
            continue
        ref = llama_plan(m, ftype, imatrix)
        assert ours == ref, (ftype, imatrix, {k: (ours.get(k), v) for k, v in ref.items() if ours.get(k) != v})


@pytest.mark.peer
@pytest.mark.parametrize("ftype,options,kw", [
    ("Q4_K_M", ["--pure"], dict(pure=True)),
    ("Q4_K_M", ["--leave-output-tensor", "--output-tensor-type", "q8_0"],
     dict(quantize_output_tensor=False, output_tensor_type=Q.Q8_0)),
    ("Q4_K_M", ["--output-tensor-type", "q8_0", "--token-embedding-type", "IQ4_NL"],
     dict(output_tensor_type=Q.Q8_0, token_embedding_type=Q.IQ4_NL)),
    ("IQ2_XXS", ["--tensor-type", "ffn_down_exps=q8_0", "--tensor-type", r"blk\.[0-2]\.attn=Q6_K",
                 "--tensor-type", "NEXTN=q5_k"], dict(tensor_types=("ffn_down_exps=q8_0", r"blk\.[0-2]\.attn=Q6_K",
                                                                   "NEXTN=q5_k"))),
    ("Q3_K_M", ["--tensor-type", "ffn_down=q4_k"], dict(tensor_types=("ffn_down=q4_k",))),
    ("F16", ["--tensor-type", "ffn_down=q4_k", "--output-tensor-type", "q4_0"],
     dict(tensor_types=("ffn_down=q4_k",), output_tensor_type=Q.Q4_0)),
])
def test_overrides_match_llama_quantize(models, ftype, options, kw):
    m = models["a"]
    kw = dict(kw, tensor_types=tuple(policy.parse_tensor_type(s) for s in kw.get("tensor_types", ())))
    assert _types(m.plan(ftype, **kw)) == llama_plan(m, ftype, True, *options)


@pytest.mark.peer
def test_missing_imatrix_error_matches_llama_quantize(models, tmp_path):
    m = models["a"]
    proc = run_tool("llama-quantize", m.path, tmp_path / "out.gguf", "IQ2_XXS")
    with pytest.raises(QuantError) as e:
        m.plan("IQ2_XXS", imatrix=False)
    assert str(e.value).startswith(llama_error(proc))
    assert "offending tensor: blk.0.attn_k.weight" in str(e.value)
    assert "offending tensor: blk.0.attn_k.weight" in proc.stderr


@pytest.mark.peer
def test_type_names_and_sizes_match_ggml(ggml):
    lib = ggml.load_ggml()
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_row_size.restype, lib.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    lib.ggml_is_quantized.restype = ctypes.c_bool
    for t in Q:
        assert policy.ggml_type_name(t) == lib.ggml_type_name(int(t)).decode()
        if t != Q.Q8_1:  # gguf-py's size for Q8_1 (40 bytes/32) predates ggml's half2 block (36); never a target
            assert policy.row_bytes(t, 1024) == lib.ggml_row_size(int(t), 1024), t
        assert policy.is_quantized(t) == lib.ggml_is_quantized(int(t))
