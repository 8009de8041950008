"""Builds the optional C++ extension ``torchaq._C`` (CPU lookup-table scan).

Everything else is declared in ``pyproject.toml``. Without torch the build stops at once with
"install torch first" (torch is a run-time dependency too). If the compiler fails, the package
is installed without the extension and falls back to the pure-torch reference kernels (with one
warning at import) -- unless ``TORCHAQ_REQUIRE_CPP=1``,
which turns either into a failed build (``make test`` and CI set it: a build that lost the
extension must not pass as a slower one).

Each ``torchaq/csrc/scan_<isa>.cpp`` is compiled with its own instruction-set flags (and only
that file), and ``scan.cpp`` picks one at run time from what the CPU reports; the package never
uses ``-march=native``, so a wheel built here runs on any x86-64 CPU.
"""
import glob
import os
import platform
import sys
import warnings

import setuptools
from setuptools import setup

# TORCHAQ_REQUIRE_CPP=1: the extension is required; a failure to build it fails the install
REQUIRE_CPP = os.environ.get("TORCHAQ_REQUIRE_CPP") == "1"

# per-file flags, keyed by the file-name suffix
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
# -std=c++20: the torch 2.13 headers need it. -ffp-contract=off: the ISA files must round every
# float op exactly like the scalar file (no fused multiply-add), so all paths return identical scores.
COMMON_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden"]
# -fopenmp: at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`
# compiled into *this* extension; without the flag the pragma is ignored and every "parallel" scan
# runs on the calling thread alone. The extension then needs libgomp.so.1, which the dynamic
# loader resolves to the copy torch has already loaded (torch bundles it), so there is one
# OpenMP runtime and one thread pool in the process.
OPENMP_FLAGS = ["-fopenmp"] if platform.system() == "Linux" else []


def _ext_modules_and_cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as err:  # torch missing at build time: pure-python install
        if REQUIRE_CPP:
            raise RuntimeError(f"TORCHAQ_REQUIRE_CPP=1 but torch is not importable at build time ({err})") from err
        warnings.warn(f"torchaq: torch not importable ({err}); building without the C++ extension")
        return [], {}

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here)
        for p in glob.glob(os.path.join(here, "torchaq", "csrc", "*.cpp"))
        if x86 or not any(p.endswith(s) for s in ISA_FLAGS)
    )

    class Build(BuildExtension):
        """Adds the ISA flags of ``*_avx2.cpp`` / ``*_avx512.cpp`` to those files only, and turns a
        failed compile into a package without the extension instead of a failed install."""

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = next((f for s, f in ISA_FLAGS.items() if src.endswith(s)), [])
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + extra}
                else:
                    extra_postargs = list(extra_postargs or []) + extra
                return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = _compile
            # distutils reuses objects whose flags changed (e.g. -fopenmp): always rebuild
            self.force = self.compiler.force = True
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                if REQUIRE_CPP:
                    raise
                warnings.warn(f"torchaq: building the C++ extension failed ({err}); installing without it")
                self.extensions = []  # nothing to copy or list as output

    ext = CppExtension(
        "torchaq._C",
        sources,
        extra_compile_args={"cxx": COMMON_FLAGS + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS,
        define_macros=[("TORCHAQ_X86_KERNELS", "1")] if x86 else [],
    )
    # use_ninja=False: ninja builds bypass compiler._compile, i.e. the per-file flags above
    return [ext], {"build_ext": Build.with_options(use_ninja=False)}


def _check_build_environment() -> None:
    """Stop with one readable line before setuptools reads ``pyproject.toml``: without torch the
    package cannot work (and an old setuptools would fail on the SPDX ``license`` string instead,
    with an unrelated ``project.license`` error -- that is what a torch-less
    ``pip install --no-build-isolation .`` used to print)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("torchaq: install torch first (https://pytorch.org/get-started/locally/), "
                 "then: pip install --no-build-isolation .")
    major = int(setuptools.__version__.split(".")[0])
    if major < 77:
        sys.exit(f"torchaq: setuptools {setuptools.__version__} is too old (the build needs >= 77): "
                 "pip install -U 'setuptools>=77', then install again")


_check_build_environment()
ext_modules, cmdclass = _ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
