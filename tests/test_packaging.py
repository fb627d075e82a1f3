"""What a user installs: a wheel that builds and holds the whole package and the ``upop-fx`` command, which
imports and explains itself without the optional extras (transformers, scikit-learn, Triton, ...)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("transformers", "sklearn", "triton", "accelerate", "pycocoevalcap", "torch_pruning")


def test_the_wheel_installs_and_runs_without_the_extras(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("upop_fx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "upop_fx").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "upop-fx = upop_fx.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)  # fmt: skip
    blocked = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in EXTRAS)
    script = blocked + (
        "import upop_fx, upop_fx.cli\n"
        "print(upop_fx.__file__)\n"
        "sys.argv = ['upop-fx', '--help']\n"
        "upop_fx.cli.main()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, *rest = proc.stdout.splitlines()
    assert first.startswith(str(target))  # the installed copy, not the source tree
    assert "compress" in proc.stdout and "usage: upop-fx" in proc.stdout
