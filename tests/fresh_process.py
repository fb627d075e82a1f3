"""A saved checkpoint loaded and run where upop_fx is not imported: what a user of plain transformers gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def plain_generate(path: Path, new_tokens: int = 8, **inputs: torch.Tensor) -> list[list[int]]:
    """The greedy tokens (``new_tokens`` of them, after ``inputs``) of ``AutoModelForCausalLM.from_pretrained(path)``
    in a fresh Python process that never imports upop_fx (asserted there)."""
    tensors = "".join(f"{k} = torch.tensor({v.tolist()})\n" for k, v in inputs.items())
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()\n"
        f"{tensors}"
        f"out = m.generate({', '.join(f'{k}={k}' for k in inputs)}, max_new_tokens={new_tokens}, "
        f"min_new_tokens={new_tokens}, do_sample=False)\n"
        "assert 'upop_fx' not in sys.modules\n"
        "print(json.dumps(out.tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
