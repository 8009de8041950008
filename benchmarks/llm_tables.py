"""The large-class tables of ``benchmarks/llm_heads.py`` and the fitted layers on them (cached).

Three tables, all ``(V, d)`` float32 with held-out ``(n, d)`` query states:

* ``gemma``  -- a Gemma-3-270M-shaped head, V = 262,144, d = 640 (synthetic, :func:`llm_head`);
* ``llama``  -- a Llama-3-shaped head, V = 128,256, d = 4096 (synthetic, :func:`llm_head`);
* ``datastore`` -- a kNN-LM datastore: 262,144 contextual MiniLM hidden states of real text as the
  classes and the states of *other* passages as queries (:func:`datastore`);
* ``minilm`` -- the MiniLM vocabulary table (30,522 x 384) with real hidden states (the table of
  ``benchmarks/layer.py``), for the ANN curves.

Why the synthetic heads look the way they do (:func:`llm_head`): the output embeddings of trained
LMs are anisotropic -- a few directions carry most of the energy and the singular values decay
roughly as a power law (Gao et al., "Representation Degeneration", ICLR 2019; Ethayarajh, EMNLP
2019), yet the matrix is full rank -- and the row norms spread with token frequency (frequent
tokens have larger norms), a log-normal spread of roughly +-30% around the median. Hidden states
live in the same dominant subspace as the rows they score high. A table of i.i.d. Gaussian rows
(a random-init head) has none of this structure and is *harder* for any quantizer than a trained
head (no dominant subspace to spend the bits on); a table of exactly low-rank rows is far easier.
The model here -- rank d/8 signal with singular values ``j ** -0.5`` carrying 80% of each row's
energy, an isotropic full-rank 20%, log-normal(0, 0.3) row norms, queries in the signal subspace
plus 10% isotropic noise scaled to a softmax entropy of a few nats -- sits between the two.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
from torch import nn

import torchaq
from benchmarks.common import CACHE

ROOT = Path(__file__).resolve().parents[1]
GEMMA = (262_144, 640)
LLAMA = (128_256, 4096)
DATASTORE = 262_144
DATASTORE_QUERIES = 8192
_FIT_SOURCES = ("quantizers/pq.py", "quantizers/aq.py", "ops/encode.py", "quantizers/codebook_update.py",
                "quantizers/kmeans.py", "quantizers/calibrate.py", "quantizers/loss.py", "layer/softmax.py")


def llm_head(v: int, d: int, num_queries: int, seed: int = 0, alpha: float = 0.5, signal: float = 0.8,
             norm_sigma: float = 0.3, logit_std: float = 4.0):
    """Synthetic trained-LM-like head and hidden states (module docstring says why this shape).

    Rows: ``sqrt(signal) * (z * s) @ U.T + sqrt(1 - signal) * e``, ``U`` an orthonormal ``(d, r)``
    basis with ``r = max(32, d // 8)``, ``s_j ∝ j ** -alpha`` (unit total energy), ``z`` and ``e``
    standard normal (``e`` scaled to unit energy), then each row rescaled to a log-normal
    ``exp(norm_sigma * N(0, 1))`` norm. Queries: ``(z' * s) @ U.T`` plus 10% isotropic noise, each
    scaled so that its logits over the rows have standard deviation ``logit_std`` (softmax
    entropy of a few nats). Built in chunks of 16k rows (peak memory ~ the table itself).
    Returns ``(rows (v, d), queries (num_queries, d))`` float32.
    """
    gen = torch.Generator().manual_seed(seed)
    r = max(32, d // 8)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen))[0]  # (d, r)
    spec = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    spec /= spec.norm()
    rows = torch.empty(v, d)
    for i in range(0, v, 16_384):
        n = min(16_384, v - i)
        x = math.sqrt(signal) * (torch.randn(n, r, generator=gen) * spec) @ basis.T
        x += math.sqrt(1 - signal) / math.sqrt(d) * torch.randn(n, d, generator=gen)
        norms = torch.exp(norm_sigma * torch.randn(n, 1, generator=gen))
        rows[i:i + n] = x * (norms / x.norm(dim=1, keepdim=True))
    q = (torch.randn(num_queries, r, generator=gen) * spec) @ basis.T
    q += 0.1 * q.norm(dim=1, keepdim=True) / math.sqrt(d) * torch.randn(num_queries, d, generator=gen)
    sample = rows[torch.randperm(v, generator=gen)[:8192]]
    q *= (logit_std / (q @ sample.T).std(dim=1)).unsqueeze(1)
    return rows, q.contiguous()


def datastore(num_classes: int = DATASTORE, num_queries: int = DATASTORE_QUERIES):
    """kNN-LM datastore from real text: the first ``num_classes`` contextual MiniLM states are the
    classes, the next ``num_queries`` (later windows: other passages) the queries.

    Built with :func:`examples.real_data.load_minilm` (the offline corpus has ~405k tokens in
    windows of 128, enough for 262,144 + 8,192); the first build runs MiniLM over all of it
    (minutes), later loads hit the cache.
    """
    from examples.real_data import load_minilm

    _, states = load_minilm(num_queries=num_classes + num_queries, seed=0)
    return states[:num_classes].contiguous(), states[num_classes:].contiguous()


def minilm(num_queries: int = 8000):
    """The MiniLM vocabulary table and held-out real states (the second half of ``num_queries``)."""
    from examples.real_data import load_minilm, split

    table, queries = load_minilm(num_queries=num_queries, seed=0)
    return table, split(queries, 0.5)


def table(name: str, num_queries: int = 2048):
    """``(rows, fit_queries, eval_queries)`` of a named table (``gemma``, ``llama``, ``datastore``, ``minilm``)."""
    if name == "gemma":
        rows, q = llm_head(*GEMMA, 2 * num_queries, seed=0)
    elif name == "llama":
        rows, q = llm_head(*LLAMA, 2 * num_queries, seed=1)
    elif name == "datastore":
        rows, q = datastore()
    elif name == "minilm":
        rows, (fit_q, eval_q) = minilm()
        return rows, fit_q.contiguous(), eval_q.contiguous()
    else:
        raise ValueError(f"table must be gemma, llama, datastore or minilm, got {name!r}")
    half = q.shape[0] // 2
    return rows, q[:half].contiguous(), q[half:].contiguous()


def _key(rows: torch.Tensor, fit_q: torch.Tensor, **kw) -> str:
    h = hashlib.sha1(repr(sorted(kw.items())).encode())
    for t in (rows, fit_q):
        h.update(str(tuple(t.shape)).encode())
        h.update(t[:64].numpy().tobytes())
        h.update(f"{float(t[::97].double().sum()):.6e}".encode())
    for name in _FIT_SOURCES:
        h.update((ROOT / "torchaq" / name).read_bytes())
    return h.hexdigest()[:16]


def fitted_layer(name: str, rows: torch.Tensor, fit_q: torch.Tensor, num_subspaces=None, quantizer: str = "pq",
                 refit: bool = False, fit_threads: int = 2):
    """The layer on ``rows`` (shares the tensor: no copy), calibrated on ``fit_q``; cached without the weight.

    Returns ``(layer, fit_seconds, cached)``: wall seconds of the fit with ``fit_threads`` threads,
    measured now or at the build of the cache (then ``cached`` is True).
    """
    m = num_subspaces or rows.shape[1] // 2
    file = CACHE / f"llm_{name}_{quantizer}_M{m}_{_key(rows, fit_q, m=m, q=quantizer)}.pt"
    weight = nn.Parameter(rows, requires_grad=False)
    if file.is_file() and not refit:
        blob = torch.load(file, weights_only=False)
        layer = torchaq.QuantizedSoftmax(weight, num_subspaces=m, quantizer=quantizer, fit=False, progress=False)
        state = blob["state"]
        state["weight"] = weight
        layer.load_state_dict(state)
        return layer.eval(), blob["fit_s"], True
    threads = torch.get_num_threads()
    torch.set_num_threads(fit_threads)
    start = time.perf_counter()
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=m, quantizer=quantizer, queries=fit_q, progress=False)
    fit_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    state = {k: v for k, v in layer.state_dict().items() if k != "weight"}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "fit_s": fit_s}, file)
    return layer.eval(), fit_s, False


def index_bytes(layer) -> dict:
    """Bytes per class of what the layer keeps besides the float weight: the packed codes, the
    int8 copy of the rows its shortlist pass reads (``d + 4`` bytes: values and one scale), and
    the per-row float residual norm; and the dense weight in fp32 / bf16 for comparison."""
    v, d = layer.num_classes, layer.dim
    codes = layer.packed_codes.numel() / v
    return dict(codes=codes, int8=d + 4.0, norms=4.0, fp32=4.0 * d, bf16=2.0 * d)
