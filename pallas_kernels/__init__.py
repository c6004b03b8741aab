"""Pallas kernels for DeepSeek-V4 attention (CSA / HCA), with plain-JAX references in ``reference``."""
from pallas_kernels import reference  # noqa: F401
