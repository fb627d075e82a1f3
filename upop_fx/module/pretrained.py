"""``save_pretrained`` / ``from_pretrained`` for a cut Hugging Face model: non-uniform widths that reload, and
saves that plain ``transformers`` never loads wrong.

A compressed model can have per-layer sizes that its config cannot describe (layer 3 keeps 7 heads of 41 dims,
layer 4 keeps 12 of 64). :func:`save_pretrained` writes one of two layouts:

* **A stock checkpoint**, where a config can describe the cut (every layer keeps the same widths and the config
  has a field for each, e.g. ``intermediate_size``): ``config.json`` with the new sizes and ``model.safetensors``,
  which plain ``AutoModel….from_pretrained(dir)`` loads exactly — checked by loading it so, before it is kept.
* **A upop_fx checkpoint** otherwise: the original ``config.json``, ``upop_fx.json`` (every structural edit,
  found by comparing the model with its class built afresh from its config: per module path, the attributes that
  differ — ``attention_head_size``, ``out_features``, ... — and the shapes of its parameters and buffers that
  differ; tied tensors; the class to build) and the weights as ``upop_fx.safetensors``. With no
  ``model.safetensors`` in the directory, plain ``from_pretrained(dir)`` stops with "no file named
  model.safetensors" instead of loading mismatched sizes into freshly initialised layers; ``config.json`` maps the
  model's auto classes to ``upop_fx_loader.py`` in the directory, so ``AutoModel….from_pretrained(dir,
  trust_remote_code=True)`` loads it exactly through upop_fx.

Both carry ``upop_fx.json``, a ``README.md`` model card (what was cut, the widths, how to load, and the
compression report when given), the generation config, and the tokenizer / processor files when given.

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

import copy
import importlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..capture.program import cache_off
from ..compare import relative_error
from ..errors import InputError
from ..passes.base import module_tensors, set_tensor
from .rebuild import RTOL

__all__ = ["save_pretrained", "from_pretrained", "EDITS_FILE", "WEIGHTS_FILE", "STOCK_WEIGHTS_FILE", "LOADER_FILE"]

log = logging.getLogger(__name__)

EDITS_FILE = "upop_fx.json"
#: the weights of a checkpoint plain transformers cannot rebuild: a name its loaders do not look for
WEIGHTS_FILE = "upop_fx.safetensors"
#: the weights of a stock checkpoint (and of saves made before ``WEIGHTS_FILE``)
STOCK_WEIGHTS_FILE = "model.safetensors"
#: the ``trust_remote_code`` shim that loads a upop_fx checkpoint through :func:`from_pretrained`
LOADER_FILE = "upop_fx_loader.py"
CARD_FILE = "README.md"
FORMAT = 1

_LOADER = '''"""Loads this directory through upop_fx: its layers have sizes its config cannot describe.

    model = upop_fx.from_pretrained(directory)        # or, equivalently:
    model = AutoModel....from_pretrained(directory, trust_remote_code=True)
"""

import upop_fx  # pip install upop_fx


class UPopFxCheckpoint:
    """What ``config.json``'s ``auto_map`` names: ``from_pretrained`` returns the saved model, exactly."""

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        pass

    @classmethod
    def from_pretrained(cls, directory, *args, **kwargs):
        return upop_fx.from_pretrained(directory)
'''


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
                    processor: Any = None, card: str | None = None) -> Path:
    """Write ``module`` (a cut Hugging Face model, e.g. ``result.module``) into ``directory``: a stock checkpoint
    where its config can describe the cut, else a upop_fx checkpoint that plain ``transformers`` refuses (see the
    module docstring); :func:`from_pretrained` loads either. ``card``: Markdown added to the directory's
    ``README.md`` (``upop_fx.save`` passes the compression report). Returns the directory."""
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
            tensors[name] = t.detach().contiguous().cpu()
    dest.mkdir(parents=True, exist_ok=True)
    for stale in (WEIGHTS_FILE, STOCK_WEIGHTS_FILE, LOADER_FILE):
        (dest / stale).unlink(missing_ok=True)
    auto = _auto_classes(module)
    stock, loose = _stock_config(module, config, fresh, edits)
    if stock is not None and _write_stock(module, stock, tensors, dest, loose):
        layout = "stock"
    else:
        layout = "upop_fx"
        _write_upop_fx(config, auto, tensors, dest)
    generation = getattr(module, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(dest)
    cls = type(module)
    record = {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}", "layout": layout,
              "edits": edits if layout == "upop_fx" else {}, "ties": ties,
              "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None}
    (dest / EDITS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    for extra in (tokenizer, processor):
        if extra is not None:
            extra.save_pretrained(dest)
    (dest / CARD_FILE).write_text(_card(module, fresh, edits, layout, auto, card, dest))
    log.info("saved %s (%s checkpoint, %d edited modules) to %s", cls.__name__, layout, len(edits), dest)
    return dest


def _write_upop_fx(config: Any, auto: list[str], tensors: dict[str, torch.Tensor], dest: Path) -> None:
    """The original config (the ``auto`` classes mapped to the loader shim), the weights under
    :data:`WEIGHTS_FILE`, the shim."""
    from safetensors.torch import save_file

    config.save_pretrained(dest)
    if auto:
        data = json.loads((dest / "config.json").read_text())
        data["auto_map"] = {name: f"{LOADER_FILE.removesuffix('.py')}.UPopFxCheckpoint" for name in auto}
        (dest / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (dest / LOADER_FILE).write_text(_LOADER)
    save_file(tensors, str(dest / WEIGHTS_FILE), metadata={"format": "pt"})


def _auto_classes(module: torch.nn.Module) -> list[str]:
    """The ``transformers.AutoModel*`` classes that build ``type(module)`` from its config."""
    import transformers

    names = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        try:
            mapping = getattr(transformers, name)._model_mapping
            if mapping[type(module.config)] is type(module):
                names.append(name)
        except Exception:  # noqa: BLE001 - an auto class without this config, or one this install lacks
            continue
    return names


def _stock_config(module: torch.nn.Module, config: Any, fresh_model: torch.nn.Module,
                  edits: dict[str, dict[str, Any]]) -> tuple[Any | None, bool]:
    """A copy of ``config`` from which ``type(module)`` builds ``module``'s tensors in the same shapes, found by
    substituting the uniform size changes (every ``old`` size that became one ``new`` size everywhere, also
    counted in heads) into the config's integer fields; ``None`` where no such config exists. Integer attributes
    may still differ (one the cut patched, one the forward never reads): the second value says so, and
    :func:`_write_stock` then keeps the stock checkpoint only if it computes what ``module`` does.
    ``fresh_model``: the class built from ``config`` (on the meta device)."""
    if not edits:
        return config, False
    fresh = dict(fresh_model.named_modules(remove_duplicate=False))
    changes: dict[int, set[int]] = {}
    for path, edit in edits.items():
        base, sub = fresh[path], module.get_submodule(path)
        for k, v in edit["attrs"].items():
            old = vars(base).get(k)
            if isinstance(old, int) and not isinstance(old, bool) and isinstance(v, int):
                changes.setdefault(old, set()).add(v)
        for k in edit["tensors"]:
            old_t = base._parameters.get(k, base._buffers.get(k))
            new_t = sub._parameters.get(k, sub._buffers.get(k))
            for a, b in zip(old_t.shape, new_t.shape):
                if a != b:
                    changes.setdefault(int(a), set()).add(int(b))
    unit = _head_size(config)  # widths in heads: q rows 4·d → 2·d is num_attention_heads 4 → 2
    for a, news in list(changes.items()):
        for b in list(news):
            if unit and a % unit == 0 and b % unit == 0:
                changes.setdefault(a // unit, set()).add(b // unit)
    fields = [(f, next(iter(changes[v]))) for f, v in vars(config).items()
              if isinstance(v, int) and not isinstance(v, bool) and len(changes.get(v, ())) == 1]
    if not fields or len(fields) > 6:
        return None, False
    for n in range(len(fields), 0, -1):  # the most substitutions first; at most 63 meta builds
        for subset in itertools.combinations(fields, n):
            candidate = copy.deepcopy(config)
            for f, v in subset:
                setattr(candidate, f, v)
            try:
                left = _edits(module, _build_on_meta(type(module), candidate))
            except Exception:  # noqa: BLE001 - a config the class rejects, or builds another structure from
                continue
            if not any(edit["tensors"] for edit in left.values()):  # the same tensors (attributes: see _write_stock)
                return candidate, bool(left)
    return None, False


def _same_outputs(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    """``module`` and ``other`` (both in eval mode, caches off) give equal outputs (up to the rebuild's tolerance:
    an attribute may choose another kernel, such as a repeat of one KV head or SDPA's broadcast of it) on
    ``module.dummy_inputs``; False where the model has none."""
    inputs = getattr(module, "dummy_inputs", None)
    if not isinstance(inputs, dict) or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return False
    device = next(module.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    was = module.training
    module.eval()
    other.to(device).eval()
    try:
        with torch.no_grad(), cache_off(module), cache_off(other):
            return relative_error(module(**inputs), other(**inputs)) <= RTOL
    finally:
        module.train(was)


def _head_size(config: Any) -> int | None:
    """The attention head size a config states (``head_dim``, else ``hidden_size // num_attention_heads``)."""
    d = getattr(config, "head_dim", None)
    if isinstance(d, int) and d > 1:
        return d
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden % heads == 0 else None


def _write_stock(module: torch.nn.Module, config: Any, tensors: dict[str, torch.Tensor], dest: Path,
                 loose: bool = False) -> bool:
    """``config`` and :data:`STOCK_WEIGHTS_FILE`, kept only if plain ``type(module).from_pretrained(dest)`` gives
    back every tensor of ``module`` exactly (the non-persistent buffers it recomputes from the config included)
    and, where their integer attributes differ (``loose``), the same outputs on the model's ``dummy_inputs``
    (without them, no stock checkpoint)."""
    from safetensors.torch import save_file

    loader = getattr(type(module), "from_pretrained", None)
    if loader is None:
        return False
    config.save_pretrained(dest)
    persistent = set(module.state_dict())  # the class recomputes the others (a rotary table) from the config
    save_file({n: t for n, t in tensors.items() if n in persistent}, str(dest / STOCK_WEIGHTS_FILE),
              metadata={"format": "pt"})
    try:
        loaded = loader(dest)
        want, got = module_tensors(module), module_tensors(loaded)
        exact = want.keys() == got.keys() and all(
            w.dtype == got[n].dtype and w.shape == got[n].shape and torch.equal(w.detach().cpu(), got[n].detach().cpu())
            for n, w in want.items()
        )  # fmt: skip
        if exact and loose:
            exact = _same_outputs(module, loaded)
    except Exception as exc:  # noqa: BLE001 - whatever plain transformers fails on, the upop_fx layout is used
        log.debug("the stock checkpoint does not load back: %s", exc)
        exact = False
    if not exact:
        (dest / STOCK_WEIGHTS_FILE).unlink(missing_ok=True)
    return exact


def _card(module: torch.nn.Module, fresh: torch.nn.Module, edits: dict[str, dict[str, Any]], layout: str,
          auto: list[str], card: str | None, dest: Path) -> str:
    """The directory's README.md: what was cut, how to load it, and ``card``."""
    name = type(module).__name__
    where = f"path/to/{dest.name}"
    auto_name = "AutoModel" if "AutoModel" in auto or not auto else auto[0]
    params = sum(t.numel() for t in dict.fromkeys(module_tensors(module).values()))
    lines = [f"# {name}, compressed by upop_fx", "",
             f"Structured pruning by [upop_fx](https://pypi.org/project/upop-fx/): {params:,} parameters and buffers.", ""]
    if layout == "stock":
        lines += ["Every layer keeps the same widths, and `config.json` states them: this is a plain checkpoint.",
                  "", "```python", f"from transformers import {auto_name}", f'model = {auto_name}.from_pretrained("{where}")',
                  "```", ""]
    else:
        lines += [f"Its layers have sizes that `config.json` cannot describe ({len(edits)} modules differ from what "
                  "the config builds), so it loads through upop_fx:", "", "```python", "import upop_fx",
                  f'model = upop_fx.from_pretrained("{where}")', "```", "",
                  f'or, with transformers and upop_fx installed, `{auto_name}.from_pretrained("{where}", '
                  f"trust_remote_code=True)` (which runs `{LOADER_FILE}`, a call of the line above). Plain "
                  "`from_pretrained` without `trust_remote_code` stops with \"no file named model.safetensors\": "
                  f"the weights are in `{WEIGHTS_FILE}`, so that no loader fills layers of the config's sizes with "
                  "freshly initialised weights.", ""]
    fresh_modules = dict(fresh.named_modules(remove_duplicate=False))
    rows = []
    for path, edit in edits.items():
        base = fresh_modules[path]
        changed = [f"{k} {vars(base).get(k)} → {v}" for k, v in edit["attrs"].items()]
        changed += [f"{k} {list(getattr(base, k).shape)} → {shape}" for k, shape in edit["tensors"].items()
                    if not edit["attrs"]]
        rows.append(f"| `{path or '<root>'}` | {', '.join(changed)} |")
    if rows:
        lines += ["## Widths (against the original config)", "", "| module | changed |", "|---|---|", *rows, ""]
    if card:
        lines += ["## Compression report", "", card.strip(), ""]
    return "\n".join(lines)


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise InputError(f"{path} is not a directory")
    missing = [f for f in (EDITS_FILE, "config.json") if not (path / f).is_file()]
    if not _weights_file(path).is_file():
        missing.append(WEIGHTS_FILE)
    if missing:
        raise InputError(f"{path} is not a upop_fx save_pretrained directory: {', '.join(missing)} missing")
    try:
        record = json.loads((path / EDITS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path / EDITS_FILE} cannot be read: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("edits"), dict):
        raise InputError(f"{path / EDITS_FILE} is not a upop_fx edit record of format {FORMAT}")
    return record


def _weights_file(path: Path) -> Path:
    """Where a save's weights are: :data:`WEIGHTS_FILE`, else (a stock checkpoint) :data:`STOCK_WEIGHTS_FILE`."""
    return path / WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else path / STOCK_WEIGHTS_FILE


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
    if record.get("layout") == "stock":  # plain transformers loads it exactly (checked when it was saved)
        model = cls.from_pretrained(path)
        return (model.to(device) if device is not None else model).eval()
    config = config_class.from_pretrained(path)
    config.__dict__.pop("auto_map", None)  # the loader shim belongs to the directory, not to the model
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
        weights = load_file(str(_weights_file(path)), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{_weights_file(path)} cannot be read: {exc}") from exc
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
