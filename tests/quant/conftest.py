import os

import pytest

from tests.quant.ggml_oracle import ggml_lib_path


@pytest.fixture(scope="session")
def ggml():
    """The libggml oracle module; skips locally when unbuilt, fails in CI (where .ci/run builds it)."""
    if not ggml_lib_path().exists():
        msg = f"libggml-base.so not found at {ggml_lib_path()} (run ../shared/tools/build-llama-cpp.sh --lib-only)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from tests.quant import ggml_oracle

    ggml_oracle.load_ggml()
    return ggml_oracle
