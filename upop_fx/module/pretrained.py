"""``save_pretrained`` / ``from_pretrained`` for a cut Hugging Face model: non-uniform widths that reload.

A compressed model has per-layer sizes that its config cannot describe (layer 3 keeps 7 heads of 41 dims, layer
4 keeps 12 of 64), so ``transformers``' own ``from_pretrained`` cannot rebuild it. :func:`save_pretrained`
writes, beside the original ``config.json``:

* ``upop_fx.json`` — every structural edit, found by comparing the model with its class built afresh from its
  config: per module path, the attributes that differ (``attention_head_size``, ``out_features``, ...) and the
  shapes of its parameters and buffers that differ; tied tensors; the class to build;
* ``model.safetensors`` — every parameter and buffer (tied ones once);
* the generation config, and the tokenizer / processor files when given.

:func:`from_pretrained` builds the class from the config on the ``meta`` device (no full-size weights are
allocated), replays the edits, loads the tensors and returns a model equal to the saved one — offline, in a
fresh process. A directory that is not such a save, or an ``upop_fx.json`` that does not match the weights,
raises :class:`~upop_fx.errors.InputError`.

Example:
    >>> import tempfile, torch, upop_fx
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64, vocab_size=100)).eval()
    >>> ids = torch.randint(1, 100, (2, 8))
    >>> small = upop_fx.compress(bert, {"input_ids": ids}, ratio=0.5, method="magnitude", retrain_steps=0).module
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = upop_fx.save_pretrained(small, d)
    ...     again = upop_fx.from_pretrained(d)
    >>> torch.equal(again(ids).last_hidden_state, small(ids).last_hidden_state)
    True
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..passes.base import module_tensors, set_tensor

__all__ = ["save_pretrained", "from_pretrained", "EDITS_FILE", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)

EDITS_FILE = "upop_fx.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1


def _config_of(module: Any) -> Any:
    config = getattr(module, "config", None)
    if not isinstance(module, torch.nn.Module) or not hasattr(config, "save_pretrained"):
        raise InputError(
            f"save_pretrained needs a Hugging Face model (an nn.Module with a .config), not {type(module).__name__}; "
            "torch.save(module, path) saves any module"
        )
    return config


def _build_on_meta(cls: type, config: Any) -> torch.nn.Module:
    """``cls(config)`` with every parameter and buffer on the meta device: nothing full-size is allocated."""
    with torch.device("meta"):
        return cls(config)


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v)


def _edits(module: torch.nn.Module, fresh: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per module path: ``{"attrs": {name: value}, "tensors": {name: shape}}`` where ``module`` differs from
    ``fresh`` (its class built from its config)."""
    edits: dict[str, dict[str, Any]] = {}
    fresh_modules = dict(fresh.named_modules(remove_duplicate=False))
    for path, sub in module.named_modules(remove_duplicate=False):
        base = fresh_modules.get(path)
        if base is None or type(base) is not type(sub):
            raise InputError(f"{type(module).__name__} built from its config has no {type(sub).__name__} at "
                             f"{path or '<root>'}: its structure was changed beyond sizes")
        attrs = {k: v for k, v in vars(sub).items()
                 if not k.startswith("_") and k != "training" and _plain(v) and vars(base).get(k, v) != v}
        base_tensors = {**base._parameters, **base._buffers}
        tensors = {k: list(t.shape) for k, t in [*sub._parameters.items(), *sub._buffers.items()]
                   if t is not None and k in base_tensors and tuple(t.shape) != tuple(base_tensors[k].shape)}
        if attrs or tensors:
            edits[path] = {"attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
                           "tensors": tensors}
    return edits


def save_pretrained(module: torch.nn.Module, directory: str | os.PathLike[str], *, tokenizer: Any = None,
                    processor: Any = None) -> Path:
    """Write ``module`` (a cut Hugging Face model, e.g. ``result.module``) into ``directory`` so that
    :func:`from_pretrained` rebuilds it (see the module docstring). Returns the directory."""
    from safetensors.torch import save_file

    config = _config_of(module)
    dest = Path(directory)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest} exists and is not a directory")
    fresh = _build_on_meta(type(module), config)
    edits = _edits(module, fresh)
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    first: dict[int, str] = {}  # tensor id -> the name it is saved under
    for name, t in module_tensors(module).items():
        if id(t) in first:
            ties[name] = first[id(t)]
        else:
            first[id(t)] = name
            tensors[name] = t
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    generation = getattr(module, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(dest)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(dest / WEIGHTS_FILE),
              metadata={"format": "pt"})
    cls = type(module)
    record = {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}", "edits": edits, "ties": ties,
              "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None}
    (dest / EDITS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    for extra in (tokenizer, processor):
        if extra is not None:
            extra.save_pretrained(dest)
    log.info("saved %s with %d edited modules to %s", cls.__name__, len(edits), dest)
    return dest


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise InputError(f"{path} is not a directory")
    missing = [f for f in (EDITS_FILE, "config.json", WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise InputError(f"{path} is not a upop_fx save_pretrained directory: {', '.join(missing)} missing")
    try:
        record = json.loads((path / EDITS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path / EDITS_FILE} cannot be read: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("edits"), dict):
        raise InputError(f"{path / EDITS_FILE} is not a upop_fx edit record of format {FORMAT}")
    return record


def _import_class(spec: str) -> type:
    mod_name, _, qual = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"the saved model's class {spec} cannot be imported: {exc}") from exc
    return obj


def from_pretrained(directory: str | os.PathLike[str], *, device: str | torch.device | None = None) -> torch.nn.Module:
    """The model :func:`save_pretrained` wrote into ``directory``, in eval mode (on ``device`` when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    record = _read_record(path)
    cls = _import_class(str(record.get("class", "")))
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise InputError(f"{cls.__name__} has no config_class: not a Hugging Face model class")
    config = config_class.from_pretrained(path)
    model = _build_on_meta(cls, config)
    for mod_path, edit in record["edits"].items():
        try:
            sub = model.get_submodule(mod_path)
        except AttributeError as exc:
            raise InputError(f"{EDITS_FILE} edits {mod_path}, which {cls.__name__} does not have") from exc
        for k, v in edit.get("attrs", {}).items():
            setattr(sub, k, tuple(v) if isinstance(v, list) and isinstance(getattr(sub, k, None), tuple) else v)
        for k, shape in edit.get("tensors", {}).items():
            old = sub._parameters.get(k, sub._buffers.get(k))
            if old is None:
                raise InputError(f"{EDITS_FILE} resizes {mod_path}.{k}, which {cls.__name__} does not have")
            set_tensor(sub, k, torch.empty(shape, dtype=old.dtype, device="meta"), old)
    try:
        weights = load_file(str(path / WEIGHTS_FILE), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path / WEIGHTS_FILE} cannot be read: {exc}") from exc
    expected = module_tensors(model)
    for name, t in weights.items():
        if name not in expected:
            raise InputError(f"{WEIGHTS_FILE} holds {name}, which the rebuilt {cls.__name__} does not have")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise InputError(f"{EDITS_FILE} does not match the weights: {name} is {tuple(t.shape)} in "
                             f"{WEIGHTS_FILE} but {tuple(expected[name].shape)} after the edits")
        set_tensor(model, name, t, expected[name])
    for alias, source in record.get("ties", {}).items():
        if source not in weights or alias not in expected:
            raise InputError(f"{EDITS_FILE} ties {alias} to {source}, which the save does not hold")
        set_tensor(model, alias, module_tensors(model)[source], expected[alias])
    left = [n for n, t in module_tensors(model).items() if t.is_meta]
    if left:
        raise InputError(f"{WEIGHTS_FILE} lacks {len(left)} tensors of {cls.__name__}: {', '.join(left[:4])}")
    if hasattr(model, "generation_config") and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    log.info("loaded %s with %d edited modules from %s", cls.__name__, len(record["edits"]), path)
    return model.eval()
