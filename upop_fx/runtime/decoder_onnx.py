"""A decoder LM as ONNX Runtime serves it: one step with the KV cache as inputs and outputs, checked by a greedy
decode against the model's own ``generate``.

:func:`export_decoder_onnx` exports a Hugging Face causal LM (``result.module`` of a decoder, or the dense model)
as one step: inputs ``input_ids`` (batch × new tokens), ``attention_mask`` (batch × past + new) and, per layer,
``past.{i}.key`` / ``past.{i}.value`` (batch × KV heads × past × head dim — each layer with its own KV head count,
as a non-uniform cut leaves them); outputs ``logits`` and ``present.{i}.key`` / ``present.{i}.value``. The first
step (the prefill) feeds pasts of length 0. Every axis but the head counts and sizes is dynamic. Checked on
Llama, Qwen3, GPT-2 and a multi-query GPTBigCode; a sliding-window layer (Gemma 3) or a grouped-matmul MoE
(Mixtral) is refused with :class:`~upop_fx.errors.ExportError` (the decode differs, or the step does not convert).

:func:`ort_greedy` decodes with that file in ONNX Runtime; the export checks that it gives the tokens of
``model.generate`` (greedy, ``parity_tokens`` new tokens) and raises :class:`~upop_fx.errors.ExportError` if not.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from upop_fx.runtime.decoder_onnx import export_decoder_onnx, ort_greedy
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> path = export_decoder_onnx(lm, tempfile.mkdtemp() + "/lm.onnx", parity_tokens=4)
    >>> ort_greedy(path, torch.tensor([[5, 6, 7]]), 4).shape
    torch.Size([1, 7])
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from .export import _check_destination, _eval_copy, _first_line, _root_cause
from .sessions import ort_session

__all__ = ["export_decoder_onnx", "ort_greedy"]


class _Step(torch.nn.Module):
    """``model`` as one decode step over a flat list of per-layer keys and values."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[Any, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()  # full-attention layers (a sliding-window cache crops by its length: not exported)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{_cache_argument(self.model): cache})
        present = []
        for layer in _cache_of(out).layers[:self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers ≥ 5.2x), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _kv_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(KV heads, head dim) of every layer, read from one forward with the cache on."""
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long, device=_device(model)), use_cache=True)
    cache = _cache_of(out)
    if cache is None or not hasattr(cache, "layers"):
        raise ExportError(f"{type(model).__name__} returns no KV cache with use_cache=True: not a decoder to export")
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in cache.layers]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def export_decoder_onnx(model: torch.nn.Module, path: str | os.PathLike[str], parity_tokens: int = 32,
                        prompt: torch.Tensor | None = None) -> Path:
    """Export ``model`` (a Hugging Face causal LM; never modified: an eval-mode copy on the CPU is exported) as a
    KV-cache decode step to ``path`` (see the module docstring), then check that :func:`ort_greedy` on it gives
    ``model.generate``'s ``parity_tokens`` greedy tokens after ``prompt`` (default: 8 fixed token ids)."""
    dest = _check_destination(path)
    work = _eval_copy(model).cpu()
    shapes = _kv_shapes(work)
    batch, new, past_len = 2, 3, 4
    ids = torch.randint(3, int(work.get_input_embeddings().num_embeddings), (batch, new),
                        generator=torch.Generator().manual_seed(0))
    past = [torch.randn(batch, h, past_len, d) for h, d in shapes for _ in range(2)]
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    step = _Step(work, len(shapes))
    try:
        ep = torch.export.export(step, (ids, mask, *past), dynamic_shapes=dynamic, strict=False)
        program = torch.onnx.export(ep, (), dynamo=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - whatever torch fails on is the reason the file is not written
        cause = _root_cause(exc)
        raise ExportError(f"{type(model).__name__} could not be exported as a decode step: "
                          f"{type(cause).__name__}: {_first_line(cause)}") from exc
    graph = program.model.graph
    names = ["input_ids", "attention_mask"] + [f"past.{i}.{kv}" for i in range(len(shapes)) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(len(shapes)) for kv in ("key", "value")]
    if len(graph.inputs) != len(names) or len(graph.outputs) != len(outs):
        raise ExportError(f"the decode step has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, "
                          f"expected {len(names)} and {len(outs)}")
    for value, name in [*zip(graph.inputs, names), *zip(graph.outputs, outs)]:
        value.name = name
    program.save(str(dest))
    if parity_tokens:
        start = prompt if prompt is not None else torch.arange(3, 11).unsqueeze(0)
        with torch.no_grad():
            want = work.generate(input_ids=start, attention_mask=torch.ones_like(start), max_new_tokens=parity_tokens,
                                 min_new_tokens=parity_tokens, do_sample=False,
                                 pad_token_id=work.generation_config.pad_token_id or 0)
        try:
            got = ort_greedy(dest, start, parity_tokens)
        except Exception as exc:  # noqa: BLE001 - a step that does not run in ONNX Runtime is not exported
            dest.unlink(missing_ok=True)
            raise ExportError(f"the exported decode step of {type(model).__name__} fails in ONNX Runtime: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if not torch.equal(got, want.cpu()):
            dest.unlink(missing_ok=True)
            first = int(torch.nonzero(got[0] != want[0].cpu())[0, 0]) if got.shape == want.shape else -1
            raise ExportError(f"the ONNX decode differs from {type(model).__name__}.generate (first at position "
                              f"{first}): {got[0].tolist()} vs {want[0].tolist()}")
    return dest


def ort_greedy(path: str | os.PathLike[str], input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of ``new_tokens`` tokens after ``input_ids`` (batch × prompt, every token real) with the
    decode-step file :func:`export_decoder_onnx` wrote, in ONNX Runtime on the CPU: the prompt then the tokens."""
    session = ort_session(path)
    inputs = session.get_inputs()
    batch = int(input_ids.shape[0])
    past = {}
    for i in inputs[2:]:
        heads, dim = i.shape[1], i.shape[3]
        if not isinstance(heads, int) or not isinstance(dim, int):
            raise ExportError(f"{path}: input {i.name} has no fixed head count and size ({i.shape})")
        past[i.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    tokens = input_ids.cpu().numpy().astype(np.int64)
    current, total = tokens, tokens.shape[1]
    for _ in range(new_tokens):
        feeds = {"input_ids": current, "attention_mask": np.ones((batch, total), dtype=np.int64), **past}
        logits, *present = session.run(None, feeds)
        current = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        past = dict(zip(list(past), present))
        tokens = np.concatenate([tokens, current], axis=1)
        total += 1
    return torch.from_numpy(tokens)
