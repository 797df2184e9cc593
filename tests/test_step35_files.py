"""Step-3.5 model files (issue 15): trunk-only and MTP-only GGUFs (llama.cpp's converter --no-mtp / --mtp),
``--mtp-head`` attaching a head file to a trunk file, and the MTP tensors left unread by plain decoding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtp_jax import cli, speculative
from mtp_jax import params as P
from mtp_jax.config import load_config
from mtp_jax.io import gguf as G
from mtp_jax.io.load import load_model
from mtp_jax.io.table import stacks

CFG = load_config("step35-tiny")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("step35")
    params = P.init(jax.random.key(1), CFG, std=0.08)
    paths = {part: d / f"{part}.gguf" for part in ("all", "trunk", "mtp")}
    for part, path in paths.items():
        G.write_gguf(path, CFG, params, part=part)
    return paths


def _same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_mtp_only_file_holds_the_heads_and_the_shared_tensors_only(files):
    cfg, params = G.read_gguf(files["mtp"])
    assert cfg == CFG
    assert all(getattr(params, attr) is None for attr, _, _ in stacks(cfg))
    assert len(params.nextn) == 3 and params.embed is not None and params.lm_head is not None
    names = {t.name for t in G.open_gguf(files["mtp"]).tensors}
    assert not any(n.startswith(f"blk.{b}.") for n in names for b in range(CFG.num_hidden_layers))
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.5.nextn.eh_proj.weight",
            "blk.7.nextn.hnorm.weight"} <= names


def test_mtp_head_file_beside_a_trunk_file_equals_the_combined_file(files):
    cfg_all, p_all, _ = load_model(files["all"])
    cfg, params, _ = load_model(files["trunk"], mtp_head=files["mtp"])
    assert cfg == cfg_all and _same(params, p_all)
    for K in (1, 3):
        a = speculative.generate(p_all, cfg_all, PROMPTS, num_draft=K, max_new_tokens=10)
        b = speculative.generate(params, cfg, PROMPTS, num_draft=K, max_new_tokens=10)
        assert a.tokens == b.tokens


def test_mtp_head_for_another_trunk_is_one_clear_line(files, tmp_path, capsys):
    other = CFG.replace(sliding_window=3)
    G.write_gguf(tmp_path / "mtp.gguf", other, P.init(jax.random.key(0), other), part="mtp")
    assert cli.main(["generate", "-m", str(files["trunk"]), "-md", str(tmp_path / "mtp.gguf"), "-K", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different trunk" in err and "Traceback" not in err


@pytest.mark.parametrize("K, reads_heads", [(0, False), (2, True)])
def test_plain_decoding_leaves_the_mtp_tensors_unread(files, monkeypatch, capsys, K, reads_heads):
    """The loader copies every tensor it loads through _source (floats) or _raw (kept quantized): record them."""
    read: list[str] = []
    for fn in ("_source", "_raw"):
        orig = getattr(G, fn)
        monkeypatch.setattr(G, fn, lambda mm, t, orig=orig: read.append(t.name) or orig(mm, t))
    args = ["generate", "-m", str(files["all"]), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--repeats", "1",
            "-K", str(K)]
    assert cli.main(args) == 0
    heads = [n for n in read if any(n.startswith(f"blk.{CFG.num_hidden_layers + k}.") for k in range(3))]
    assert "blk.0.attn_q.weight" in read and "output.weight" in read
    assert bool(heads) == reads_heads
    assert ("MTP speculative" in capsys.readouterr().out) == reads_heads
