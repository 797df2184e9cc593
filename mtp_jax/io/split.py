"""Split GGUF models (``PREFIX-0000k-of-0000n.gguf``, as llama-gguf-split and llama-quantize --keep-split write
them): found from the first file and checked as llama.cpp's llama_model_loader does (src/llama-model-loader.cpp:
the first split has split.no 0 and split.count n, each other file PREFIX-0000k-of-0000n.gguf has split.no k - 1,
no tensor twice, split.tensors.count tensors in all). A file without split keys is a model of one file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gguf import GGUFReader, Keys, ReaderTensor

from mtp_jax.io.validate import GGUFError, open_reader


def split_path(prefix: str | os.PathLike, split_no: int, split_count: int) -> Path:
    """llama_split_path: PREFIX-0000k-of-0000n.gguf for split_no k - 1."""
    return Path(f"{os.fspath(prefix)}-{split_no + 1:05d}-of-{split_count:05d}.gguf")


@dataclass
class ModelFiles:
    """The model's file(s): the readers and paths in split order, every tensor with its split index."""

    paths: list[Path]
    readers: list[GGUFReader]
    tensors: list[tuple[int, ReaderTensor]]

    def whole(self) -> Any:
        """A reader-like view (fields of the first file, every split's tensors) for the metadata and table checks."""
        return SimpleNamespace(fields=self.readers[0].fields, tensors=[t for _, t in self.tensors])


def _split_key(reader: GGUFReader, key: str, path: Path, error: type[ValueError], default: int | None = None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if not isinstance(v, int) or isinstance(v, bool):
        raise error(f"{path}: key {key} = {v!r}, expected an integer")
    return v


def open_model_files(path: str | os.PathLike, error: type[ValueError] = GGUFError) -> ModelFiles:
    """Every file of the model whose (first) file is ``path``, each validated (io/validate.py); ``error`` names
    the file and the key or tensor."""
    path = Path(path)
    reader = open_reader(path, error)
    inp = ModelFiles([path], [reader], [(0, t) for t in reader.tensors])
    n_split = _split_key(reader, Keys.Split.LLM_KV_SPLIT_COUNT, path, error, 0)
    if n_split <= 1:
        return inp
    no = Keys.Split.LLM_KV_SPLIT_NO
    idx = _split_key(reader, no, path, error, 0)
    if idx != 0:
        raise error(f"illegal split file idx: {idx} (file: {path}), model must be loaded with the first split")
    prefix = os.fspath(path)
    if not prefix.endswith(tail := split_path("", 0, n_split).name) or len(prefix) == len(tail):
        raise error(f"invalid split file name: {path} (split 1 of {n_split} must be named PREFIX{tail})")
    prefix = prefix[:-len(tail)]
    names = {t.name: path for t in reader.tensors}
    for i in range(1, n_split):
        p = split_path(prefix, i, n_split)
        r = open_reader(p, error)
        got = _split_key(r, no, p, error)
        if got is None:
            raise error(f"missing key {no} in GGUF split {p}")
        if got != i:
            raise error(f"invalid split file idx: {got} (file: {p}), expected {i}")
        for t in r.tensors:
            if t.name in names:
                raise error(f"{p}: invalid model: tensor '{t.name}' is duplicated (also in {names[t.name]})")
            names[t.name] = p
        inp.paths.append(p)
        inp.readers.append(r)
        inp.tensors += [(i, t) for t in r.tensors]
    expected = _split_key(reader, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, path, error)
    if expected is None:
        raise error(f"{path}: key not found in model: {Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}")
    if expected != len(inp.tensors):
        raise error(f"{path}: corrupted model: {expected} tensors expected but {len(inp.tensors)} found "
                    f"in {n_split} split files")
    return inp
