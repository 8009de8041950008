"""No inference path holds more memory than the dense layer (nn.Linear + log_softmax + topk).

The peak is the CPU allocator's running total during one call (torch.profiler memory events):
deterministic, no timing. ``benchmarks/memory.py`` measures the same on the real MiniLM table.
"""
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import torchaq

V, D = 20000, 64


def _peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return max([0] + [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"])


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g)
    return torchaq.QuantizedSoftmax(w, num_subspaces=32, progress=False, fit_iters=1).eval()


@pytest.mark.parametrize("batch", [1, 200])
def test_paths_hold_no_more_than_dense(layer, batch):
    h = torch.randn(batch, D, generator=torch.Generator().manual_seed(1))
    w = layer.weight.detach()
    layer.topk(h[:1], k=10)  # caches built before measuring
    dense = _peak_bytes(lambda: F.log_softmax(F.linear(h, w), dim=1).topk(10))
    for name, fn in [
        ("log_softmax_topk", lambda: layer.log_softmax_topk(h, k=10)),
        ("bound", lambda: layer.topk(h, k=10, guarantee="bound")),
        ("entropy", lambda: layer.entropy(h)),
        ("topk", lambda: layer.topk(h, k=10)),
    ]:
        fn()  # persistent caches (the scan bias) are built once, not per call
        peak = _peak_bytes(fn)
        assert peak <= dense, f"{name}: {peak} bytes > dense {dense}"
