"""README.md's code runs as written: every ```python block, in order, in one namespace.

The blocks are taken from the file verbatim (no edits), so a README that drifts from the API fails
here with the number of the block (1 = the first ```python block) and its first line. They run in
a fresh interpreter so that nothing this test session imported or configured leaks in.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# Runs in the child: execs each block in one shared namespace and names the failing block.
RUNNER = textwrap.dedent(
    """
    import sys, traceback
    blocks = eval(sys.stdin.read())
    namespace = {"__name__": "__readme__"}
    for number, source in enumerate(blocks, start=1):
        try:
            exec(compile(source, f"README.md python block {number}", "exec"), namespace)
        except BaseException:
            first = source.strip().splitlines()[0] if source.strip() else ""
            print(f"README.md python block {number} failed (starts: {first!r}):", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    print(f"ran {len(blocks)} README python blocks")
    """
)


def python_blocks(text: str):
    return [m.group(1) for m in FENCE.finditer(text)]


def test_readme_has_python_blocks():
    assert python_blocks(README.read_text(encoding="utf-8")), "README.md has no ```python block"


def test_readme_python_blocks_run_in_order():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=repr(blocks),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=README.parent,
    )
    assert proc.returncode == 0, f"README.md code failed:\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
