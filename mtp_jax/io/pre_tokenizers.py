"""llama.cpp's byte-level BPE pre-tokenizers (``tokenizer.ggml.pre``) as `tokenizers` pre-tokenizers.

llama.cpp's loader (src/llama-vocab.cpp in the llama-cpp-python 0.3.36 sdist, ``llama_vocab::impl::load``) maps
each name it accepts to a ``LLAMA_VOCAB_PRE_TYPE_*`` and flags; ``llm_tokenizer_bpe`` maps each type to a list of
regexes, and ``unicode_regex_split`` applies them in turn, each splitting the pieces the one before left and keeping
both its matches and the text between them: a `tokenizers` Sequence of ``Split(regex, "isolated")``.

``REGEXES`` holds llama.cpp's regexes verbatim; ``onig`` spells what llama.cpp matches with each for Oniguruma
(the engine of `tokenizers`):

* a regex with a unicode category runs on text collapsed to one byte per category (src/unicode.cpp,
  ``unicode_regex_split``), where \\p{Lu} \\p{Ll} \\p{Lt} \\p{Lm} \\p{Lo} all mean "letter": \\p{L};
* the others run in std::wregex (ECMAScript), where \\d is ASCII;
* three are keys of hand-written splitters (``unicode_regex_split_custom``: Kimi-K2, AFMoE digits, Tiny Aya
  digits), spelled here as the regexes those splitters implement. The other hand-written splitters (gpt2, llama3,
  qwen2, qwen35, newlines) implement their regex as written.

The names whose vocabulary is not byte-level (``byte_encode = false``: Gemma-4-style BPE over raw UTF-8 with ``▁``
for spaces, and whitespace) are in ``NOT_BYTE_LEVEL``, refused by the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

# ---- llm_tokenizer_bpe's regex_exprs per LLAMA_VOCAB_PRE_TYPE_*, verbatim ---------------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_RE = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_ASCII_PUNCT = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
_DEEPSEEK3 = (_ASCII_PUNCT + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_HAN_KANA = "[一-龥\u3040-ゟ゠-ヿ]+"
_CJK = "[一-龥ࠀ-一가-\ud7ff]+"
_NOT_PUNCT = r" ?[^(\s|.,!?…。，、।۔،)]+"
_UPPER_LOWER = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS
                + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS
                + "?")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS
          + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_NEWLINES = r"[^\n]+|[\n]+"

REGEXES: dict[str, tuple[str, ...]] = {
    "DEFAULT": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"),
    "LLAMA3": (LLAMA3_RE,),
    "JAIS2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",),
    "DBRX": (LLAMA3_RE,),
    "SMAUG": (LLAMA3_RE,),
    "DEEPSEEK_LLM": (  # \u escapes: characters that Unicode normalization of this file would change
        r"[\r\n]",
        r"\s?" "[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙ"
        "ὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼ"
        "ℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-"
        "ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟" "\u3000" r"-。]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ),
    "DEEPSEEK3_LLM": (r"\p{N}{1,3}", _HAN_KANA, _DEEPSEEK3),
    "HUNYUAN_DENSE": (r"\p{N}{1,3}", _HAN_KANA, _DEEPSEEK3),
    "JOYAI_LLM": (r"\p{N}{1,3}", _HAN_KANA, _DEEPSEEK3),
    "HY_V4": (r"\p{N}{1,3}", _HAN_KANA, _DEEPSEEK3),
    "SPARK2_5": (r"\p{N}{1,3}", _HAN_KANA,
                 _ASCII_PUNCT + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
                 r"\p{N}"),
    "YOUTU": ("[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|" + _HAN_KANA,
              _UPPER_LOWER + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "DEEPSEEK_CODER": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "FALCON": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, "[0-9][0-9][0-9]"),
    **dict.fromkeys(["STARCODER", "REFACT", "COMMAND_R", "SMOLLM", "CODESHELL", "EXAONE", "MINERVA", "MELLUM2"],
                    (r"\p{N}", GPT2_RE)),
    **dict.fromkeys(["GPT2", "MPT", "OLMO", "JAIS", "TRILLION", "GRANITE_DOCLING"], (GPT2_RE,)),
    **dict.fromkeys(["STABLELM2", "QWEN2", "HUNYUAN", "SOLAR_OPEN"], (QWEN2_RE,)),
    "QWEN35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+",),
    **dict.fromkeys(["PORO", "BLOOM", "GPT3_FINNISH"], (_NOT_PUNCT,)),
    "CHATGLM4": (LLAMA3_RE,),
    "VIKING": (_NOT_PUNCT, r"\p{N}"),
    "TEKKEN": (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])"
               r"([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "CHAMELEON": ("<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2_RE),
    "GPT4O": (_GPT4O,),
    "MINIMAX_M2": (_GPT4O,),
    "GRANITE_EMB_MULTI": (_GPT4O.replace(r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])"),),
    "TINY_AYA": (r"\d{1,3}(?=(?:\d{3})*\b)",
                 _UPPER_LOWER + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "KIMI_K2": (r"\p{Han}+",),
    "SUPERBPE": (r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
    "BAILINGMOE": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "SEED_CODER": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",),
    "UFAKZEKA": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "GROK_2": (QWEN2_RE,),
    "AFMOE": (r"\p{AFMoE_digits}",
              "[一-鿿㐀-䶿豈-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟ꩠ-ꩿꧠ-\ua9ff가-\ud7afᄀ-ᇿ]+",
              _DEEPSEEK3),
    "LAGUNA": (_NEWLINES, QWEN2_RE),
    "EXAONE_MOE": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "MINICPM5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+"),
}

# ---- tokenizer.ggml.pre -> type (llama_vocab::impl::load) --------------------------------------------------------

_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano")
_NAMES: dict[str, tuple[str, ...]] = {
    "DEFAULT": ("default",), "MINICPM5": ("minicpm5",), "LLAMA3": _LLAMA3_NAMES, "DEEPSEEK_LLM": ("deepseek-llm",),
    "DEEPSEEK_CODER": ("deepseek-coder",), "DEEPSEEK3_LLM": ("deepseek-v3",), "SPARK2_5": ("spark2_5",),
    "YOUTU": ("youtu",), "FALCON": ("falcon",), "MPT": ("mpt",), "STARCODER": ("starcoder",),
    "GPT2": ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
             "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4"),
    "JAIS2": ("jais-2",), "REFACT": ("refact",), "COMMAND_R": ("command-r",),
    "QWEN2": ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), "QWEN35": ("qwen35",),
    "STABLELM2": ("stablelm2",), "OLMO": ("olmo",), "DBRX": ("dbrx",), "SMAUG": ("smaug-bpe",),
    "PORO": ("poro-chat",), "CHATGLM4": ("chatglm-bpe", "glm4", "glm5"), "VIKING": ("viking",), "JAIS": ("jais",),
    "TEKKEN": ("tekken",), "SMOLLM": ("smollm",), "CODESHELL": ("codeshell",), "BLOOM": ("bloom",),
    "GPT3_FINNISH": ("gpt3-finnish",), "EXAONE": ("exaone",), "EXAONE_MOE": ("exaone-moe",),
    "CHAMELEON": ("chameleon",), "MINERVA": ("minerva-7b",), "GPT4O": ("gpt-4o", "llama4", "kanana2", "talkie"),
    "GRANITE_EMB_MULTI": ("granite-embed-multi-97m",), "TINY_AYA": ("tiny_aya", "cohere2moe"),
    "SUPERBPE": ("superbpe",), "TRILLION": ("trillion",), "GRANITE_DOCLING": ("granite-docling",),
    "BAILINGMOE": ("bailingmoe", "bailingmoe2", "llada-moe"), "SEED_CODER": ("seed-coder",), "HUNYUAN": ("hunyuan",),
    "HUNYUAN_DENSE": ("hunyuan-dense",), "HY_V4": ("hy_v4",), "JOYAI_LLM": ("joyai-llm",), "KIMI_K2": ("kimi-k2",),
    "UFAKZEKA": ("ufakzeka",), "GROK_2": ("grok-2",), "AFMOE": ("afmoe",), "LAGUNA": ("laguna",),
    "MINIMAX_M2": ("minimax-m2",), "SOLAR_OPEN": ("solar-open",), "MELLUM2": ("mellum2",),
}
_IGNORE_MERGES = {"minicpm5", *_LLAMA3_NAMES, "youtu", "glm4", "glm5", "tekken", "granite-embed-multi-97m"}
_ADD_BOS = {*_LLAMA3_NAMES, "tekken", "chameleon"}
NOT_BYTE_LEVEL = frozenset({"gemma4", "granite-embed-multi-311m", "sarvam-moe", "whitespace"})

# ---- what llama.cpp matches, for Oniguruma ---------------------------------------------------------------------

_HAN = (r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
        r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}")  # unicode_cpt_is_han
# digit runs in groups of three from the right, each with the non-digits before it (unicode_regex_split_custom_afmoe)
_DIGIT_GROUPS = r"[^\p{N}]*+\p{N}{1,3}(?=(?:\p{N}{3})*+(?!\p{N}))|[^\p{N}]++"
_CUSTOM = {
    r"\p{Han}+": (rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+"  # ..._kimi_k2
                  r"(?:'[sS]|'[tT]|'[mM]|'[dD]|'[rR][eE]|'[vV][eE]|'[lL][lL])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    r"\p{AFMoE_digits}": _DIGIT_GROUPS,
    r"\d{1,3}(?=(?:\d{3})*\b)": _DIGIT_GROUPS,
}
_CATEGORY = re.compile(r"\\p\{(?:N|L|P|M|S|Lu|Ll|Lt|Lm|Lo)\}")  # unicode_regex_split's k_ucat_enum


def onig(regex: str) -> str:
    """What llama.cpp's unicode_regex_split matches with ``regex``, as an Oniguruma regex."""
    if regex in _CUSTOM:
        return _CUSTOM[regex]
    if _CATEGORY.search(regex):
        return re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", regex)
    return regex.replace(r"\d", "[0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    """One ``tokenizer.ggml.pre``: llama.cpp's regexes and the loader's flags for it."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is not split by BPE
    add_bos: bool = False  # llama.cpp's add_bos when the GGUF has no tokenizer.ggml.add_bos_token

    def backend(self) -> pre_tokenizers.PreTokenizer:
        """Each regex splits the pieces of the one before; then bytes become GPT-2's printable characters."""
        splits = [pre_tokenizers.Split(Regex(onig(r)), behavior="isolated") for r in self.regexes]
        return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    name: PreTokenizer(REGEXES[kind], name in _IGNORE_MERGES, name in _ADD_BOS)
    for kind, names in _NAMES.items() for name in names
}
