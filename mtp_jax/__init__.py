"""mtp_jax: Multi-Token-Prediction (NextN) heads in JAX/XLA."""

__version__ = "0.1.0"
