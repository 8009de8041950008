"""``torch.library.opcheck`` on every ``torch.ops.torchaq.*`` op, driven by one table of sample inputs.

The table must cover every op the dispatcher knows in the ``torchaq`` namespace: an op added
without an entry here fails :func:`test_every_op_has_sample_inputs`. The kernels checked are the
ones registered for CPU tensors (the C++ kernels when ``torchaq._C`` loaded, else the references).
"""
from __future__ import annotations

import math

import pytest
import torch

import torchaq
from torchaq import ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lut_case(batch, n, m, bits, seed, bias=False):
    g = _gen(seed)
    k = 16 if bits == 4 else 256
    packed = ops.pack_codes(torch.randint(0, k, (n, m), dtype=torch.uint8, generator=g), bits)
    lut = torch.randn(batch, m, k, generator=g)
    return lut, packed, (torch.randn(n, generator=g) if bias else None)


def _compute_lut():
    g = _gen(0)
    return [(torch.randn(3, 28, generator=g), torch.randn(7, 16, 4, generator=g))]


def _pack_codes():
    g = _gen(1)
    return [(torch.randint(0, 16, (100, 7), dtype=torch.uint8, generator=g), 4),
            (torch.randint(0, 256, (70, 3), dtype=torch.uint8, generator=g), 8)]


def _unpack_codes():
    _, packed4, _ = _lut_case(1, 100, 7, 4, seed=2)
    _, packed8, _ = _lut_case(1, 70, 3, 8, seed=3)
    return [(packed4, 7, 4, 100), (packed8, 3, 8, 70)]


def _lut_score():
    lut4, packed4, b = _lut_case(3, 100, 7, 4, seed=4, bias=True)
    lut8, packed8, _ = _lut_case(2, 70, 3, 8, seed=5)
    return [(lut4, packed4, 100, b), (lut8, packed8, 70)]


def _lut_score_quantized():
    lut4, packed4, b = _lut_case(3, 100, 7, 4, seed=4, bias=True)
    lut8, packed8, _ = _lut_case(2, 70, 3, 8, seed=5)
    return [(lut4, packed4, 100, b), (lut4, packed4, 100), (lut8, packed8, 70), (lut4, packed4, 100, b, 128),
            (lut8, packed8, 70, None, 96)]


def _row_topk():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(4, 300, generator=g)
    return [(scores, 10), (scores.round(), 50), (scores, 400), (torch.randn(4, 320, generator=g)[:, :300], 10)]


def _row_log_partition():
    g = _gen(7)
    h, w, b = torch.randn(3, 20, generator=g), torch.randn(90, 20, generator=g), torch.randn(90, generator=g)
    return [(h, w, b, 1.0, None), (h, w, None, 0.5, torch.tensor([0.0, -math.inf, 1.0])),
            (h, w.to(torch.bfloat16), b, 2.0, None)]


def _inverse_cdf():
    g = _gen(9)
    w = torch.rand(3, 5, 8, generator=g)
    w[1, 2] = 0.0  # an empty block
    cum = w.sum(dim=2).cumsum(dim=1, dtype=torch.float64)
    rows = torch.tensor([0, 2, 1, 1])
    return [(w, cum, rows, torch.rand(4, 6, generator=g, dtype=torch.float64))]


def _reject_rounds():
    from conftest import rejection_plan

    args = rejection_plan(5, draws=6)
    return [(*args, 4, 3, False), (*args, 2, 2, True)]


def _proposal_weights():
    g = _gen(10)
    upper, logits = torch.randn(3, 50, generator=g), torch.randn(3, 7, generator=g).sort(dim=1, descending=True).values
    upper[:, ::5] = -math.inf
    floor = torch.tensor([-math.inf, 0.0, -math.inf])
    top = torch.maximum(logits[:, 0], upper.amax(dim=1))
    cases = []
    for t, block, width in ((1.0, 16, 80), (0.6, 7, 70)):
        buf = torch.zeros(3, width)
        buf[:, :50] = upper
        cases.append((buf, 50, logits, floor, top, t, block))
    return cases


def _tail_bounds():
    g = _gen(12)
    buf, rho, h = torch.randn(3, 70, generator=g), torch.rand(50, generator=g), torch.randn(3, 8, generator=g)
    step = torch.rand(3, generator=g)
    head = torch.stack([torch.randperm(50, generator=g)[:6] for _ in range(3)])
    return [(buf[:, :50].contiguous(), rho, h, 4.75, step, 2.0, head), (buf[:, :50], rho, h.bfloat16(), 0.0, step, 0.0, head)]


def _mass_histogram():
    g = _gen(11)
    h, w, b = torch.randn(3, 20, generator=g), torch.randn(90, 20, generator=g), torch.randn(90, generator=g)
    top = (h @ w.T + b).amax(dim=1) + 0.01
    return [(h, w, b, 1.0, top, 0.05, 64), (h, w, None, 0.5, top, 0.5, 5)]


def _lut_topk():
    lut4, packed4, b = _lut_case(3, 100, 7, 4, seed=4, bias=True)
    lut8, packed8, _ = _lut_case(2, 70, 3, 8, seed=5)
    return [(lut4, packed4, 100, 10, b), (lut4, packed4, 100, 10), (lut8, packed8, 70, 5)]


def _encode_case(n=40, m=4, k=16, dsub=2, seed=3):
    g = _gen(seed)
    x = torch.randn(n, m * dsub, generator=g)
    cb = torch.randn(m, k, dsub, generator=g)
    eta = 1 + 7 * torch.rand(n, generator=g)
    codes = torch.randint(0, k, (n, m), generator=g)
    return x, cb, eta, codes


def _pq_encode():
    x, cb, _, _ = _encode_case()
    return [(x, cb)]


def _anisotropic_encode():
    x, cb, eta, _ = _encode_case()
    return [(x, cb, eta, 3)]


def _aq_encode():
    g = _gen(6)
    n, m, k, d = 12, 2, 4, 6
    x = torch.randn(n, d, generator=g)
    books = 0.4 * torch.randn(m, k, d, generator=g)
    codes = torch.randint(0, k, (n, m), generator=g)
    eta = 1 + 4 * torch.rand(n, generator=g)
    perturb = torch.randint(0, m * k, (1, n, 1), generator=g)
    return [(x, books, codes, eta, perturb, 1, True)]


def _normal_apply():
    x, cb, eta, codes = _encode_case(seed=4)
    coef = (eta - 1) / (x * x).sum(1)
    return [(x, codes, coef, cb), (x, codes.to(torch.uint8), coef, cb)]


def _normal_rhs():
    x, _, eta, codes = _encode_case(seed=10)
    coef = (eta - 1) / (x * x).sum(1)
    return [(x, codes, eta, coef, 16), (x, codes.to(torch.uint8), eta, coef, 16)]


def _rescore_topk():
    g = _gen(3)
    h, w, b = torch.randn(3, 20, generator=g), torch.randn(120, 20, generator=g), torch.randn(120, generator=g)
    cand = torch.stack([torch.randperm(120, generator=g)[:16] for _ in range(3)])
    return [(h, w, b, cand, 5), (h, w, None, cand, 5)]


def _layer_topk():
    g = _gen(7)
    weight, bias = torch.randn(300, 16, generator=g), 0.1 * torch.randn(300, generator=g)
    weight[5] *= 40  # a row for the side list
    layer = torchaq.QuantizedSoftmax(weight, bias, fit_iters=1, progress=False)
    h = torch.randn(3, 16, generator=g)
    q = layer.quantizer
    cases = []
    for shortlist in (0, 16):
        w8, scale = ops.quantize_rows_int8(layer.weight) if shortlist else (None, None)
        cases.append((h, q.pad(h), q.codebooks, layer.packed_codes, layer.num_classes, 64, layer.float_bias(),
                      layer.weight.detach(), layer.bias.detach(), layer.side_rows, w8, scale, shortlist, 10))
    return cases


def _layer_sample():
    g = _gen(13)
    weight, bias = torch.randn(300, 16, generator=g), 0.1 * torch.randn(300, generator=g)
    weight[5] *= 40  # a row for the side list
    layer = torchaq.QuantizedSoftmax(weight, bias, fit_iters=1, progress=False)
    h = 2 * torch.randn(3, 16, generator=g)
    q = layer.quantizer
    seeds = torch.tensor([0, -7, 2 ** 40])
    common = (h, q.pad(h), q.codebooks, layer.packed_codes, 300, layer.scan_bias(), layer.weight.detach())
    return [common + (layer.bias.detach(), layer.side_rows, layer.error_scales, seeds, 40, 4.75, 3.0, 1.0, 60.0, 64, 8, 3),
            common + (None, layer.side_rows, layer.error_scales, seeds, 20, 4.75, 0.0, 0.5, 60.0, 32, 4, 0)]


def _linear_ce():
    g = _gen(8)
    e, c, b = torch.randn(9, 6, generator=g), torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    t = torch.randint(0, 30, (9,), generator=g)
    t[2] = -100
    rg = torch.rand(9, generator=g)
    return [(e, c, b, t, None, -100, 0.0, 0.0, 0.0, 8, 0), (e, c, b, t, rg, -100, 3.0, 0.1, 1e-2, 7, 4),
            (e, c, None, t, rg, -100, 0.0, 0.0, 0.0, 512, 0)]


SAMPLE_INPUTS = {
    "compute_lut": _compute_lut,
    "pack_codes": _pack_codes,
    "unpack_codes": _unpack_codes,
    "lut_score": _lut_score,
    "lut_topk": _lut_topk,
    "lut_score_quantized": _lut_score_quantized,
    "row_topk": _row_topk,
    "row_log_partition": _row_log_partition,
    "inverse_cdf": _inverse_cdf,
    "reject_rounds": _reject_rounds,
    "proposal_weights_": _proposal_weights,
    "tail_bounds_": _tail_bounds,
    "mass_histogram": _mass_histogram,
    "pq_encode": _pq_encode,
    "anisotropic_encode": _anisotropic_encode,
    "aq_encode": _aq_encode,
    "anisotropic_normal_apply": _normal_apply,
    "anisotropic_normal_rhs": _normal_rhs,
    "rescore_topk": _rescore_topk,
    "layer_topk": _layer_topk,
    "layer_sample": _layer_sample,
    "linear_ce": _linear_ce,
}


def registered_ops() -> set:
    """Every op of the ``torchaq`` namespace the dispatcher knows (Python schemas and any C++ one)."""
    names = torch._C._dispatch_get_all_op_names()
    return {n.split("::", 1)[1].split(".", 1)[0] for n in names if n.startswith("torchaq::")}


def test_every_op_has_sample_inputs():
    missing = registered_ops() - SAMPLE_INPUTS.keys()
    assert not missing, f"ops without sample inputs in tests/ops/test_opcheck.py: {sorted(missing)}"
    assert registered_ops() == set(ops.SCHEMAS) == set(ops.REFERENCES)


@pytest.mark.parametrize("name", sorted(SAMPLE_INPUTS))
def test_opcheck(name):
    op = getattr(torch.ops.torchaq, name).default
    for args in SAMPLE_INPUTS[name]():
        torch.library.opcheck(op, args)
