"""Every byte-level pre-tokenizer llama.cpp's loader accepts: our table is llama.cpp's (names, flags, regexes, read
from src/llama-vocab.cpp), and a GGUF with each tokenizes like llama-tokenize on multilingual text with digits,
punctuation and whitespace runs."""

from __future__ import annotations

import ast
import json
import re

import gguf
import pytest
from gguf import TokenType
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from mtp_jax.io.pre_tokenizers import NOT_BYTE_LEVEL, PRE_TOKENIZERS
from mtp_jax.io.tokenizer import Tokenizer, TokenizerError

TEXT = ("Hello, World! It's 2025-07-28: GLM-4.5 has 355B params (32B active)...  x=1234567 y=3.14159; z=1,000,000\n\n"
        "\tTabs\tand   spaces   \r\nÜnïcödé café naïve — “quotes” «guillemets» ¿Qué? ¡Sí! e\u0301 0x1F\n"
        "日本語のテキスト、中文文本。한국어 텍스트! Русский текст, ελληνικά; עברית العربية ١٢٣٤ हिन्दी ภาษาไทย\n"
        "emoji 🦙🚀  CamelCaseWord snake_case_word HTTPServer I'M YOU'LL we'd they've   \n"
        "It'sn't done in 12 days, `code`, ok!\n    def f(x):\n"
        "        return x**2 + y//3  # comment <sentinel:12> IMGIMGABZ\n\n\n   ")
# one name per distinct behaviour; the other names are checked against llama.cpp's table below
NAMES = sorted({p: n for n, p in sorted(PRE_TOKENIZERS.items(), reverse=True)}.values())


@pytest.fixture(scope="module")
def bpe() -> tuple[list[str], list[str]]:
    """(tokens, merges): a byte-level BPE trained without pre-splitting on every 3, 5 and 8 character window of
    TEXT and on its words, so its merges cross letters, digits, punctuation and whitespace: a piece boundary drawn
    anywhere else than llama.cpp draws it changes the ids."""
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    b.train_from_iterator([TEXT[i: i + n] for n in (3, 5, 8) for i in range(len(TEXT))] + TEXT.split() * 3, trainer)
    model = json.loads(b.to_str())["model"]
    inv = {i: s for s, i in model["vocab"].items()}
    return [inv[i] for i in range(len(inv))], [" ".join(m) for m in model["merges"]]


def _tokenizer(bpe, pre: str) -> Tokenizer:
    tokens, merges = bpe
    types = [int(TokenType.CONTROL)] + [int(TokenType.NORMAL)] * (len(tokens) - 1)
    return Tokenizer(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre, bos_id=0, eos_id=0)


def _vocab_gguf(path, tok: Tokenizer, add_bos_key: bool = True):
    """A vocabulary-only GGUF (llama-tokenize loads vocab_only); without the add_bos key when asked."""
    w = gguf.GGUFWriter(path, "glm4moe")
    if not add_bos_key:
        w.add_add_bos_token = lambda _: None
    tok.add_to_gguf(w)
    w.add_bos_token_id(tok.bos_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.peer
@pytest.mark.parametrize("pre", NAMES)
def test_tokenizes_like_llama_tokenize(peer, tmp_path, bpe, pre):
    path = _vocab_gguf(tmp_path / f"{pre}.gguf", _tokenizer(bpe, pre))
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    assert ours.pre == pre
    assert ours.encode(TEXT) == peer.tokenize(path, TEXT, tmp=tmp_path)


@pytest.mark.peer
@pytest.mark.parametrize("pre, bos", [("llama-bpe", True), ("qwen2", False)])
def test_add_bos_default_follows_llama_cpp(peer, tmp_path, bpe, pre, bos):
    """Without tokenizer.ggml.add_bos_token llama.cpp adds BOS for some pre-tokenizers (llama3's family)."""
    path = _vocab_gguf(tmp_path / f"{pre}.gguf", _tokenizer(bpe, pre), add_bos_key=False)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    assert ours.add_bos is bos
    assert ours.encode("Hello") == peer.tokenize(path, "Hello", tmp=tmp_path)


def test_unsupported_pre_tokenizers_are_named(bpe):
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'gemma4': .* not byte-level BPE"):
        _tokenizer(bpe, "gemma4")
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer 'nope': llama.cpp does not know it"):
        _tokenizer(bpe, "nope")


def _llama_cpp_tables(source: str) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, bool, bool]]]:
    """From llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_* -> regexes (llm_tokenizer_bpe; None for byte_encode = false)
    and tokenizer.ggml.pre -> (type, ignore_merges, add_bos) (llama_vocab::impl::load)."""
    ctor = source[source.index("struct llm_tokenizer_bpe : llm_tokenizer {"):]
    ctor = ctor[: ctor.index("std::vector<std::string> regex_exprs;")]
    regexes, labels, pending = {}, [], None
    for line in (ln.strip() for ln in ctor.splitlines()):
        case = re.match(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):|default:", line)
        if case:
            labels = [] if pending is not None else labels
            labels.append(case.group(1) or "DEFAULT")
            pending = None
        elif line.startswith("regex_exprs = {"):
            pending = []
        elif pending is not None and line.startswith('"'):  # one C string literal per line
            pending.append(ast.literal_eval(re.match(r'"((?:[^"\\]|\\.)*)"', line).group(0)))
        elif line == "};" and pending is not None:
            regexes.update(dict.fromkeys(labels, tuple(pending)))
        elif line.startswith("byte_encode = false"):
            regexes.update(dict.fromkeys(labels, None))
    load = source[source.index("if (tokenizer_pre.empty()) {"):]
    load = load[: load.index('"unknown pre-tokenizer type')]
    names = {}
    for block in load.split("} else if (")[1:]:
        kind = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);", block).group(1)
        for name in re.findall(r'tokenizer_pre == "([^"]+)"', block):
            names[name] = (kind, "ignore_merges = true" in block, "add_bos = true" in block)
    return regexes, names


@pytest.mark.peer
def test_table_is_llama_cpp_s(peer):
    regexes, names = _llama_cpp_tables((peer.tree() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8"))
    assert len(names) > 80 and "default" in names
    assert set(PRE_TOKENIZERS) | NOT_BYTE_LEVEL == set(names) and not set(PRE_TOKENIZERS) & NOT_BYTE_LEVEL
    escaped = lambda rs: tuple(r.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t") for r in rs)  # noqa: E731
    for name, (kind, ignore_merges, add_bos) in names.items():
        if name in NOT_BYTE_LEVEL:
            assert regexes[kind] is None, name
            continue
        p = PRE_TOKENIZERS[name]
        assert escaped(p.regexes) == escaped(regexes[kind]), name
        assert (p.ignore_merges, p.add_bos) == (ignore_merges, add_bos), name
