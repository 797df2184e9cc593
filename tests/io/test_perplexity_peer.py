"""``mtp-jax perplexity`` vs llama-perplexity (issue 17, must-show 2) on the embedded trained model, its Q4_K_M and
IQ4_XS quantizations (our quantizer) and a Python text it was not trained on, both tools with the same -c, -b, --chunks
(llama.cpp: f32 KV cache, flash attention off, 2 threads, no weight repacking). The F16 model's perplexity equals
llama.cpp's, the quantized ones' are within 1 %; the logits files of the two tools are interchangeable (each reads
the other's, KLD ~0); bad input ends in one line, exit 2."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

from mtp_jax import cli
from mtp_jax import perplexity as PP
from mtp_jax.cli import EMBEDDED_MODEL
from tests.io import test_imatrix_peer

text = test_imatrix_peer.text  # the same fixture: json.decoder + json.encoder source, 7,675 tokens here

CTX, BATCH, CHUNKS = 256, 1024, 8  # 8 chunks, 4 per forward
LLAMA = ["-c", CTX, "-b", BATCH, "-t", 2, "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-repack"]
QUANTS = ("Q4_K_M", "IQ4_XS")


def ours(*args) -> str:
    """cli.main(["perplexity", ...]) must succeed; its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["perplexity", *map(str, args)])
    assert rc == 0, err.getvalue()
    return out.getvalue()


def llama(peer, *args, kld: bool = False) -> str:
    """llama-perplexity's stdout + stderr (its running values go to stdout, its final estimate to stderr)."""
    # the KLD statistics' last lines (the per-chunk table's header also says "Same top p"): llama.cpp's
    # asynchronous logger sometimes loses the tail of its output, and run_until runs it again then
    done = (lambda p: b"Same top p:" in p.stdout or "Same top p:" in p.stderr) if kld else (
        lambda p: "Final estimate" in p.stderr)
    p = peer.run_until("llama-perplexity", *args, *LLAMA, ok=done)
    return p.stdout.decode() + p.stderr


def final(out: str) -> tuple[float, float]:
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    assert m, out[-2000:]
    return float(m.group(1)), float(m.group(2))


def running(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", out)]


def stat(out: str, name: str) -> float:
    m = re.search(re.escape(name) + r"\s*:\s*(-?[\d.]+)", out)
    assert m, f"{name!r} not in:\n{out[-3000:]}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def ours_f16(text, io_dir):
    base = io_dir / "ppl-base-ours.bin"
    return ours("-m", EMBEDDED_MODEL, "-f", text, "-c", CTX, "-b", BATCH, "--chunks", CHUNKS,
                "--kl-divergence-base", base), base


@pytest.fixture(scope="module")
def llama_f16(peer, text, io_dir):
    base = io_dir / "ppl-base-llama.bin"
    return llama(peer, "-m", EMBEDDED_MODEL, "-f", text, "--chunks", CHUNKS, "--kl-divergence-base", base), base


@pytest.fixture(scope="module")
def quantized(io_dir):
    """{ftype: path}: the embedded model through `mtp-jax quantize`."""
    paths = {q: io_dir / f"embedded-{q}.gguf" for q in QUANTS}
    for q, path in paths.items():
        with contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["quantize", str(EMBEDDED_MODEL), str(path), q, "2"]) == 0
    return paths


@pytest.mark.peer
def test_f16_perplexity_and_logits_file_equal_llama_perplexitys(ours_f16, llama_f16):
    (out, base), (theirs, their_base) = ours_f16, llama_f16
    assert len(running(out)) == CHUNKS and len(running(theirs)) == CHUNKS
    np.testing.assert_allclose(running(out), running(theirs), rtol=1e-3)
    np.testing.assert_allclose(final(out), final(theirs), rtol=1e-3)
    a, b = base.read_bytes(), their_base.read_bytes()
    head = 8 + 12 + 4 * CTX * CHUNKS
    assert len(a) == len(b) and a[:head] == b[:head]  # same header, same tokens


@pytest.mark.peer
def test_llama_perplexity_reads_our_logits_file(peer, ours_f16):
    out, base = ours_f16
    theirs = llama(peer, "-m", EMBEDDED_MODEL, "--kl-divergence-base", base, "--kl-divergence", kld=True)
    assert abs(stat(theirs, "Mean    KLD")) < 1e-5 and stat(theirs, "Same top p") > 99.9
    assert stat(theirs, "Mean PPL(base)") == pytest.approx(final(out)[0], rel=1e-4)  # what it read of ours


@pytest.mark.peer
def test_our_kld_against_llamas_logits_file_and_our_own_is_zero(ours_f16, llama_f16):
    for base in (llama_f16[1], ours_f16[1]):
        out = ours("-m", EMBEDDED_MODEL, "--kl-divergence-base", base, "--kl-divergence", "-b", BATCH)
        assert out.startswith(PP.KLD_TABLE_HEAD) and len(re.findall(r"^ +\d+ +\d", out, re.M)) == CHUNKS
        assert abs(stat(out, "Mean    KLD")) < 1e-5 and stat(out, "Same top p") > 99.9
        assert abs(stat(out, "Mean ln(PPL(Q)/PPL(base))")) < 1e-4
        assert stat(out, "Mean PPL(Q)") == pytest.approx(final(ours_f16[0])[0], rel=1e-6)


@pytest.mark.peer
@pytest.mark.parametrize("ftype", QUANTS)
def test_quantized_perplexity_is_within_1_percent_of_llama_perplexitys(peer, quantized, text, llama_f16, io_dir,
                                                                       ftype):
    model, their_base = quantized[ftype], io_dir / f"ppl-base-llama-{ftype}.bin"
    theirs = llama(peer, "-m", model, "-f", text, "--chunks", CHUNKS, "--kl-divergence-base", their_base)
    out = ours("-m", model, "-f", text, "-c", CTX, "-b", BATCH, "--chunks", CHUNKS)
    assert final(out)[0] == pytest.approx(final(theirs)[0], rel=0.01)
    # and the quantized weights are what both tools ran: on the same file the two differ far less than the file
    # differs from its F16 original
    quant_cost = llama(peer, "-m", model, "--kl-divergence-base", llama_f16[1], "--kl-divergence", kld=True)
    tools = ours("-m", model, "--kl-divergence-base", their_base, "--kl-divergence", "-b", BATCH)
    assert stat(tools, "Mean    KLD") < 0.5 * stat(quant_cost, "Mean    KLD")


def _fails(capsys, *args) -> str:
    """cli.main(["perplexity", ...]) exits 2 with one line on stderr, no traceback; that line."""
    assert cli.main(["perplexity", *map(str, args)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mtp-jax perplexity: error: "), err
    return err[0]


def test_missing_empty_and_short_texts(capsys, tmp_path, text):
    assert _fails(capsys, "-f", tmp_path / "none.txt").endswith(f"{tmp_path / 'none.txt'}: no such file")
    (tmp_path / "empty.txt").write_text("\n")
    assert _fails(capsys, "-f", tmp_path / "empty.txt").endswith(f"{tmp_path / 'empty.txt'}: empty text file")
    assert _fails(capsys, "-m", EMBEDDED_MODEL, "-f", text, "-c", 4096).endswith(
        "you need at least 8192 tokens to evaluate perplexity with a context of 4096; the text tokenizes to only "
        "7675 tokens")  # one trailing newline dropped, as llama.cpp -f
    assert "give --kl-divergence-base FILE" in _fails(capsys, "--kl-divergence")
    assert "below -c 256 or a multiple of it" in _fails(capsys, "-m", EMBEDDED_MODEL, "-f", text, "-c", CTX,
                                                        "-b", 1000)


def test_bad_logits_files(capsys, tmp_path, ours_f16, text):
    good = ours_f16[1].read_bytes()
    bad = tmp_path / "bad.bin"
    kld = ["-m", EMBEDDED_MODEL, "--kl-divergence-base", bad, "--kl-divergence"]
    bad.write_bytes(good[:12] + np.int32(4000).tobytes() + good[16:])
    assert _fails(capsys, *kld).endswith(f"{bad}: logits of a vocabulary of 4000 tokens, the model has 4096")
    bad.write_bytes(good[:-7])
    assert re.search(rf"{bad}: \d+ bytes, but its header \(n_ctx 256, n_vocab 4096, n_chunk 8\) makes \d+ "
                     r"\(truncated\)$", _fails(capsys, *kld))
    bad.write_bytes(good)
    assert _fails(capsys, *kld, "-c", 128).endswith(f"{bad}: computed with a context of 256, not -c 128 (leave out -c)")
    other = tmp_path / "other.txt"
    other.write_text("x = 1\n" + text.read_text())
    assert _fails(capsys, *kld, "-f", other).endswith(f"{bad}: its tokens are not those of {other}")
