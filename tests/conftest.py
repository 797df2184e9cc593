"""Test session setup: 4 fake CPU devices (sharding tests) and float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def peer():
    """tests.io.llama_cpp_peer, once the built llama.cpp is there (skipped without it, a failure under CI)."""
    from tests.io import llama_cpp_peer

    why = llama_cpp_peer.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return llama_cpp_peer


@pytest.fixture(scope="session")
def ggml():
    """The libggml oracle module (tests/quant/ggml_oracle.py); skips locally when unbuilt, fails in CI (where .ci/run
    builds it)."""
    from tests.quant import ggml_oracle

    if not ggml_oracle.ggml_lib_path().exists():
        msg = (f"libggml-base.so not found at {ggml_oracle.ggml_lib_path()} "
               f"(run ../shared/tools/build-llama-cpp.sh --lib-only)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    ggml_oracle.load_ggml()
    return ggml_oracle


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps memory for each executable it JITs; one
    process running the whole suite compiles thousands and reached vm.max_map_count (65530), after which XLA
    aborts the process (measured: 8374 mappings after tests/test_qlinear.py + test_qweight.py, 669 after
    jax.clear_caches())."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
