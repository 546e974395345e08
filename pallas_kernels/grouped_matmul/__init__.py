"""Grouped matmul: one op interface, one module per backend, `api` picks."""
from pallas_kernels.grouped_matmul.api import (
    IMPLEMENTATIONS,
    default_implementation,
    grouped_matmul,
    grouped_matmul_transposed,
    grouped_swiglu,
)
from pallas_kernels.grouped_matmul.config import GroupedMatmulConfig
from pallas_kernels.grouped_matmul.mosaic_gpu import MosaicGpuConfig
from pallas_kernels.grouped_matmul.mosaic_gpu_tgmm import MosaicTgmmConfig
from pallas_kernels.grouped_matmul.reference import (
    grouped_matmul_reference,
    grouped_matmul_transposed_reference,
)
from pallas_kernels.grouped_matmul.triton import TritonConfig

__all__ = [
    "IMPLEMENTATIONS",
    "GroupedMatmulConfig",
    "MosaicGpuConfig",
    "MosaicTgmmConfig",
    "TritonConfig",
    "default_implementation",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_transposed",
    "grouped_matmul_transposed_reference",
    "grouped_swiglu",
]
