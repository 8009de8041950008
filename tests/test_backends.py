"""The build and the backends: CI must fail on a build that lost the C++ extension, users' installs
fall back to the reference with one warning, and every backend agrees on the packed layout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchaq import ops

from torchaq.ops import layout
from torchaq.backends import CPU_EXTENSION_LOADED

ROOT = Path(__file__).resolve().parents[1]


def test_extension_loaded():
    """Not under any skip: a broken build must fail here, not pass as skips."""
    assert os.environ.get("TORCHAQ_DISABLE_CPP") != "1", "unset TORCHAQ_DISABLE_CPP to test the C++ kernels"
    assert CPU_EXTENSION_LOADED, "torchaq._C did not load: rebuild with TORCHAQ_REQUIRE_CPP=1 pip install --no-build-isolation -e ."
    from torchaq import _C

    assert _C.cpu_isa() in ("scalar", "avx2", "avx512")


def test_layout_constants_agree_across_backends():
    from torchaq import _C

    compiled = _C.layout()
    assert compiled["block"] == layout.BLOCK == ops.BLOCK
    assert {16: compiled["bits_k16"], 256: compiled["bits_k256"]} == layout.BITS_OF_K
    pytest.importorskip("triton")
    from torchaq.triton_kernels import tiles

    assert tiles.PACK_BLOCK.value == layout.BLOCK


_FALLBACK = r"""
import sys, warnings
sys.modules["torchaq._C"] = None          # what an install without the extension looks like
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, torchaq
    from torchaq import ops
    from torchaq import backends
assert not backends.CPU_EXTENSION_LOADED
msgs = [str(w.message) for w in caught if "torchaq._C" in str(w.message)]
assert len(msgs) == 1 and "reference" in msgs[0], msgs
g = torch.Generator().manual_seed(0)
w = torch.randn(300, 16, generator=g)
h = torch.randn(5, 16, generator=g)
layer = torchaq.QuantizedSoftmax(w, num_subspaces=8, candidates=300, progress=False)
vals, idx = layer.topk(h, k=5)
exact = (h @ w.T).topk(5)
assert torch.equal(idx, exact.indices), (idx, exact.indices)
torch.testing.assert_close(vals, exact.values)
print("fallback ok")
"""


def test_fallback_without_extension_warns_once_and_works():
    """The graceful path users get from a `pip install` whose compile failed."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHAQ_DISABLE_CPP"}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout


@pytest.mark.parametrize("require", [True, False])
def test_setup_require_cpp_turns_a_failed_compile_into_a_failed_build(tmp_path, require):
    """CC=/bin/false: with TORCHAQ_REQUIRE_CPP=1 (make test, CI) the build fails; without it the
    package builds without the extension and says so."""
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false")
    env.pop("TORCHAQ_REQUIRE_CPP", None)
    if require:
        env["TORCHAQ_REQUIRE_CPP"] = "1"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if require:
        assert out.returncode != 0
    else:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "installing without it" in out.stderr
        assert not list((tmp_path / "lib").rglob("_C*.so"))
