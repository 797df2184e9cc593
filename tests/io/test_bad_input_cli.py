"""Issue 13 through ``main()``: each category of bad input ends in one line ``mtp-jax <command>: error: ...`` on
stderr that names the file and the key or tensor, exit code 2, no traceback."""

from __future__ import annotations

import logging
import os
import re
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from mtp_jax.cli import main
from mtp_jax.io.imatrix_gguf import write_imatrix_gguf
from tests.helpers import tiny_config
from tests.io.gguf_mutants import anatomy, drop, info_pos, nan_at, put, rewrite, value_pos
from tests.quant.tiny_glm4moe import tiny_imatrix, write_tiny_glm4moe

GLM = "glm4moe."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_glm4moe(tmp_path_factory.mktemp("bad-input") / "model.gguf", tiny_config(), "f16")


def fails(capsys, argv, pattern):
    """main(argv) exits 2 with one line, no traceback, matching ``pattern`` after the command's prefix."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if not line.startswith("\r")]  # quantize's progress bar, if any
    assert len(lines) == 2 and "Traceback" not in err, err
    assert re.fullmatch(rf"mtp-jax {argv[0]}: error: {pattern}", lines[0]), err


def edited(model, tmp_path, fn):
    """A copy of the model with fn(anatomy) -> bytes applied."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(fn(anatomy(model)))
    return path


def with_kv(model, tmp_path, key, *spec):
    return rewrite(model, tmp_path / "bad.gguf", kv={key: spec or None})


def test_binary_file_is_not_read_as_yaml(capsys, tmp_path):
    junk = tmp_path / "model.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    fails(capsys, ["info", junk], rf"{junk}: neither a GGUF file nor a YAML config \(UnicodeDecodeError: .*\)")
    fails(capsys, ["info", tmp_path / "x.gguf"], rf"{tmp_path}/x\.gguf: no such file")


def test_head_count_0(capsys, model, tmp_path):
    bad = with_kv(model, tmp_path, GLM + "attention.head_count", 0, V.UINT32)
    fails(capsys, ["info", bad],
          rf"{bad}: key glm4moe\.attention\.head_count = 0, expected a value in \[1, 4294967295\]")


@pytest.mark.parametrize("spec,found", [(("4", V.STRING), "STRING"), ((4.0, V.FLOAT32), "FLOAT32"),
                                        (([4, 4], V.ARRAY, V.UINT32), "ARRAY of UINT32")])
def test_block_count_of_another_type(capsys, model, tmp_path, spec, found):
    bad = with_kv(model, tmp_path, GLM + "block_count", *spec)
    fails(capsys, ["generate", "--model", bad], rf"{bad}: key glm4moe\.block_count holds {found}, expected an integer")


def test_head_count_array_of_strings(capsys, model, tmp_path):
    bad = with_kv(model, tmp_path, GLM + "attention.head_count", ["4"], V.ARRAY, V.STRING)
    fails(capsys, ["quantize", bad, tmp_path / "out.gguf", "Q8_0"],
          rf"{bad}: key glm4moe\.attention\.head_count holds ARRAY of STRING, expected an integer or an array of "
          rf"integers")
    assert not (tmp_path / "out.gguf").exists()


def test_duplicate_key(capsys, model, tmp_path):
    def dup(a):  # the second of two keys of one length renamed as the first
        keys = sorted(a.keys, key=len)
        first, second = next((k, m) for k, m in zip(keys, keys[1:]) if len(k) == len(m))
        return put(a.data, a.keys[second] + 8, f"{len(first)}s", first.encode())

    bad = edited(model, tmp_path, dup)
    fails(capsys, ["info", bad], rf"{bad}: key [\w.]+: duplicate key")


def test_huge_block_count(capsys, model, tmp_path):
    bad = with_kv(model, tmp_path, GLM + "block_count", 2**31, V.UINT32)
    fails(capsys, ["generate", "--model", bad],
          rf"{bad}: key glm4moe\.block_count = 2147483648, expected a value in \[1, 512\]")
    bad = with_kv(model, tmp_path, GLM + "block_count", 9, V.UINT32)
    fails(capsys, ["info", bad], rf"{bad}: key glm4moe\.block_count = 9 with 1 NextN layers makes 8 trunk layers, "
                                 r"but the file has tensors of 4 blocks")


def test_zero_dims(capsys, model, tmp_path):
    scalar = lambda n, d, t: (np.array(1.0, np.float32), Q.F32) if n == "output_norm.weight" else (d, t)  # noqa: E731
    bad = rewrite(model, tmp_path / "bad.gguf", tensors=scalar)
    fails(capsys, ["info", bad], rf"{bad}: tensor output_norm\.weight has shape \[\] \(numpy order\), expected \[64\]")
    other = rewrite(bad, tmp_path / "llama.gguf", arch="llama", kv={"llama.block_count": (4, V.UINT32)})
    # no tensor table for llama: quantized as llama-quantize would
    assert main(["quantize", str(other), str(tmp_path / "out.gguf"), "F16"]) == 0


def test_array_length_2_62(capsys, model, tmp_path):
    bad = edited(model, tmp_path, lambda a: put(a.data, value_pos(a, "tokenizer.ggml.tokens") + 8, "<Q", 2**62))
    fails(capsys, ["info", bad], rf"{bad}: key tokenizer\.ggml\.tokens: an array of {2**62} STRING items needs at "
                                 rf"least {8 * 2**62} bytes, \d+ are left in the file")


def test_fifo_and_device(capsys, model, tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    fails(capsys, ["generate", "--model", fifo], rf"{fifo}: expected a regular file, found a FIFO")
    fails(capsys, ["quantize", model, tmp_path / "out.gguf", "Q4_0", "--imatrix", fifo],
          rf"{fifo}: expected a regular file, found a FIFO")
    fails(capsys, ["info", "/dev/zero"], "/dev/zero: expected a regular file, found a device")


def test_nan_weights(capsys, model, tmp_path):
    bad = edited(model, tmp_path, lambda a: nan_at(a, "blk.1.ffn_up_exps.weight"))
    fails(capsys, ["generate", "--model", bad],
          rf"{bad}: tensor blk\.1\.ffn_up_exps\.weight contains non-finite values \(1 of them; first at flat index 3: "
          r"nan\)")
    assert main(["convert", str(bad), str(tmp_path / "copy.gguf"), "--outtype", "f16", "--no-check-finite"]) == 0
    fails(capsys, ["quantize", bad, tmp_path / "out.gguf", "Q8_0"],
          rf"tensor 'blk\.1\.ffn_up_exps\.weight' has invalid data \(NaN or Inf\) in {bad}")


def test_misaligned_offset(capsys, model, tmp_path):
    def shift(a):
        pos = info_pos(a, "blk.0.attn_k.weight")["offset"]
        return put(a.data, pos, "<Q", struct.unpack_from("<Q", a.data, pos)[0] + 2)

    bad = edited(model, tmp_path, shift)
    fails(capsys, ["info", bad], rf"{bad}: tensor blk\.0\.attn_k\.weight: data offset (\d+), expected (?!\1)\d+: the "
                                 r"end of blk\.0\.attn_q\.weight \(F16 \[64, 64\]: 8192 bytes\), padded to 32")


def test_relabelled_tensor(capsys, model, tmp_path):
    relabel = lambda name, q: lambda a: put(a.data, info_pos(a, name)["type"], "<I", int(q))  # noqa: E731
    bad = edited(model, tmp_path, relabel("blk.0.ffn_up.weight", Q.Q8_0))
    fails(capsys, ["info", bad], rf"{bad}: tensor blk\.0\.ffn_down\.weight: data offset \d+, expected \d+: the end of "
                                 r"blk\.0\.ffn_up\.weight \(Q8_0 \[64, 128\]: 8704 bytes\), padded to 32")
    bad = edited(model, tmp_path, relabel("blk.0.ffn_up.weight", Q.IQ2_XXS))
    fails(capsys, ["info", bad], rf"{bad}: tensor blk\.0\.ffn_up\.weight: type IQ2_XXS needs rows of a multiple of 256 "
                                 r"elements, the shape \[64, 128\] has rows of 64")
    a = anatomy(model)
    last = max(a.infos, key=a.infos.get)
    bad = edited(model, tmp_path, relabel(last, Q.Q8_0))
    fails(capsys, ["quantize", bad, tmp_path / "out.gguf", "Q8_0"],
          rf"{bad}: \d+ bytes follow the data of the last tensor \({re.escape(last)}\), expected none: a tensor's "
          r"type or shape does not match its data")


def test_nextn_layers_disagree_with_the_tensors(capsys, model, tmp_path):
    bad = with_kv(model, tmp_path, GLM + "nextn_predict_layers", 0, V.UINT32)
    fails(capsys, ["info", bad], rf"{bad}: unexpected tensor blk\.3\.nextn\.\w+\.weight: not part of a glm4moe model "
                                 r"of 4 trunk and 0 NextN layers; nextn_predict_layers = 0 makes blk\.3 a trunk layer")


def test_missing_eh_proj(capsys, model, tmp_path):
    bad = rewrite(model, tmp_path / "bad.gguf", tensors=drop("blk.3.nextn.eh_proj.weight"))
    fails(capsys, ["generate", "--model", bad],
          rf"{bad}: missing tensor blk\.3\.nextn\.eh_proj\.weight \(the NextN block's other tensors are there\)")


def _imatrix(tmp_path, edit=None):
    data = tiny_imatrix(tiny_config())
    if edit:
        edit(data)
    return write_imatrix_gguf(data, tmp_path / "imatrix.gguf")


def test_imatrix_of_another_model(capsys, model, tmp_path):
    def rename(d):
        d.in_sum2["blk.7.attn_q.weight"] = d.in_sum2.pop("blk.0.attn_q.weight")
        d.counts["blk.7.attn_q.weight"] = d.counts.pop("blk.0.attn_q.weight")

    im = _imatrix(tmp_path, rename)
    fails(capsys, ["quantize", model, tmp_path / "out.gguf", "Q4_0", "--imatrix", im],
          rf"{im}: imatrix entry blk\.7\.attn_q\.weight is not a tensor of the model \(an imatrix of another model\?\)")
    assert not (tmp_path / "out.gguf").exists()


def test_imatrix_entry_of_the_wrong_length(capsys, model, tmp_path):
    def shorten(d):
        d.in_sum2["blk.0.attn_q.weight"] = d.in_sum2["blk.0.attn_q.weight"][:, :32]

    im = _imatrix(tmp_path, shorten)
    fails(capsys, ["quantize", model, tmp_path / "out.gguf", "Q4_0", "--imatrix", im],
          rf"{im}: imatrix size 32 is different from tensor size 64 for blk\.0\.attn_q\.weight \(an imatrix of another "
          r"model\?\)")


@pytest.mark.parametrize("suffix,what", [(".counts", "counts"), (".in_sum2", "sums")])
def test_negative_imatrix_values(capsys, model, tmp_path, suffix, what):
    im = _imatrix(tmp_path)
    a = anatomy(im)
    name = f"blk.0.attn_q.weight{suffix}"
    im.write_bytes(put(a.data, a.tensor_data[name][0], "<f", -2.0))
    fails(capsys, ["quantize", model, tmp_path / "out.gguf", "Q4_0", "--imatrix", im],
          rf"{im}: imatrix tensor {re.escape(name)} contains negative value -2\.0 \(expected finite values >= 0\)")


def test_partial_imatrix_is_a_warning_listing_the_missing(capsys, caplog, model, tmp_path):
    def partial(d):
        for k in ("blk.3.nextn.eh_proj.weight", "blk.1.ffn_up_exps.weight"):
            del d.in_sum2[k], d.counts[k]

    im = _imatrix(tmp_path, partial)
    with caplog.at_level(logging.WARNING, logger="mtp_jax.quant.gguf_quantize"):
        assert main(["quantize", str(model), str(tmp_path / "out.gguf"), "Q4_0", "--imatrix", str(im)]) == 0
    assert (f"imatrix {im} has no entries for 2 tensor(s) quantized here: blk.1.ffn_up_exps.weight, "
            "blk.3.nextn.eh_proj.weight") in caplog.text


def test_imatrix_text_file_is_checked_before_the_model_loads(capsys, tmp_path):
    fails(capsys, ["imatrix", "-m", tmp_path / "no-model.gguf", "-f", tmp_path / "missing.txt"],
          rf"{tmp_path}/missing\.txt: no such file")


def test_quantize_of_a_truncated_file(capsys, model, tmp_path):
    bad = edited(model, tmp_path, lambda a: a.data[:-1000])
    fails(capsys, ["quantize", bad, tmp_path / "out.gguf", "Q8_0"],
          rf"{bad}: truncated: tensor output\.weight needs bytes up to \d+, the file has \d+")
    assert not list(tmp_path.glob("*out.gguf*"))
