"""Kernels for wideep-jax: grouped matmul for the MoE expert FFN."""
from pallas_kernels.grouped_matmul import (
    GroupedMatmulConfig,
    MosaicGpuConfig,
    MosaicTgmmConfig,
    TritonConfig,
    grouped_matmul,
    grouped_matmul_reference,
    grouped_matmul_transposed,
    grouped_matmul_transposed_reference,
    grouped_swiglu,
)

__all__ = [
    "GroupedMatmulConfig",
    "MosaicGpuConfig",
    "MosaicTgmmConfig",
    "TritonConfig",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_transposed",
    "grouped_matmul_transposed_reference",
    "grouped_swiglu",
]
