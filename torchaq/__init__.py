"""torchaq: anisotropic product quantization and lookup-table scoring for large output layers."""
from . import ops
from ._backends import load_cpu_extension as _load_cpu_extension
from ._backends import load_triton_kernels as _load_triton_kernels

_load_cpu_extension()
_load_triton_kernels()

__version__ = "0.1.0"
