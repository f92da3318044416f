"""The README's Python code blocks run as written.

Every ```python block of README.md is executed in its own subprocess (JAX_PLATFORMS=cpu, the
repository root as working directory and on the path) and must exit 0. A block may be skipped
only explicitly: a `<!-- not-run: reason -->` comment on the line before its opening fence (the
reason is shown in the skip). A README without any python block fails: the test would check
nothing.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number of the opening fence, code, not-run reason or None) of each ```python
    block, in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() in ("```python", "```py"):
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{i + 1}: the python block is never closed")
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = NOT_RUN.search(prev)
            blocks.append((i + 1, "\n".join(lines[start:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return blocks


def test_block_extraction_sees_fences_and_skip_markers():
    text = ("x\n```python\na = 1\n```\n\n<!-- not-run: needs a TPU -->\n```python\nb\n```\n"
            "```\nnot python\n```\n")
    assert python_blocks(text) == [(2, "a = 1\n", None), (7, "b\n", "needs a TPU")]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip(f"README.md:{line} is marked not-run: {reason}")
    script = tmp_path / f"readme_block_{line}.py"
    script.write_text(code)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (f"the python block at README.md:{line} fails as written "
                               f"(exit {r.returncode}):\n{r.stderr[-3000:]}")
