"""Orbax checkpoints (exact round trip), load_model's dispatch, and the convert / info subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from mtp_jax.io.cli import add_io_parsers
from mtp_jax.io.load import load_model, source_kind
from mtp_jax.io.orbax import OrbaxError, load_orbax, save_orbax
from mtp_jax.qweight import float_arrays
from tests.helpers import tiny_config, tiny_params


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mtp-jax")
    add_io_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_orbax_round_trip_is_exact(tmp_path, tok):
    cfg, params = tiny_config(), tiny_params()
    save_orbax(tmp_path / "ck", cfg, params, tok)
    cfg2, p2, tok2 = load_orbax(tmp_path / "ck")
    assert cfg2 == cfg and tok2.to_dict() == tok.to_dict()
    assert_same(params, p2)
    bf = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    save_orbax(tmp_path / "bf", cfg.replace(dtype="bfloat16"), bf)
    cfg3, p3, tok3 = load_orbax(tmp_path / "bf")
    assert cfg3.dtype == "bfloat16" and tok3 is None
    assert_same(bf, p3)
    _, p4, _ = load_orbax(tmp_path / "ck", load_mtp=False)
    assert_same(dataclasses.replace(params, nextn=None), p4)


def test_orbax_bad_input(tmp_path):
    cfg, params = tiny_config(), tiny_params()
    with pytest.raises(OrbaxError, match="not an mtp_jax checkpoint"):
        load_orbax(tmp_path)
    with pytest.raises(OrbaxError, match=r"param final_norm has shape \(3,\)"):
        save_orbax(tmp_path / "bad", cfg, dataclasses.replace(params, final_norm=params.final_norm[:3]))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    save_orbax(tmp_path / "ck", cfg, params)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg.replace(hidden_size=32).to_dict()))
    with pytest.raises(OrbaxError, match=r"ck: param embed has shape \(512, 64\), the config needs \(512, 32\)"):
        load_orbax(tmp_path / "ck")


def test_load_model_dispatch(tmp_path, tiny_gguf, hf_dir):
    path, cfg, params = tiny_gguf
    for spec, kind in [(path, "gguf"), (hf_dir[0], "hf"), ("glm4moe-tiny", "config")]:
        assert source_kind(spec) == kind
    c, p, t = load_model(path)
    assert c == cfg and t.vocab_size == cfg.vocab_size
    assert_same(params, float_arrays(p))  # with the CPU kernels, float matrices load as GGUF rows
    c, p, t = load_model(hf_dir[0], load_mtp=False)
    assert p.nextn is None and t is not None
    save_orbax(tmp_path / "ck", cfg, params)
    assert source_kind(tmp_path / "ck") == "orbax"
    assert load_model(tmp_path / "ck", dtype="bfloat16")[1].embed.dtype == ml_dtypes.bfloat16
    c, p, t = load_model("glm4moe-tiny", seed=1)
    assert c.name == "glm4moe-tiny" and t is None and p.nextn is not None
    with pytest.raises(ValueError, match="no such file"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="neither an HF checkpoint"):
        load_model(tmp_path)


def test_cli_convert_and_info(tmp_path, tiny_gguf, hf_dir, capsys):
    src = tiny_gguf[0]
    assert cli("convert", src, tmp_path / "ck") == 0  # -> orbax
    assert cli("convert", tmp_path / "ck", tmp_path / "back.gguf", "--outtype", "f32") == 0
    assert src.read_bytes() == (tmp_path / "back.gguf").read_bytes()  # GGUF -> orbax -> GGUF is byte-exact
    assert cli("convert", hf_dir[0], tmp_path / "nomtp.gguf", "--no-mtp", "--outtype", "f16") == 0
    capsys.readouterr()
    assert cli("info", tmp_path / "nomtp.gguf", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["arch"] == "glm4moe" and d["nextn_present"] is False and d["config"]["num_nextn_predict_layers"] == 0
    assert set(d["tensor_types"]) == {"F16", "F32"}
    assert cli("info", src) == 0
    out = capsys.readouterr().out
    assert "NextN layer    present" in out and "F32: 70" in out and "nextn_total" in out
    for target in (hf_dir[0], tmp_path / "ck"):
        assert cli("info", target, "--json") == 0
        assert json.loads(capsys.readouterr().out)["nextn_present"] is True
    with pytest.raises(ValueError, match="exists"):
        cli("convert", src, tmp_path / "ck")
    assert cli("convert", "glm4moe-tiny", tmp_path / "ck", "--force", "--dtype", "bfloat16") == 0
    assert load_model(tmp_path / "ck")[0].dtype == "bfloat16"
