"""The README's runnable examples run."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.lstrip().startswith("import torch")]


def test_readme_examples_run():
    blocks = _blocks()
    assert blocks, "no runnable example found in README.md"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
