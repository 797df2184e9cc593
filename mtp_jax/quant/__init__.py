"""Host-side NumPy GGUF quantizers, bit-exact with ggml (see shared/notes/gguf-quantization-spec.md)."""
