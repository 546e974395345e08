"""Grouped matmul: one op interface, one module per backend, `api` picks."""
from pallas_kernels.grouped_matmul.api import (
    DEFAULT_IMPLEMENTATION,
    IMPLEMENTATIONS,
    grouped_matmul,
    grouped_matmul_transposed,
)
from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig
from pallas_kernels.grouped_matmul.reference import (
    grouped_matmul_reference,
    grouped_matmul_transposed_reference,
)

__all__ = [
    "DEFAULT_IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "GroupedMatmulConfig",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_transposed",
    "grouped_matmul_transposed_reference",
]
