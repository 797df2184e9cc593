"""quantize_gguf (mtp_jax.quant.gguf_quantize) and the quantize command, against llama-quantize."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from mtp_jax.io.imatrix_gguf import ImatrixError, write_imatrix_gguf
from mtp_jax.quant import stream
from mtp_jax.quant.base import QuantError
from mtp_jax.quant.cli import add_quantize_parser
from mtp_jax.quant.gguf_quantize import quantize_gguf
from tests.quant.tiny_glm4moe import SMALL, gguf_types, llama_error, run_tool, tiny_imatrix, write_tiny_glm4moe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    return {
        "f32": write_tiny_glm4moe(root / "model-f32.gguf", SMALL),
        "f16": write_tiny_glm4moe(root / "model-f16.gguf", SMALL, "f16"),
        "imatrix": write_imatrix_gguf(tiny_imatrix(SMALL), root / "imatrix.gguf"),
        "imatrix_no_nextn": write_imatrix_gguf(tiny_imatrix(SMALL, skip=r"\.nextn\."), root / "imatrix-trunk.gguf"),
    }


def quantize(*args, **kw):
    """quantize_gguf without a progress bar. Every type has a quantizer: a missing one fails the test."""
    return quantize_gguf(*args, progress=False, **kw)


def llama_quantize(tmp_path, model, ftype, *options):
    out = tmp_path / f"llama-{ftype}.gguf"
    proc = run_tool("llama-quantize", *options, model, out, ftype, "2")
    return proc, out


def _no_output(directory, name="out.gguf"):
    return not (directory / name).exists() and not list(directory.glob(f".{name}.*"))


# --- byte for byte against llama-quantize --------------------------------------------------------------------

FLOAT_CASES = [
    ("f32", "F16", {}),
    ("f32", "BF16", {"imatrix": True}),
    ("f32", "F32", {}),
    ("f16", "BF16", {}),
    ("f16", "F32", {"imatrix": True}),
    ("f32", "F16", {"output_tensor_type": "bf16", "token_embedding_type": "f32", "tensor_types": ["nextn=bf16"]}),
    # output.weight stays F32, --output-tensor-type notwithstanding
    ("f32", "F16", {"leave_output_tensor": True, "output_tensor_type": "q8_0"}),
    ("f16", "COPY", {}),
    ("f32", "COPY", {"imatrix": True}),  # COPY still writes the quantize.imatrix.* pairs
    # the selected entries are counted in quantize.imatrix.entries_count
    ("f32", "BF16", {"imatrix": True, "include_weights": ["ffn_up", "attn_q"]}),
    ("f32", "F16", {"imatrix": True, "exclude_weights": ["ffn_", "nextn"]}),
    ("f32", "F16", {"imatrix": True, "include_weights": ["no-such-tensor"]}),  # none left: no imatrix pairs
]


def _cli_options(kw: dict, imatrix) -> list:
    """quantize_gguf keywords -> llama-quantize options (lists repeat the option; True is a flag)."""
    cli = []
    for k, v in kw.items():
        option = "--" + {"tensor_types": "tensor_type"}.get(k, k).replace("_", "-")
        if v is True and k != "imatrix":
            cli.append(option)
        elif isinstance(v, list):
            cli += [a for s in v for a in (option, s)]
        else:
            cli += [option, imatrix if k == "imatrix" else v]
    return cli


@pytest.mark.peer
@pytest.mark.parametrize("model,ftype,kw", FLOAT_CASES)
def test_float_ftypes_equal_llama_quantize(files, tmp_path, model, ftype, kw):
    """Needs no per-type quantizer: header, metadata (quantize.imatrix.*), order, alignment, F16/BF16 data."""
    proc, ref = llama_quantize(tmp_path, files[model], ftype, *_cli_options(kw, files["imatrix"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    kw = {k: files["imatrix"] if k == "imatrix" else v for k, v in kw.items()}
    summary = quantize(files[model], tmp_path / "out.gguf", ftype, threads=1, **kw)
    assert (tmp_path / "out.gguf").read_bytes() == ref.read_bytes()
    quant_size = re.search(r"quant size  = (.*)", proc.stderr).group(1)
    assert summary.describe().splitlines()[1] == f"quant size  = {quant_size}"


@pytest.mark.peer
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M", "IQ4_XS"])
def test_quantized_ftypes_equal_llama_quantize(files, tmp_path, ftype):
    """Whole-file equality with the same imatrix; passes once the per-type quantizers are registered."""
    quantize(files["f32"], tmp_path / "out.gguf", ftype, imatrix=files["imatrix"], threads=2)
    proc, ref = llama_quantize(tmp_path, files["f32"], ftype, "--imatrix", files["imatrix"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = gguf_types(tmp_path / "out.gguf"), gguf_types(ref)
    assert ours == theirs
    _assert_same_file(tmp_path / "out.gguf", ref)


def _assert_same_file(ours, theirs):
    """Byte equality, else a failure that names the tensors (or the metadata) that differ."""
    if ours.read_bytes() != theirs.read_bytes():
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        differ = [t.name for t, u in zip(a.tensors, b.tensors)
                  if t.tensor_type != u.tensor_type or not np.array_equal(t.data, u.data)]
        pytest.fail(f"tensors differ from llama-quantize's: {differ}" if differ else "the metadata differs")


@pytest.mark.peer
@pytest.mark.parametrize("ftype,kw", [
    ("IQ4_XS", {"include_weights": ["ffn_up", "attn_q"]}),
    ("Q4_K_M", {"exclude_weights": ["ffn_", "nextn"]}),
    ("IQ4_XS", {"include_weights": ["no-such-tensor"]}),  # no entry left: IQ4_XS's mixture without an imatrix
])
def test_imatrix_entry_selection_equals_llama_quantize(files, tmp_path, ftype, kw):
    """--include-weights / --exclude-weights: which tensors are quantized with their imatrix entry."""
    quantize(files["f32"], tmp_path / "out.gguf", ftype, imatrix=files["imatrix"], threads=1, **kw)
    proc, ref = llama_quantize(tmp_path, files["f32"], ftype, "--imatrix", files["imatrix"],
                               *_cli_options(kw, None))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_file(tmp_path / "out.gguf", ref)


def test_imatrix_entry_selection_errors(files, tmp_path):
    with pytest.raises(QuantError, match="--include-weights and --exclude-weights cannot be used together"):
        quantize(files["f32"], tmp_path / "out.gguf", "Q8_0", imatrix=files["imatrix"], include_weights=["a"],
                 exclude_weights=["b"])
    with pytest.raises(QuantError, match="select importance matrix entries; pass --imatrix"):
        quantize(files["f32"], tmp_path / "out.gguf", "Q8_0", include_weights=["ffn_up"])
    assert _no_output(tmp_path)


# --- --dry-run -----------------------------------------------------------------------------------------------

_TENSOR_LINE = re.compile(r"^\[ *\d+/ *\d+\] .*")


@pytest.mark.peer
@pytest.mark.parametrize("ftype,kw", [
    ("Q4_K_M", {"imatrix": True}),
    ("IQ2_XXS", {}),  # needs an imatrix: both dry runs size it anyway and warn
    ("IQ4_XS", {"leave_output_tensor": True, "tensor_types": ["ffn_down=q8_0"]}),
    ("COPY", {}),
])
def test_dry_run_equals_llama_quantize(files, tmp_path, caplog, ftype, kw):
    """The per-tensor lines and the totals of llama-quantize --dry-run, and no file written."""
    proc = run_tool("llama-quantize", "--dry-run", *_cli_options(kw, files["imatrix"]), files["f32"], ftype)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kw = {k: files["imatrix"] if k == "imatrix" else v for k, v in kw.items()}
    with caplog.at_level(logging.INFO, logger="mtp_jax.quant.gguf_quantize"):
        summary = quantize(files["f32"], None, ftype, dry_run=True, **kw)
    ours = [m.group(0) for m in map(_TENSOR_LINE.match, caplog.messages) if m]
    theirs = [m.group(0) for m in map(_TENSOR_LINE.match, proc.stderr.splitlines()) if m]
    assert ours == theirs
    totals = re.findall(r"(?:model|quant) size  = .*", proc.stderr)
    assert summary.describe().splitlines()[:2] == totals
    assert summary.out_path is None and "no file written" in summary.describe()
    needs_imatrix = "will require an imatrix" in proc.stderr
    assert needs_imatrix == (summary.would_fail is not None)
    if needs_imatrix:
        assert summary.would_fail.startswith("this quantization requires an imatrix!")
    assert not list(tmp_path.iterdir())


def test_dry_run_reports_the_first_error_of_the_real_run(files, tmp_path):
    """Errors llama-quantize's dry run skips (here a missing MTP imatrix entry) become would_fail."""
    kw = {"imatrix": files["imatrix_no_nextn"], "tensor_types": [r"^(?!blk\.3\.nextn\.)=q6_K"]}
    with pytest.raises(QuantError) as e:
        quantize(files["f32"], tmp_path / "out.gguf", "IQ2_XXS", **kw)
    summary = quantize(files["f32"], tmp_path / "out.gguf", "IQ2_XXS", dry_run=True, **kw)
    assert summary.would_fail == str(e.value)
    assert f"the quantization itself would fail: {e.value}" in summary.describe()
    assert _no_output(tmp_path)


# --- quantized inputs: --allow-requantize, COPY ----------------------------------------------------------------


@pytest.fixture(scope="module")
def q4_k_m(files, tmp_path_factory):
    """The tiny model as Q4_K_M with the imatrix: q4_K, q6_K, q5_0 and f32 tensors."""
    path = tmp_path_factory.mktemp("quantized") / "model-q4_k_m.gguf"
    quantize(files["f32"], path, "Q4_K_M", imatrix=files["imatrix"], threads=1)
    return path


@pytest.mark.peer
def test_requantizing_is_refused_like_llama_quantize(q4_k_m, tmp_path):
    proc, _ = llama_quantize(tmp_path, q4_k_m, "Q8_0")
    with pytest.raises(QuantError) as e:
        quantize(q4_k_m, tmp_path / "out.gguf", "Q8_0")
    assert llama_error(proc) and str(e.value).startswith(llama_error(proc))
    assert "--allow-requantize" in str(e.value)
    assert _no_output(tmp_path)  # llama-quantize leaves a partial file behind


@pytest.mark.peer
@pytest.mark.parametrize("ftype,imatrix", [("Q3_K_M", True), ("Q8_0", False), ("BF16", False)])
def test_allow_requantize_equals_llama_quantize(files, q4_k_m, tmp_path, ftype, imatrix):
    """Quantized tensors dequantized (gguf-py's dequantizers match ggml's to_float) and quantized again."""
    options = ["--imatrix", files["imatrix"]] if imatrix else []
    quantize(q4_k_m, tmp_path / "out.gguf", ftype, imatrix=files["imatrix"] if imatrix else None,
             allow_requantize=True, threads=1)
    proc, ref = llama_quantize(tmp_path, q4_k_m, ftype, "--allow-requantize", *options)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_file(tmp_path / "out.gguf", ref)


def _without_file_type(path, monkeypatch):
    """The tiny F16 model without general.file_type (llama_model_loader then guesses it)."""
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_file_type", lambda self, ftype: None)
        return write_tiny_glm4moe(path, SMALL, "f16")


@pytest.mark.peer
@pytest.mark.parametrize("model", ["q4_k_m", "no_file_type"])
def test_copy_equals_llama_quantize(q4_k_m, tmp_path, monkeypatch, model):
    """COPY copies quantized tensors too, and keeps general.file_type, or writes llama.cpp's guess."""
    src = q4_k_m if model == "q4_k_m" else _without_file_type(tmp_path / "model.gguf", monkeypatch)
    quantize(src, tmp_path / "out.gguf", "COPY", threads=1)
    proc, ref = llama_quantize(tmp_path, src, "COPY")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_file(tmp_path / "out.gguf", ref)
    md = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "out.gguf").fields.items()}
    expected = gguf.LlamaFileType.MOSTLY_Q4_K_M if model == "q4_k_m" else \
        gguf.LlamaFileType.MOSTLY_F16 | gguf.LlamaFileType.GUESSED
    assert md["general.file_type"] == expected


def _write_gguf(path: Path, add) -> None:
    """A minimal "llama" GGUF holding the keys and tensors that ``add(writer)`` puts in."""
    w = gguf.GGUFWriter(str(path), "llama")
    add(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_split_inputs(tmp_path):
    """A split model is read from its first file; llama_model_loader's checks, each naming a file."""
    split = gguf.Keys.Split

    def write(name, no, count, n_tensors, tensor="token_embd.weight"):
        def add(w):
            w.add_uint16(split.LLM_KV_SPLIT_NO, no)
            w.add_uint16(split.LLM_KV_SPLIT_COUNT, count)
            w.add_int32(split.LLM_KV_SPLIT_TENSORS_COUNT, n_tensors)
            w.add_tensor(tensor, np.ones((4, 32), np.float32))

        _write_gguf(tmp_path / name, add)
        return tmp_path / name

    first = write("model-00001-of-00002.gguf", 0, 2, 2)
    with pytest.raises(QuantError, match=r"model-00002-of-00002\.gguf: no such file$"):
        quantize(first, tmp_path / "out.gguf", "Q8_0")
    second = write("model-00002-of-00002.gguf", 1, 2, 2)
    with pytest.raises(QuantError, match=r"^illegal split file idx: 1 \(file: .*model-00002-of-00002\.gguf\), model "
                                         r"must be loaded with the first split$"):
        quantize(second, tmp_path / "out.gguf", "Q8_0")
    with pytest.raises(QuantError, match=r"model-00002-of-00002\.gguf: invalid model: tensor 'token_embd\.weight' is "
                                         r"duplicated \(also in .*model-00001-of-00002\.gguf\)$"):
        quantize(first, tmp_path / "out.gguf", "Q8_0")
    write("model-00002-of-00002.gguf", 0, 2, 2, "output.weight")
    with pytest.raises(QuantError, match=r"^invalid split file idx: 0 \(file: .*model-00002-of-00002\.gguf\), "
                                         r"expected 1$"):
        quantize(first, tmp_path / "out.gguf", "Q8_0")
    write("model-00002-of-00002.gguf", 1, 2, 2, "output.weight")
    write("model-00001-of-00002.gguf", 0, 2, 3)
    with pytest.raises(QuantError, match=r"model-00001-of-00002\.gguf: corrupted model: 3 tensors expected but 2 "
                                         r"found in 2 split files$"):
        quantize(first, tmp_path / "out.gguf", "Q8_0")
    renamed = tmp_path / "model.gguf"
    first.rename(renamed)
    with pytest.raises(QuantError, match=r"^invalid split file name: .*model\.gguf \(split 1 of 2 must be named "
                                         r"PREFIX-00001-of-00002\.gguf\)$"):
        quantize(renamed, tmp_path / "out.gguf", "Q8_0")
    assert _no_output(tmp_path)


# --- behaviour -----------------------------------------------------------------------------------------------


def test_summary_and_log(files, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mtp_jax.quant.gguf_quantize"):
        s = quantize(files["f32"], tmp_path / "out.gguf", "F16", threads=1)
    assert len(s.tensors) == len(gguf_types(files["f32"])) and s.n_fallback == 0 and not s.mtp_promoted
    assert s.bytes_in == sum(t.n_bytes for t in gguf.GGUFReader(files["f32"]).tensors)
    assert s.bpw_in == 32.0 and 16 < s.bpw_out < 16.1
    assert re.search(r"\[ *\d+/ *\d+\] blk\.1\.ffn_up_exps\.weight +- \[ +256, +256, +2, +1\], type = +f32, "
                     r"converting to f16 \.\. size = +0\.50 MiB -> +0\.25 MiB", caplog.text)
    md = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "out.gguf").fields.items()}
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16) and md["general.quantization_version"] == 2


def test_worker_processes_give_the_same_file(files, tmp_path, monkeypatch):
    quantize(files["f16"], tmp_path / "one.gguf", "F32", threads=1)
    monkeypatch.setattr(stream, "POOL_MIN_ELEMENTS", 0)
    quantize(files["f16"], tmp_path / "two.gguf", "F32", threads=2)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


def test_bad_arguments(files, tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(QuantError, match="invalid ftype 'Q4_K_X'"):
        quantize(files["f32"], out, "Q4_K_X")
    with pytest.raises(QuantError, match=r"output directory .*missing does not exist"):
        quantize(files["f32"], tmp_path / "missing" / "out.gguf", "F16")
    with pytest.raises(QuantError, match="input and output files are the same"):
        quantize(files["f32"], files["f32"], "F16")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(QuantError, match=r"junk\.gguf: not a GGUF file \(magic b.not ., expected b.GGUF.\)$"):
        quantize(tmp_path / "junk.gguf", out, "F16")
    with pytest.raises(QuantError, match="no tensor type fallback is defined for type q1_0"):
        quantize(files["f32"], out, "Q1_0")  # ffn_down rows of 288: no 128-block, no fallback
    assert _no_output(tmp_path) and not (tmp_path / "missing").exists()


def test_imatrix_of_the_wrong_size(files, tmp_path):
    im = tiny_imatrix(SMALL)
    k = "blk.1.ffn_up_exps.weight"
    im.in_sum2[k], im.counts[k] = im.in_sum2[k][:1], im.counts[k][:1]  # one expert's worth
    path = write_imatrix_gguf(im, tmp_path / "bad-imatrix.gguf")
    with pytest.raises(ImatrixError, match=rf"bad-imatrix\.gguf: imatrix size 256 is different from tensor size 512 "
                                           rf"for {k} \(an imatrix of another model\?\)$"):
        quantize(files["f32"], tmp_path / "out.gguf", "Q4_K_M", imatrix=path)
    assert _no_output(tmp_path)


def _nan_model(tmp_path, name):
    return write_tiny_glm4moe(tmp_path / "nan.gguf", SMALL, nan_tensor=name)


@pytest.mark.parametrize("name,threads", [("blk.1.ffn_up_exps.weight", 1), ("blk.1.ffn_up_exps.weight", 2),
                                          ("blk.0.attn_norm.weight", 1)])
def test_non_finite_weights(tmp_path, monkeypatch, name, threads):
    """Converted and copied tensors are checked, as llama_model_loader (check_tensors) does; also in a worker."""
    monkeypatch.setattr(stream, "POOL_MIN_ELEMENTS", 0)
    with pytest.raises(QuantError, match=rf"^tensor '{re.escape(name)}' has invalid data"):
        quantize(_nan_model(tmp_path, name), tmp_path / "out.gguf", "F16", threads=threads)
    assert _no_output(tmp_path)


@pytest.mark.peer
def test_non_finite_error_matches_llama_quantize(tmp_path):
    model = _nan_model(tmp_path, "blk.1.ffn_up_exps.weight")
    proc, _ = llama_quantize(tmp_path, model, "F16")
    with pytest.raises(QuantError) as e:
        quantize(model, tmp_path / "out.gguf", "F16", threads=1)
    assert llama_error(proc) and str(e.value).startswith(llama_error(proc))


def test_requantizing_is_refused(tmp_path):
    def add(w):
        w.add_block_count(1)
        q8 = gguf.quants.quantize(np.ones((32, 256), np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    _write_gguf(tmp_path / "q8.gguf", add)
    with pytest.raises(QuantError, match="^requantizing from type q8_0 is disabled"):
        quantize(tmp_path / "q8.gguf", tmp_path / "out.gguf", "Q4_0")
    assert _no_output(tmp_path)


def test_mtp_tensors_without_imatrix_entries(files, tmp_path):
    msg = "Missing importance matrix for tensor blk.3.nextn.eh_proj.weight in a very low-bit quantization"
    with pytest.raises(QuantError) as e:
        quantize(files["f32"], tmp_path / "out.gguf", "IQ2_XXS", imatrix=files["imatrix_no_nextn"])
    assert str(e.value).startswith(msg) and "--mtp-fallback" in str(e.value)
    assert _no_output(tmp_path)


@pytest.mark.peer
def test_mtp_error_matches_llama_quantize(files, tmp_path):
    pattern = r"^(?!blk\.3\.nextn\.)=q8_0"  # all but the NextN tensors as q8_0: a faster llama-quantize run
    proc, _ = llama_quantize(tmp_path, files["f32"], "IQ2_XXS", "--imatrix", files["imatrix_no_nextn"],
                             "--tensor-type", pattern)
    with pytest.raises(QuantError) as e:
        quantize(files["f32"], tmp_path / "out.gguf", "IQ2_XXS", imatrix=files["imatrix_no_nextn"],
                 tensor_types=[pattern])
    assert llama_error(proc) and str(e.value).startswith(llama_error(proc))


def test_mtp_fallback(files, tmp_path, caplog):
    # all but the NextN tensors as q6_K (IQ2_XXS in NumPy is slow); those get llama.cpp's IQ2_XXS choice
    with caplog.at_level(logging.WARNING, logger="mtp_jax.quant.policy"):
        s = quantize(files["f32"], tmp_path / "out.gguf", "IQ2_XXS", imatrix=files["imatrix_no_nextn"],
                     tensor_types=[r"^(?!blk\.3\.nextn\.)=q6_K"], mtp_fallback="q8_0", threads=2)
    promoted = {"blk.3.nextn.eh_proj.weight", "blk.3.nextn.embed_tokens.weight", "blk.3.nextn.shared_head_head.weight"}
    assert set(s.mtp_promoted) == promoted and all(n in caplog.text for n in promoted)
    types = gguf_types(tmp_path / "out.gguf")
    assert all(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in promoted)
    assert types["blk.3.attn_q.weight"] == gguf.GGMLQuantizationType.Q6_K


def _parser():
    parser = argparse.ArgumentParser(prog="mtp-jax")
    add_quantize_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli(files, tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--help"])
    help_text = capsys.readouterr().out
    assert all(s in help_text for s in ("--mtp-fallback", "--tensor-type PATTERN=TYPE", "Q4_K_M", "IQ2_XXS", "COPY",
                                        "--leave-output-tensor", "--dry-run", "--include-weights NAME",
                                        "--exclude-weights NAME", "--allow-requantize", "--tensor-type-file FILE",
                                        "--keep-split"))

    args = parser.parse_args(["quantize", str(files["f16"]), str(tmp_path / "out.gguf"), "bf16", "--threads", "1",
                              "--output-tensor-type", "f16", "--tensor-type", "ffn_down=f32"])
    assert args.func(args) == 0
    assert "quant size" in capsys.readouterr().out
    types = gguf_types(tmp_path / "out.gguf")
    assert types["output.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.1.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.BF16  # not quantized default: no patterns
    args = parser.parse_args(["quantize", str(files["f16"]), str(tmp_path / "x.gguf"), "Q9"])
    with pytest.raises(QuantError, match="invalid ftype"):
        args.func(args)


def test_cli_options(files, tmp_path, capsys):
    parser = _parser()
    # IN FTYPE with --dry-run: nothing written
    args = parser.parse_args(["quantize", "--dry-run", str(files["f32"]), "q8_0"])
    assert args.output is None and args.func(args) == 0
    assert "dry run: 80 tensors as Q8_0, no file written" in capsys.readouterr().out

    # IN FTYPE otherwise: llama-quantize's ggml-model-<name>.gguf beside the input; --tensor-type-file entries
    model = tmp_path / "model.gguf"
    model.write_bytes(files["f16"].read_bytes())
    (tmp_path / "types.txt").write_text("ffn_down_exps=q4_0\n  attn_q=q4_0 ")
    args = parser.parse_args(["quantize", str(model), "7", "--threads", "1",  # 7: Q8_0
                              "--tensor-type-file", str(tmp_path / "types.txt"), "--tensor-type", "attn_q=f32"])
    assert args.tensor_type == ["ffn_down_exps=q4_0", "attn_q=q4_0", "attn_q=f32"]  # command-line order
    assert args.func(args) == 0
    types = gguf_types(tmp_path / "ggml-model-Q8_0.gguf")
    assert types["blk.1.ffn_down_exps.weight"] == types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0

    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", str(model), "x.gguf", "Q8_0", "--include-weights", "a",
                           "--exclude-weights", "b"])
    assert "not allowed with argument --include-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", str(model), "x.gguf", "Q8_0", "--tensor-type-file", str(tmp_path / "no")])
    assert "failed to open file" in capsys.readouterr().err
    # IN FTYPE NTHREADS and IN OUT FTYPE NTHREADS, as llama-quantize reads them
    for argv, out in [([str(model), "q8_0", "1"], tmp_path / "ggml-model-Q8_0.gguf"),
                      ([str(model), str(tmp_path / "o.gguf"), "Q8_0", "1"], tmp_path / "o.gguf")]:
        out.unlink(missing_ok=True)
        args = parser.parse_args(["quantize", *argv])
        assert args.func(args) == 0 and out.exists()
    for argv, msg in [([str(model), "q8_0", "x"], "invalid nthread 'x'"),
                      ([str(model), "q8_0", "2", "--threads", "1"], "NTHREADS 2 and --threads 1 disagree"),
                      ([str(model), "q8_0", "2", "3"], "unexpected argument '3'")]:
        args = parser.parse_args(["quantize", *argv])
        with pytest.raises(QuantError, match=msg):
            args.func(args)


def test_quantize_command_does_not_import_jax(tmp_path):
    """jax alone is ~145 MB of RSS, twice llama-quantize's peak: the quantize command imports it neither for a model
    no family of ours reads nor for one of our families, whose file is checked against its tensor table (the
    embedded model; a copy without one tensor fails with the same one line as in a process that has jax), and the
    compilation cache setting still reaches jax when a later command of the same process imports it."""
    import subprocess
    import sys

    from mtp_jax.cli import default_model
    from tests.io.gguf_mutants import drop, rewrite

    def add(w):
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.ones((4, 256), np.float32))

    _write_gguf(tmp_path / "in.gguf", add)
    model = Path(default_model())
    assert model.suffix == ".gguf", "the embedded model is not installed"
    bad = rewrite(model, tmp_path / "bad.gguf", tensors=drop("blk.1.attn_q.weight"))
    with pytest.raises(QuantError, match=r"bad\.gguf: missing tensor blk\.1\.attn_q\.weight$") as e:
        quantize(bad, tmp_path / "o.gguf", "Q8_0")
    runs = [("in.gguf", "out.gguf"), (str(model), "family.gguf"), ("bad.gguf", "o.gguf")]
    calls = ", ".join(f"main(['quantize', {str(tmp_path / i)!r}, {str(tmp_path / o)!r}, 'Q8_0'])" for i, o in runs)
    code = ("import sys; from mtp_jax.cli import main; "
            f"rcs = [{calls}]; "
            "print(rcs, 'jax' in sys.modules); import jax; print(jax.config.jax_compilation_cache_dir)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"MTP_JAX_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["[0, 0, 2] False", str(tmp_path / "jax")], proc.stdout + proc.stderr
    assert [x for x in proc.stderr.splitlines() if "error" in x] == [f"mtp-jax quantize: error: {e.value}"]
    assert (tmp_path / "out.gguf").stat().st_size > 0
    assert (tmp_path / "family.gguf").stat().st_size > 0
    assert _no_output(tmp_path, "o.gguf")
