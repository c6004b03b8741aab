"""Pallas kernels for DeepSeek-V4 attention (CSA / HCA / window), the lightning indexer and the
experts' grouped matmul, with plain-JAX references in ``reference``."""
from pallas_kernels import reference  # noqa: F401
from pallas_kernels._core import target_platform  # noqa: F401
from pallas_kernels.compressed_attention import compressed_attention, window_attention  # noqa: F401
from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: F401
from pallas_kernels.indexer import indexer_scores, indexer_topk  # noqa: F401
from pallas_kernels.reference import Fp4Keys  # noqa: F401
from pallas_kernels.sparse_attention import sparse_attention  # noqa: F401

__all__ = ["reference", "sparse_attention", "compressed_attention", "window_attention",
           "indexer_scores", "indexer_topk", "Fp4Keys", "grouped_matmul", "target_platform"]
