"""Builds the optional C++ extension ``torchaq._C`` (CPU lookup-table scan).

Everything else is declared in ``pyproject.toml``. If torch is not importable at build time,
or the compiler fails, the package is installed without the extension and falls back to the
pure-torch reference kernels (with one warning at import).
"""
from setuptools import setup

setup()
