"""Tokenizers from GGUF metadata: our ids equal llama-tokenize's, and the metadata round-trips."""

from __future__ import annotations

import json
import re

import gguf
import pytest
from gguf import TokenType

from mtp_jax.io.gguf import open_gguf, write_gguf
from mtp_jax.io.tokenizer import Tokenizer, TokenizerError, tiny_bpe, tiny_spm
from tests.helpers import tiny_config, tiny_params

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   multiple   spaces  ",
    "line one\nline two\n\n\ttabbed\r\nend",
    "numbers 1 12 123 1234 12345 3.14 and 1,000",
    "it's they're we've I'LL You'd",
    "naïve café — “quotes” ü 日本語 🦙🚀 ÿ",
    "the weather in the northern valley was information",
    "!!!???...---@@@ ``` \\n",
]
SPECIAL = "<|user|>hi [gMASK]<sop><|endoftext|>"


def test_tiny_bpe_is_deterministic(tok):
    again = tiny_bpe(tok.vocab_size)
    assert again.to_dict() == tok.to_dict()
    assert tok.tokens[0] == "<|endoftext|>" and tok.eos_id == 0
    assert sum(t == TokenType.CONTROL for t in tok.token_types) == 10 and len(tok.merges) > 200


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_are_used(tok):
    assert [tok.tokens[i] for i in tok.encode(" the weather")] == ["\u0120the", "\u0120weat", "her"]


def test_special_tokens(tok):
    plain = tok.encode(SPECIAL)
    parsed = tok.encode(SPECIAL, parse_special=True)
    assert tok.tokens.index("<|user|>") not in plain
    assert parsed[0] == tok.tokens.index("<|user|>") and parsed[-1] == tok.eos_id
    assert tok.decode(parsed) == "hi "  # CONTROL tokens print only with special=True (llama token_to_piece)
    assert tok.decode(parsed, special=True) == SPECIAL


def test_gguf_metadata_round_trip_with_padding(tmp_path):
    """A tokenizer smaller than the model's vocab is padded with UNUSED [PAD{i}] tokens (convert_hf_to_gguf's
    get_vocab_base); the SentencePiece kind keeps its scores and space-prefix flag."""
    cfg = tiny_config()
    for t in (tiny_bpe(300), tiny_spm()):
        path = write_gguf(tmp_path / f"{t.model}.gguf", cfg, tiny_params(), tokenizer=t)
        back = Tokenizer.from_gguf(open_gguf(path))
        assert back.vocab_size == cfg.vocab_size and back.tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
        assert back.token_types[t.vocab_size:] == [int(TokenType.UNUSED)] * (cfg.vocab_size - t.vocab_size)
        assert back.tokens[: t.vocab_size] == t.tokens and back.merges == t.merges
        for text in TEXTS:
            assert back.encode(text) == t.encode(text)


def test_spm(tmp_path):
    t = tiny_spm()
    ids = t.encode("the thing is in the ZEBRA ñ")
    assert ids[0] == t.bos_id  # add_bos
    assert t.tokens[ids[1]] == "\u2581the" and t.tokens.index("<0xC3>") in ids  # merges; byte fallback for ñ
    assert t.decode(ids) == " the thing is in the ZEBRA ñ"  # token_to_piece keeps the prefix space


def test_hf_tokenizer_json_round_trip(tmp_path, tok):
    tok.save_hf(tmp_path)
    back = Tokenizer.from_hf(tmp_path)
    assert back.tokens == tok.tokens and back.merges == tok.merges and back.pre == "glm4"
    assert back.token_types == tok.token_types and back.eos_id == tok.eos_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_bad_tokenizers():
    t = tiny_bpe(300)
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'nope'"):
        Tokenizer(**t.to_dict() | {"pre": "nope"})
    with pytest.raises(TokenizerError, match="unsupported tokenizer model 'bert'"):
        Tokenizer(**t.to_dict() | {"model": "bert"})
    with pytest.raises(TokenizerError, match=re.escape(f"token {t.tokens[20]!r} is both id 20 and id 30 (llama.cpp")):
        Tokenizer(**t.to_dict() | {"tokens": t.tokens[:30] + t.tokens[20:21] + t.tokens[31:]})
    with pytest.raises(TokenizerError, match="eos_id 999 is outside"):
        Tokenizer(**t.to_dict() | {"eos_id": 999})
    with pytest.raises(TokenizerError, match="more than the model's vocab_size 10"):
        t.add_to_gguf(None, 10)


def test_empty_tokens_are_named_as_llama_cpp_names_them(tmp_path):
    t = tiny_bpe(300)
    tokens = t.tokens[:40] + ["", ""] + t.tokens[42:]
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "glm4moe")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([m for m in t.merges if t.tokens[40] not in m.split() and t.tokens[41] not in m.split()])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "v.gguf"))
    assert back.tokens[40:42] == ["[EMPTY_40]", "[EMPTY_41]"] and back.pre == "default"


def test_merges_outside_the_vocabulary_are_ignored_with_a_warning(caplog):
    """A damaged merges list (a part or the merged text not a token, no space) loads, as in llama.cpp."""
    t = tiny_bpe(300)
    damaged = Tokenizer(**t.to_dict() | {"merges": ["\u0120x zz", *t.merges, "nospace", "\u0120 t\u0120"]})
    assert "3 of" in caplog.text and "merges name text outside the vocabulary" in caplog.text
    assert all(damaged.encode(text) == t.encode(text) for text in TEXTS)


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["glm4", "gpt-2", "qwen2", "default", "spm"])
def test_ids_equal_llama_tokenize(peer, tmp_path, kind):
    t = tiny_spm() if kind == "spm" else tiny_bpe(tiny_config().vocab_size, pre=kind)
    path = write_gguf(tmp_path / f"{kind}.gguf", tiny_config(), tiny_params(), tokenizer=t)
    for text in TEXTS:
        assert peer.tokenize(path, text, tmp=tmp_path) == t.encode(text), text
    assert peer.tokenize(path, SPECIAL, parse_special=True, tmp=tmp_path) == t.encode(SPECIAL, parse_special=True)
    assert peer.tokenize(path, SPECIAL, tmp=tmp_path) == t.encode(SPECIAL)
