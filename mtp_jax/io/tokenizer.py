"""Tokenizers as llama.cpp stores them in GGUF (``tokenizer.ggml.*``), run through the `tokenizers` library.

Two llama.cpp vocab types are supported (src/llama-vocab.cpp):

* ``gpt2``: byte-level BPE: tokens, merges, and the pre-tokenizer named by ``tokenizer.ggml.pre``
  (``llm_tokenizer_bpe``; every byte-level one llama.cpp knows, see ``pre_tokenizers``; GLM-4.5 uses ``glm4``);
* ``llama``: SentencePiece-style BPE: tokens with scores, byte fallback, ``▁`` for spaces (``llm_tokenizer_spm``).

``encode`` mirrors ``llama_tokenize`` (``parse_special`` picks whether CONTROL tokens written as text are
recognised; USER_DEFINED tokens always are) and ``decode_bytes`` mirrors ``token_to_piece``: CONTROL and
UNKNOWN tokens print only with ``special=True``, UNUSED tokens never.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
from gguf import Keys, TokenType
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from mtp_jax.io.pre_tokenizers import GPT2_RE, LLAMA3_RE, NOT_BYTE_LEVEL, PRE_TOKENIZERS, QWEN2_RE

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """Unsupported or inconsistent tokenizer data."""


# HF tokenizer.json spells the same regexes with (?i:...): tokenizer.json pattern -> tokenizer.ggml.pre
_HF_PRE_PATTERNS = {
    LLAMA3_RE.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])", "(?i:'s|'t|'re|'ve|'m|'ll|'d)"):
        "glm4",  # GLM-4.5's tokenizer.json; llama.cpp's converter maps its hash to "glm4"
    LLAMA3_RE: "glm4",
    QWEN2_RE.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])", "(?i:'s|'t|'re|'ve|'m|'ll|'d)"):
        "qwen2",
    GPT2_RE: "gpt-2",
}

GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>")
_SPM_SPACE = "\u2581"  # ▁


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte (llama.cpp unicode_utf8_to_byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass
class Tokenizer:
    """A llama.cpp-style vocabulary. ``tokens[i]`` is the text of id i as stored in GGUF (byte-level stand-in
    characters for ``gpt2``, ``▁`` for spaces for ``llama``)."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType per token
    merges: list[str] = field(default_factory=list)  # gpt2: "left right", highest priority first
    scores: list[float] | None = None  # llama: merge priority of each token
    pre: str | None = None  # gpt2: key of PRE_TOKENIZERS
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True  # llama only
    _backend: _Backend = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.token_types) != len(self.tokens):
            raise TokenizerError(f"{len(self.tokens)} tokens but {len(self.token_types)} token types")
        if len(set(self.tokens)) != len(self.tokens):  # llama_vocab::impl::load asserts the texts are unique
            first: dict[str, int] = {}
            s, i = next((s, i) for i, s in enumerate(self.tokens) if first.setdefault(s, i) != i)
            raise TokenizerError(f"token {s!r} is both id {first[s]} and id {i} (llama.cpp refuses duplicate tokens)")
        for name in ("bos_id", "eos_id", "eot_id", "eom_id", "unk_id", "pad_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < len(self.tokens):
                raise TokenizerError(f"{name} {i} is outside the vocabulary [0, {len(self.tokens)})")
        if self.model == "gpt2":
            if self.pre not in PRE_TOKENIZERS:
                why = ("its vocabulary is not byte-level BPE (llama.cpp byte_encode = false)"
                       if self.pre in NOT_BYTE_LEVEL else "llama.cpp does not know it either")
                raise TokenizerError(f"unsupported pre-tokenizer {self.pre!r}: {why}")
            self._backend = _gpt2_backend(self)
        elif self.model == "llama":
            if self.scores is None or len(self.scores) != len(self.tokens):
                raise TokenizerError("a 'llama' (SentencePiece) tokenizer needs one score per token")
            self._backend = _spm_backend(self)
        else:
            raise TokenizerError(f"unsupported tokenizer model {self.model!r} (supported: 'gpt2', 'llama')")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ---- encode / decode -------------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special, parse_special): BOS/EOS per add_bos/add_eos when add_special."""
        self._backend.encode_special_tokens = not parse_special  # a backend setting: not thread-safe
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special and self.add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """llama_vocab::token_to_piece: the bytes one token prints as."""
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {len(self.tokens)})")
        text, kind = self.tokens[token_id], self.token_types[token_id]
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            return text.encode() if special else b""
        if kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind == TokenType.BYTE:
            return bytes([int(text[3:-1], 16)])  # "<0xAB>"
        if kind != TokenType.NORMAL:  # UNUSED
            return b""
        if self.model == "llama":
            return text.replace(_SPM_SPACE, " ").encode()
        dec = byte_decoder()
        return bytes(dec[c] for c in text) if all(c in dec for c in text) else text.encode()

    def decode_bytes(self, ids: Sequence[int], special: bool = False) -> bytes:
        return b"".join(self.token_bytes(int(i), special) for i in ids)

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        return cls(**d)

    # ---- GGUF ------------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer | None:
        """From a GGUF's tokenizer.ggml.* keys; None when the file has no vocabulary (model 'none' or absent)."""
        T = Keys.Tokenizer
        model = _field(reader, T.MODEL)
        if model in (None, "none", "no_vocab"):
            return None
        tokens = _field(reader, T.LIST)
        if tokens is None:
            raise TokenizerError(f"tokenizer model {model!r} without {T.LIST}")
        tokens = [s or f"[EMPTY_{i}]" for i, s in enumerate(tokens)]  # as llama.cpp names empty tokens
        types = _field(reader, T.TOKEN_TYPE) or [int(TokenType.NORMAL)] * len(tokens)
        pre = _field(reader, T.PRE) or ("default" if model == "gpt2" else None)  # llama.cpp: missing -> 'default'
        # without the key llama.cpp adds BOS for SentencePiece vocabularies and per pre-tokenizer for BPE
        add_bos = model == "llama" or (pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre].add_bos)
        return cls(
            model=model, tokens=tokens, token_types=[int(t) for t in types],
            merges=_field(reader, T.MERGES) or [], scores=_field(reader, T.SCORES), pre=pre,
            bos_id=_field(reader, T.BOS_ID), eos_id=_field(reader, T.EOS_ID), eot_id=_field(reader, T.EOT_ID),
            eom_id=_field(reader, T.EOM_ID), unk_id=_field(reader, T.UNK_ID), pad_id=_field(reader, T.PAD_ID),
            add_bos=bool(_field(reader, T.ADD_BOS, add_bos)), add_eos=bool(_field(reader, T.ADD_EOS) or False),
            add_space_prefix=bool(_field(reader, T.ADD_PREFIX, True)),
        )

    def add_to_gguf(self, writer: gguf.GGUFWriter, vocab_size: int | None = None) -> None:
        """Write the vocabulary (padded with UNUSED ``[PAD{i}]`` tokens up to ``vocab_size``, as llama.cpp's
        converter does in get_vocab_base), merges or scores, the flags and the unk/pad ids. The GGUF writer adds
        BOS and the end-of-generation ids (eos, eot, eom), which are the model's: ModelConfig's."""
        n = vocab_size or len(self.tokens)
        if n < len(self.tokens):
            raise TokenizerError(f"tokenizer has {len(self.tokens)} tokens, more than the model's vocab_size {n}")
        pad = range(len(self.tokens), n)
        writer.add_tokenizer_model(self.model)
        if self.model == "gpt2":
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list([*self.tokens, *(f"[PAD{i}]" for i in pad)])
        writer.add_token_types([*self.token_types, *([int(TokenType.UNUSED)] * len(pad))])
        if self.model == "gpt2":
            writer.add_token_merges(self.merges)
        else:
            writer.add_token_scores([*self.scores, *([-1000.0] * len(pad))])
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)

    # ---- HF tokenizer.json -----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike, pre: str | None = None) -> Tokenizer:
        """From an HF byte-level BPE ``tokenizer.json`` (or its directory, with tokenizer_config.json for the
        special tokens). ``pre`` defaults to the llama.cpp name of the tokenizer.json split regex."""
        path = Path(path)
        d = path if path.is_dir() else path.parent
        tj = json.loads((d / "tokenizer.json" if path.is_dir() else path).read_text(encoding="utf-8"))
        tc_path = d / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.exists() else {}
        m = tj.get("model") or {}
        if m.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
            raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json files are supported")
        pre = pre or _infer_pre(tj.get("pre_tokenizer"), path)
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        vocab = {**m["vocab"], **{t["content"]: i for i, t in added.items()}}
        n = max(vocab.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [int(TokenType.UNUSED)] * n
        for tok, i in vocab.items():
            tokens[i] = tok
            types[i] = int(TokenType.NORMAL if i not in added else
                           TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges", [])]

        def special_id(key: str) -> int | None:
            v = tc.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return vocab.get(v) if v is not None else None

        return cls(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre,
                   bos_id=special_id("bos_token"), eos_id=special_id("eos_token"),
                   unk_id=special_id("unk_token"), pad_id=special_id("pad_token"),
                   add_bos=bool(tc.get("add_bos_token", False)), add_eos=bool(tc.get("add_eos_token", False)))

    def save_hf(self, directory: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer (and so llama.cpp's
        convert_hf_to_gguf.py) loads."""
        if self.model != "gpt2":
            raise TokenizerError("only byte-level BPE ('gpt2') tokenizers are written in HF form")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.encode_special_tokens = False
        self._backend.save(str(d / "tokenizer.json"))
        name = lambda i: None if i is None else self.tokens[i]  # noqa: E731
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "add_bos_token": self.add_bos, "add_eos_token": self.add_eos, "model_max_length": 1 << 20,
               "bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "unk_token": name(self.unk_id),
               "pad_token": name(self.pad_id)}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _infer_pre(pre_tokenizer: dict | None, path: Path) -> str:
    pts = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    for pt in pts:
        pattern = (pt.get("pattern") or {}).get("Regex") if pt.get("type") == "Split" else None
        if pattern in _HF_PRE_PATTERNS:
            return _HF_PRE_PATTERNS[pattern]
    if len(pts) == 1 and pts[0].get("type") == "ByteLevel" and pts[0].get("use_regex", True):
        return "gpt-2"
    raise TokenizerError(f"{path}: cannot tell which llama.cpp pre-tokenizer matches {pre_tokenizer}; pass pre=")


def _add_specials(backend: _Backend, t: Tokenizer) -> None:
    """CONTROL (and UNKNOWN) tokens as special added tokens, USER_DEFINED as plain added tokens."""
    kinds = (TokenType.CONTROL, TokenType.UNKNOWN)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s, k in zip(t.tokens, t.token_types) if k in kinds])
    backend.add_tokens([AddedToken(s, special=False, normalized=False)
                        for s, k in zip(t.tokens, t.token_types) if k == TokenType.USER_DEFINED])


def _vocab(t: Tokenizer) -> dict[str, int]:
    return {s: i for i, s in enumerate(t.tokens)}


def _bpe_merges(t: Tokenizer) -> list[tuple[str, str]]:
    """The merges split as llama.cpp splits them (at the first space after the first character), less those the
    tokenizers BPE cannot hold: a part or the merged text outside the vocabulary. Training never makes one; a file
    that has them (a damaged one) loads in llama.cpp, so it loads here too, with a warning."""
    vocab = _vocab(t)
    pairs, bad = [], []
    for m in t.merges:
        i = m.find(" ", 1)
        a, b = (m[:i], m[i + 1:]) if i > 0 else (m, "")
        (pairs if a in vocab and b in vocab and a + b in vocab else bad).append((a, b))
    if bad:
        log.warning("%d of %d tokenizer merges name text outside the vocabulary and are ignored (the first: %r)",
                    len(bad), len(t.merges), " ".join(bad[0]))
    return pairs


def _gpt2_backend(t: Tokenizer) -> _Backend:
    pre = PRE_TOKENIZERS[t.pre]
    b = _Backend(models.BPE(vocab=_vocab(t), merges=_bpe_merges(t), ignore_merges=pre.ignore_merges))
    b.pre_tokenizer = pre.backend()
    b.decoder = decoders.ByteLevel()
    _add_specials(b, t)
    return b


def _spm_merges(t: Tokenizer) -> list[tuple[str, str]]:
    """llm_tokenizer_spm merges the adjacent pair whose concatenation is the highest-scoring token; as BPE
    ranks: every split of every normal token into two tokens, ordered by the whole token's score."""
    vocab = _vocab(t)
    cand = []
    for i, (s, k) in enumerate(zip(t.tokens, t.token_types)):
        if k not in (TokenType.NORMAL, TokenType.USER_DEFINED) or len(s) < 2:
            continue
        for j in range(1, len(s)):
            if s[:j] in vocab and s[j:] in vocab:
                cand.append((-t.scores[i], i, j, s[:j], s[j:]))
    cand.sort()
    return [(a, b) for *_, a, b in cand]


def _spm_backend(t: Tokenizer) -> _Backend:
    unk = t.tokens[t.unk_id] if t.unk_id is not None else None
    b = _Backend(models.BPE(vocab=_vocab(t), merges=_spm_merges(t), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", _SPM_SPACE)]
    if t.add_space_prefix:
        steps.insert(0, normalizers.Prepend(_SPM_SPACE))
    b.normalizer = normalizers.Sequence(steps)
    b.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_specials(b, t)
    return b


# ---- tiny tokenizers for tests with random weights ----------------------------------------------------------

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A language model predicts the next token; a multi token prediction head predicts the one after it.
Speculative decoding drafts several tokens with a cheap model and verifies them with the large one.
When the draft agrees with the target, the tokens are accepted and decoding moves ahead faster.
GLM models share the embedding and the output head with their NextN layer, and llama.cpp reads them from GGUF.
Importance matrices record how strongly each input column is used, so quantization keeps what matters.
Then there was the question of whether the weather would hold for the harvest in the northern valley.
She said that they had been thinking about the problem for a long time, and that the answer was simple.
In the beginning the river was narrow, but as it reached the plain it grew wide and slow and deep.
Numbers like 12, 345 and 6789 appear in text, as do words such as information, international and interest.
"""


def tiny_bpe(vocab_size: int = 512, pre: str = "glm4") -> Tokenizer:
    """A byte-level BPE with GLM's special tokens (ids 0..9, ``<|endoftext|>`` = 0), the 256 byte tokens and
    up to ``vocab_size`` tokens in all, trained on a fixed paragraph: small enough for random-weight test
    models, real enough that llama.cpp loads it and tokenizes like we do."""
    b = _Backend(models.BPE())
    b.pre_tokenizer = PRE_TOKENIZERS[pre].backend()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GLM_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    b.train_from_iterator(_CORPUS.splitlines(), trainer)
    model = json.loads(b.to_str())["model"]
    inv = {i: s for s, i in model["vocab"].items()}
    tokens = [inv[i] for i in range(len(inv))]
    types = [int(TokenType.CONTROL if s in GLM_SPECIALS else TokenType.NORMAL) for s in tokens]
    merges = [" ".join(x) if isinstance(x, list) else x for x in model["merges"]]
    ix = {s: i for i, s in enumerate(tokens)}
    return Tokenizer(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre,
                     eos_id=ix["<|endoftext|>"], eot_id=ix["<|user|>"],
                     eom_id=ix["<|observation|>"], unk_id=ix["<|endoftext|>"])


def tiny_spm() -> Tokenizer:
    """A SentencePiece-style ('llama') vocabulary: <unk>, <s>, </s>, 256 byte tokens, ``▁`` + letters and a
    few scored merges. For tokenizer tests only (GLM itself uses byte-level BPE)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)] + [int(TokenType.BYTE)] * 256
    pieces = [_SPM_SPACE, *"etaoinshrdlucmfwypvbgkjqxz", *"ETAOINSHRDLUCMFWYPVBGKJQXZ", ".", ","]
    pieces += [_SPM_SPACE + "t", "he", "in", "er", "an", _SPM_SPACE + "a", "on", "re", _SPM_SPACE + "th",
               _SPM_SPACE + "the", "at", "en", "nd", _SPM_SPACE + "s", "ed", "ing", _SPM_SPACE + "o", "or"]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    # merged pieces score above their parts' pairs in the order listed
    scores[len(tokens) + 55:] = [100.0 - i for i in range(len(pieces) - 55)]
    tokens += pieces
    types += [int(TokenType.NORMAL)] * len(pieces)
    return Tokenizer(model="llama", tokens=tokens, token_types=types, scores=scores, bos_id=1, eos_id=2, unk_id=0,
                     add_bos=True)
