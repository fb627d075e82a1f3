"""What a decoder's user pays, measured: the prefill of a prompt and the tokens per second of decoding with the
KV cache, of several models side by side (each through its own ``generate``, the loop its users run).

A decoder is used in two regimes: the *prefill* runs the whole prompt once (``batch × context`` tokens, like an
encoder), and every further token is one *decode* step over the cache. Pruning speeds them up differently (decode
is bound by reading the weights, prefill by the matmuls), so both are measured:

* ``prefill_ms`` — one forward of ``batch`` prompts of ``context`` tokens with the cache on;
* ``generate_ms`` — ``generate`` of ``new_tokens`` greedy tokens after that prompt (``min_new_tokens`` too, so an
  end-of-sequence token never stops it early): the prefill plus ``new_tokens - 1`` decode steps;
* ``decode_ms`` — ``(generate_ms - prefill_ms) / (new_tokens - 1)``, one decode step at that context, and
  ``tokens_per_s`` — ``batch`` tokens per decode step.

The models are timed interleaved (:func:`~upop_fx.runtime.timing.time_interleaved`), so they see the same load.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from upop_fx.runtime.decode import decode_latency
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> (t,) = decode_latency([lm], context=16, new_tokens=4, runs=2, warmup=0)
    >>> t.prefill_ms > 0 and t.tokens_per_s > 0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .timing import time_interleaved

__all__ = ["DecodeTiming", "decode_latency"]


@dataclass
class DecodeTiming:
    """One model's medians (see the module docstring)."""

    prefill_ms: float
    generate_ms: float
    decode_ms: float
    tokens_per_s: float
    batch: int
    context: int
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_latency(models: Sequence[torch.nn.Module], batch: int = 1, context: int = 256, new_tokens: int = 32,
                   runs: int = 5, warmup: int = 1, seed: int = 0) -> list[DecodeTiming]:
    """Prefill and decode timings of each of ``models`` (causal LMs with ``generate``, in eval mode, sharing a
    vocabulary) on the same random prompt of ``batch × context`` tokens, interleaved; see the module docstring."""
    if new_tokens < 2 or context < 1 or batch < 1:
        raise ConfigError(f"decode_latency needs new_tokens >= 2, context >= 1 and batch >= 1 (got new_tokens="
                          f"{new_tokens}, context={context}, batch={batch})")
    if not models or not all(hasattr(m, "generate") for m in models):
        raise ConfigError("decode_latency times models with a generate() method (a Hugging Face causal LM)")
    vocab = min(int(m.get_input_embeddings().num_embeddings) for m in models)
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(models[0].parameters()).device)
    mask = torch.ones_like(ids)

    def prefill(m: torch.nn.Module) -> Any:
        def run() -> Any:
            with torch.inference_mode():
                return m(input_ids=ids, attention_mask=mask, use_cache=True)
        return run

    def generate(m: torch.nn.Module) -> Any:
        pad = getattr(m.generation_config, "pad_token_id", None)
        pad = pad if pad is not None else getattr(m.generation_config, "eos_token_id", None)

        def run() -> Any:
            with torch.inference_mode():
                return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return run

    medians = time_interleaved(*[prefill(m) for m in models], *[generate(m) for m in models], runs=runs,
                               warmup=warmup)
    n = len(models)
    out = []
    for p_ms, g_ms in zip(medians[:n], medians[n:]):
        step = max(g_ms - p_ms, 0.0) / (new_tokens - 1)
        out.append(DecodeTiming(p_ms, g_ms, step, batch * 1000.0 / step if step > 0 else float("inf"), batch, context,
                                new_tokens))
    return out
