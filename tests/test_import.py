"""``import torchaq`` is cheap and side-effect free: it neither initialises CUDA nor imports triton or
transformers (those load only when a CUDA device or the Hugging Face adapter's caller needs them)."""
import subprocess
import sys

_SCRIPT = """
import sys, torch
import torchaq
heavy = sorted(m for m in ("triton", "transformers") if m in sys.modules)
print("heavy:", heavy)
print("cuda initialised:", torch.cuda.is_initialized())
assert not heavy, heavy
assert not torch.cuda.is_initialized()
"""


def test_import_torchaq_is_light():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_api():
    import torchaq

    for name in ("QuantizedSoftmax", "AnisotropicPQ", "AnisotropicAQ", "CodebookRefresher", "chunked_cross_entropy", "linear_cross_entropy",
                 "eta", "score_aware_loss", "ops", "hf"):
        assert hasattr(torchaq, name), name
    import torchaq.distributed

    assert torchaq.distributed.VocabParallelQuantizedSoftmax.__module__ == "torchaq.distributed.layer"
