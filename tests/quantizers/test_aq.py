"""torchaq.AnisotropicAQ and the aq_encode op: search, update, fit, calibration, layer, bad inputs."""
import io

import pytest
import torch

import torchaq
from torchaq import ops
from torchaq.ops.aq_encode import aq_encode_reference
from torchaq.quantizers.aq_update import aq_codebook_update
from torchaq.quantizers.loss import score_aware_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sphere(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=_gen(seed)), dim=1)


def _decode(codes, books):
    return books[torch.arange(books.shape[0]), codes.long()].sum(1)


def _loss(x, codes, books, eta):
    return score_aware_loss(x, _decode(codes, books), eta)


@pytest.fixture(scope="module")
def data():
    return _sphere(1200, 24, 0)


@pytest.fixture(scope="module")
def fitted(data):
    return torchaq.AnisotropicAQ(24, 6, eta=3.0, seed=0).fit(data, iters=3, progress=False)


def _case(n=300, m=5, k=16, d=20, seed=1, rounds=2, perts=3):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    books = 0.4 * torch.randn(m, k, d, generator=g)
    codes = torch.randint(0, k, (n, m), generator=g)
    eta = 1 + 4 * torch.rand(n, generator=g)
    perturb = torch.randint(0, m * k, (rounds, n, perts), generator=g)
    return x, books, codes, eta, perturb


# ---------------------------------------------------------------------------------------------
# the encoder op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("greedy", [True, False])
def test_cpu_kernel_matches_reference(greedy):
    x, books, codes, eta, perturb = _case()
    got = torch.ops.torchaq.aq_encode(x, books, codes, eta, perturb, 2, greedy)
    want = aq_encode_reference(x, books, codes, eta, perturb, 2, greedy)
    assert got.dtype == torch.int64 and got.shape == codes.shape
    # same algorithm, same float order: the codes agree (allow a rare rounding tie)
    assert (got == want).all(1).float().mean() >= 0.99
    assert torch.allclose(_loss(x, got, books, eta).mean(), _loss(x, want, books, eta).mean(), rtol=1e-4)


def test_search_never_increases_loss_and_local_search_helps():
    x, books, codes, eta, perturb = _case(rounds=4)
    start = _loss(x, codes, books, eta)
    icm = ops.aq_encode(x, books, codes, eta, perturb[:0], 2, False)
    ils = ops.aq_encode(x, books, codes, eta, perturb, 2, False)
    l_icm, l_ils = _loss(x, icm, books, eta), _loss(x, ils, books, eta)
    assert (l_icm <= start + 1e-4).all() and (l_ils <= l_icm + 1e-4).all()
    assert l_icm.mean() < 0.7 * start.mean() and l_ils.mean() < l_icm.mean()
    greedy = ops.aq_encode(x, books, codes, eta, perturb[:0], 0, True)
    assert _loss(x, greedy, books, eta).mean() < start.mean()


def test_anisotropic_search_lowers_parallel_residual():
    x, books, codes, _, perturb = _case()
    iso = ops.aq_encode(x, books, codes, torch.ones(x.shape[0]), perturb, 2, True)
    eta = torch.full((x.shape[0],), 8.0)
    ani = ops.aq_encode(x, books, codes, eta, perturb, 2, True)

    def par(c):
        r = x - _decode(c, books)
        return ((r * x).sum(1) ** 2 / (x * x).sum(1)).mean()

    assert par(ani) < 0.8 * par(iso)
    assert _loss(x, ani, books, eta).mean() < _loss(x, iso, books, eta).mean()





def test_op_bad_inputs():
    x, books, codes, eta, perturb = _case(n=20, m=3, d=8)
    for fn in (ops.aq_encode, aq_encode_reference):
        with pytest.raises(ValueError, match="codes must be in"):
            fn(x, books, codes + 16, eta, perturb, 1, False)
        with pytest.raises(ValueError, match="perturb must be in"):
            fn(x, books, codes, eta, perturb + 48, 1, False)
    with pytest.raises((ValueError, RuntimeError), match="x has d"):
        ops.aq_encode(x[:, :5], books, codes, eta, perturb, 1, False)
    with pytest.raises((TypeError, RuntimeError), match="float32"):
        ops.aq_encode(x.double(), books, codes, eta, perturb, 1, False)


# ---------------------------------------------------------------------------------------------
# codebook update
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta_value", [1.0, 4.0])
def test_update_is_the_minimiser(eta_value):
    x, books, codes, _, _ = _case(n=400, m=4, d=12)
    eta = torch.full((x.shape[0],), eta_value)
    new = aq_codebook_update(x, codes, eta, books)
    base = _loss(x, codes, new, eta).sum()
    assert base < _loss(x, codes, books, eta).sum()
    # no small move of the codebooks lowers the loss (a minimiser of the convex quadratic)
    for seed in range(3):
        step = 1e-2 * torch.randn(books.shape, generator=_gen(seed))
        assert _loss(x, codes, new + step, eta).sum() >= base * (1 - 1e-5)


# ---------------------------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------------------------
def test_roundtrip_shapes_and_scores(fitted, data):
    codes = fitted.encode(data)
    assert codes.dtype == torch.uint8 and codes.shape == (1200, 6)
    rec = fitted.decode(codes)
    q = _sphere(7, 24, 3)
    assert torch.allclose(fitted.score(q, codes), q @ rec.T, atol=1e-4)
    lut = fitted.lut(q)
    assert lut.shape == (7, 6, 16)
    assert torch.allclose(lut.sum(1) if False else lut[:, 2], q @ fitted.codebooks[2].T, atol=1e-5)
    assert torch.equal(fitted.encode(data), codes)  # deterministic


def test_beats_pq_at_equal_bits_on_reconstruction(data):
    aq = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, iters=3, progress=False)
    pq = torchaq.AnisotropicPQ(24, 6, threshold=None, seed=0).fit(data, iters=3, progress=False)
    err_aq = (aq.decode(aq.encode(data)) - data).pow(2).sum(1).mean()
    err_pq = (pq.decode(pq.encode(data)) - data).pow(2).sum(1).mean()
    assert err_aq < 0.9 * err_pq, (err_aq, err_pq)


def test_fit_lowers_loss_with_iterations(data):
    few = torchaq.AnisotropicAQ(24, 6, eta=3.0, seed=0).fit(data, iters=0, progress=False)
    more = torchaq.AnisotropicAQ(24, 6, eta=3.0, seed=0).fit(data, iters=3, progress=False)
    assert more.loss(data).mean() < 0.95 * few.loss(data).mean()


def test_anisotropic_fit_has_lower_score_aware_loss(data, fitted):
    iso = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, iters=3, progress=False)
    eta = fitted.row_eta(data)
    l_iso = score_aware_loss(data, iso.decode(iso.encode(data)), eta).mean()
    assert fitted.loss(data).mean() < l_iso


def test_calibration_never_below_isotropic(data):
    q = _sphere(300, 24, 5)
    aq = torchaq.AnisotropicAQ(24, 6, threshold=0.3, seed=0).fit(data, queries=q, iters=2, progress=False)
    assert aq.calibration is not None and "isotropic" in aq.calibration
    assert str(aq.rule) in aq.calibration
    # the chosen rule scored at least as well as isotropic on the selection slice
    assert aq.calibration[str(aq.rule)] >= aq.calibration["isotropic"]


def test_state_dict_roundtrip(fitted, data):
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    other = torchaq.AnisotropicAQ(24, 6)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.rule == fitted.rule
    fresh = _sphere(50, 24, 11)  # rows fit did not see: both encode from the greedy start
    assert torch.equal(other.encode(fresh), fitted.encode(fresh))
    assert torch.equal(other.decode(other.encode(fresh)), fitted.decode(fitted.encode(fresh)))


def test_encode_warm_starts_training_rows(data):
    """Rows fit trained on start from fit's codes (torchaq.aq_warm): never worse, and better than cold."""
    aq = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, iters=3, progress=False)
    cold = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0)
    cold.load_state_dict(aq.state_dict())  # same codebooks, no warm starts
    warm_loss, cold_loss = aq.loss(data), cold.loss(data)
    assert warm_loss.mean() < 0.99 * cold_loss.mean(), (warm_loss.mean(), cold_loss.mean())
    # a mixed batch in any order: known rows keep their warm codes, unknown rows are encoded cold
    fresh = _sphere(40, 24, 12)
    mixed = torch.cat([fresh[:20], data[:300].flip(0), fresh[20:]])
    codes, cold_codes = aq.encode(mixed), cold.encode(mixed)
    assert torch.equal(codes[:20], cold_codes[:20]) and torch.equal(codes[320:], cold_codes[320:])
    # a row's codes do not depend on its batch (per-row perturbations): shards, refreshes, the whole table
    assert torch.equal(codes[20:320], aq.encode(data[:300]).flip(0))
    assert torch.equal(codes[:20], aq.encode(fresh[:20])) and torch.equal(codes[5], aq.encode(fresh[5:6])[0])
    assert aq.loss(mixed[20:320], codes[20:320]).mean() < 0.99 * aq.loss(mixed[20:320], cold_codes[20:320]).mean()
    # new codebooks (load_state_dict writes in place) invalidate the warm starts
    aq.load_state_dict(cold.state_dict())
    assert torch.equal(aq.encode(data[:100]), cold.encode(data[:100]))


def test_bad_arguments(fitted, data):
    with pytest.raises(ValueError, match="num_codebooks"):
        torchaq.AnisotropicAQ(24, 0)
    with pytest.raises(ValueError, match="dim"):
        torchaq.AnisotropicAQ(True, 4)
    with pytest.raises(ValueError, match="bits"):
        torchaq.AnisotropicAQ(24, 4, bits=5)
    with pytest.raises(ValueError, match="eta"):
        torchaq.AnisotropicAQ(24, 4, eta=0.5)
    with pytest.raises(ValueError, match="threshold"):
        torchaq.AnisotropicAQ(24, 4, threshold=-1.0)
    with pytest.raises(ValueError, match="either"):
        torchaq.AnisotropicAQ(24, 4, threshold=0.2, eta=2.0)
    aq = torchaq.AnisotropicAQ(24, 4, threshold=None)
    with pytest.raises(RuntimeError, match="not fitted"):
        aq.encode(data)
    with pytest.raises(ValueError, match="iters"):
        aq.fit(data, iters=-1, progress=False)
    with pytest.raises(ValueError, match="max_rows"):
        aq.fit(data, max_rows=3, progress=False)
    with pytest.raises(ValueError, match="x has 10 rows"):
        aq.fit(data[:10], progress=False)
    bad = data[:100].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x has NaN"):
        aq.fit(bad, progress=False)
    with pytest.raises(ValueError, match="queries must have at least 20"):
        aq.fit(data, queries=data[:5], progress=False)
    with pytest.raises(ValueError, match="columns"):
        fitted.encode(data[:, :10])
    with pytest.raises(ValueError, match="codes must be in"):
        fitted.decode(torch.full((3, 6), 16))
    with pytest.raises(TypeError, match="integer"):
        fitted.decode(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="q must have last dimension"):
        fitted.lut(torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# the layer on additive codes
# ---------------------------------------------------------------------------------------------
def test_layer_with_aq_quantizer():
    gen = _gen(7)
    centres = torch.randn(30, 24, generator=gen)
    weight = centres[torch.randint(0, 30, (1500,), generator=gen)] + 0.5 * torch.randn(1500, 24, generator=gen)
    h = weight[torch.randint(0, 1500, (32,), generator=gen)] + 0.5 * torch.randn(32, 24, generator=gen)
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=6, quantizer="aq", fit_iters=2, progress=False).eval()
    assert isinstance(layer.quantizer, torchaq.AnisotropicAQ)
    exact = h @ weight.T
    values, idx = layer.topk(h, k=5, candidates=100)
    torch.testing.assert_close(values, exact.gather(1, idx))
    true = exact.topk(5).indices
    assert (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean() >= 0.95
    # refresh after the weights move, and the state round-trips
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.randn(weight.shape, generator=gen))
    layer.refresh()
    other = torchaq.QuantizedSoftmax(weight, num_subspaces=6, quantizer="aq", fit=False, progress=False)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.topk(h, k=5)[0], layer.topk(h, k=5)[0])
    with pytest.raises(ValueError, match="quantizer"):
        torchaq.QuantizedSoftmax(weight, quantizer="opq", progress=False)


def test_warm_started_anisotropic_updates_stay_bounded():
    """The CG operator carries the ridge: repeated warm-started updates do not drift along the
    null space of B^T B (codewords growing without bound while the decodes stay put)."""
    x, books, codes, _, _ = _case(n=600, m=6, d=16, seed=4)
    eta = torch.full((x.shape[0],), 4.0)
    books = aq_codebook_update(x, codes, eta, books)
    first = float(books.norm())
    for _ in range(6):
        books = aq_codebook_update(x, codes, eta, books)
    assert float(books.norm()) < 1.05 * first, (first, float(books.norm()))


def test_calibration_isotropic_path_is_the_plain_fit(data, monkeypatch):
    """The query split has its own generator: with isotropic as the only candidate, a calibrated fit
    is bitwise the plain isotropic fit (so 'never below isotropic' compares against the real thing)."""
    import torchaq.quantizers.aq as aq_module

    monkeypatch.setattr(aq_module, "AQ_ETA_GRID", ())
    q = _sphere(300, 24, 5)
    plain = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, iters=2, progress=False)
    calibrated = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, queries=q, iters=2, progress=False)
    assert list(calibrated.calibration) == ["isotropic"] and calibrated.rule == plain.rule
    assert torch.equal(calibrated.codebooks, plain.codebooks)
    assert torch.equal(calibrated.encode(data), plain.encode(data))


def test_warm_state_roundtrip_and_bad_input(data):
    aq = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0).fit(data, iters=1, progress=False)
    other = torchaq.AnisotropicAQ(24, 6, threshold=None, seed=0)
    other.load_state_dict(aq.state_dict())
    assert not torch.equal(other.encode(data), aq.encode(data))  # cold vs warm
    other.load_warm_state(aq.warm_state())
    assert torch.equal(other.encode(data), aq.encode(data))
    with pytest.raises(ValueError, match="warm state"):
        other.load_warm_state({"keys": torch.zeros(5, dtype=torch.int64), "codes": torch.zeros(5, 3, dtype=torch.uint8)})
    other.load_warm_state(None)
    assert other.warm_state() is None
