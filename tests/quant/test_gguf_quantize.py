"""quantize_gguf (mtp_jax.quant.gguf_quantize) and the quantize command, against llama-quantize."""

from __future__ import annotations

import argparse
import logging
import re

import gguf
import numpy as np
import pytest

from mtp_jax.io.imatrix_gguf import write_imatrix_gguf
from mtp_jax.quant import gguf_quantize
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
    """quantize_gguf, skipping the test when a per-type quantizer is not registered yet."""
    try:
        return quantize_gguf(*args, progress=False, **kw)
    except QuantError as e:
        if str(e).startswith("no quantizer for ggml type"):
            pytest.skip(f"per-type quantizer missing: {e}")
        raise


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
]


def _cli_options(kw: dict, imatrix) -> list:
    cli = []
    for k, v in kw.items():
        if k == "tensor_types":
            cli += [a for s in v for a in ("--tensor-type", s)]
        else:
            cli += ["--" + k.replace("_", "-"), imatrix if k == "imatrix" else v]
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
    if (tmp_path / "out.gguf").read_bytes() != ref.read_bytes():
        a, b = gguf.GGUFReader(tmp_path / "out.gguf"), gguf.GGUFReader(ref)
        differ = [t.name for t, u in zip(a.tensors, b.tensors) if not np.array_equal(t.data, u.data)]
        pytest.fail(f"{ftype}: tensors differ from llama-quantize's: {differ}")


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
    monkeypatch.setattr(gguf_quantize, "POOL_MIN_ELEMENTS", 0)
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
    with pytest.raises(QuantError, match="not a valid GGUF file"):
        quantize(tmp_path / "junk.gguf", out, "F16")
    with pytest.raises(QuantError, match="no tensor type fallback is defined for type q1_0"):
        quantize(files["f32"], out, "Q1_0")  # ffn_down rows of 288: no 128-block, no fallback
    assert _no_output(tmp_path) and not (tmp_path / "missing").exists()


def test_imatrix_of_the_wrong_size(files, tmp_path):
    im = tiny_imatrix(SMALL)
    k = "blk.1.ffn_up_exps.weight"
    im.in_sum2[k], im.counts[k] = im.in_sum2[k][:1], im.counts[k][:1]  # one expert's worth
    path = write_imatrix_gguf(im, tmp_path / "bad-imatrix.gguf")
    with pytest.raises(QuantError, match=rf"^imatrix size 256 is different from tensor size 512 for {k}$"):
        quantize(files["f32"], tmp_path / "out.gguf", "Q4_K_M", imatrix=path)
    assert _no_output(tmp_path)


def _nan_model(tmp_path, name):
    return write_tiny_glm4moe(tmp_path / "nan.gguf", SMALL, nan_tensor=name)


@pytest.mark.parametrize("name,threads", [("blk.1.ffn_up_exps.weight", 1), ("blk.1.ffn_up_exps.weight", 2),
                                          ("blk.0.attn_norm.weight", 1)])
def test_non_finite_weights(tmp_path, monkeypatch, name, threads):
    """Converted and copied tensors are checked, as llama_model_loader (check_tensors) does; also in a worker."""
    monkeypatch.setattr(gguf_quantize, "POOL_MIN_ELEMENTS", 0)
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
    w = gguf.GGUFWriter(str(tmp_path / "q8.gguf"), "llama")
    w.add_block_count(1)
    q8 = gguf.quants.quantize(np.ones((32, 256), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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


def test_cli(files, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mtp-jax")
    add_quantize_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--help"])
    help_text = capsys.readouterr().out
    assert all(s in help_text for s in ("--mtp-fallback", "--tensor-type PATTERN=TYPE", "Q4_K_M", "IQ2_XXS"))

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
