"""`make demo`: torchaq's drop-in output layer on a real model's vocabulary and real hidden states.

Loads the MiniLM (BERT, d = 384) vocabulary table and real hidden states of real English text
(shipped in a PyPI wheel; nothing is downloaded), fits a ``torchaq.QuantizedSoftmax`` on the
table with half of the hidden states as calibration queries, and prints one table against the
exact ``nn.Linear`` + ``torch.topk``: latency at batch 1 and 64, recall@1/10, total-variation
distance of top-50 sampling, and the log-partition error of ``log_softmax_topk``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import layer  # noqa: E402

if __name__ == "__main__":
    layer.main(["--out", ""])
