"""Triton GPU kernels for torchaq (installed as ``torchaq.triton_kernels``)."""
