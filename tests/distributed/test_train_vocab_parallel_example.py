"""examples/train_vocab_parallel.py runs end to end (2 gloo ranks it spawns itself, a few steps)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_trains_a_few_steps():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "examples" / "train_vocab_parallel.py"), "--vocab", "256", "--tokens", "5000",
           "--steps", "4", "--eval-every", "2", "--refresh-every", "2", "--refit-every", "4", "--batch", "16",
           "--num-sampled", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "refit" in lines[-1], out.stdout
