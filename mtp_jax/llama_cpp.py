"""Where ../shared/tools/build-llama-cpp.sh puts the llama.cpp peer, and how its tools' logs read.

The build caches llama.cpp (the tree vendored in the llama-cpp-python 0.3.36 sdist) under
($MTP_JAX_CACHE or ~/.cache/mtp-jax)/llama-cpp-python-0.3.36; tests and benchmarks find it here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

VERSION = "0.3.36"


def cache_root() -> Path:
    """mtp_jax's cache directory: $MTP_JAX_CACHE or ~/.cache/mtp-jax."""
    return Path(os.environ.get("MTP_JAX_CACHE", Path.home() / ".cache" / "mtp-jax"))


def root() -> Path:
    return cache_root() / f"llama-cpp-python-{VERSION}"


def bin_dir() -> Path:
    """The built tools and shared libraries (llama-completion, libllama.so, libggml-base.so, ...)."""
    return root() / "build" / "bin"


def speculative_counts(log: str) -> tuple[int, int]:
    """(n_drafted, n_accept) from llama-speculative-simple's log."""
    drafted = re.search(r"n_drafted\s*=\s*(\d+)", log)
    accepted = re.search(r"n_accept\s*=\s*(\d+)", log)
    if not (drafted and accepted):
        raise ValueError("llama-speculative-simple's log has no n_drafted / n_accept lines")
    return int(drafted.group(1)), int(accepted.group(1))
