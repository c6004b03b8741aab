"""v4jax: DeepSeek-V4 in JAX + Flax NNX."""
__version__ = "0.1.0"
