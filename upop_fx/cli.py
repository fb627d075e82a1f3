"""The ``upop-fx`` command: compress a model from the shell, keep the artifacts, time them.

    upop-fx compress MODEL --ratio 0.5 --out DIR [--method upop|magnitude] [--data PATH] ...
    torchrun --nproc_per_node 2 -m upop_fx.cli compress MODEL ...    (data-parallel; rank 0 writes DIR)
    upop-fx bench DIR
    upop-fx generate DIR --prompt TEXT [--image PATH]

MODEL is a local Hugging Face model directory (loaded offline) or ``module:function`` returning
``(model, example_inputs)``. Any error exits non-zero with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .api import compress
from .artifacts import PRETRAINED, load, save
from .errors import ConfigError, InputError, UPopError
from .logs import show_progress
from .module.pretrained import from_pretrained
from .options import GROUPS, Options
from .runtime.speed import time_pair
from .training.distributed import init_from_environment
from .training.loop import to_device

__all__ = ["main", "load_source", "text_batches"]

log = logging.getLogger("upop_fx.cli")

SAMPLE_TEXT = [
    "Structured pruning removes whole attention heads, head dimensions and MLP neurons.",
    "The dense small model runs faster in PyTorch and in ONNX Runtime.",
    "Markets rallied after the central bank held interest rates steady.",
    "The striker scored twice in the second half to win the cup final.",
]

COMPRESS_EPILOG = """examples:
  upop-fx compress ./all-MiniLM-L6-v2 --ratio 0.5 --out small/ --method magnitude
  upop-fx compress ./bert-finetuned --ratio 0.5 --out small/ --data ./texts/ --search-steps 200
  upop-fx compress mypkg.models:build --ratio 0.3 --out small/ --budget flops --round-to 8
  upop-fx compress ./bert-finetuned --ratio 0.5 --out small/ --data ./texts/ --checkpoint-dir ckpt/ --precision bf16
  upop-fx compress ./bert-finetuned --ratio 0.5 --out small/ --budget latency --latency-shape 8,128
  torchrun --nproc_per_node 4 -m upop_fx.cli compress ./bert-finetuned --ratio 0.5 --out small/ --data ./texts/

With --checkpoint-dir, the search and the retrain write their state to that directory every --checkpoint-every
steps; the same command run again resumes where it stopped (and refuses a directory of another run).
Under torchrun each rank trains on its share of the --data batches (every world-size-th batch) on
cuda:LOCAL_RANK when GPUs are present (gloo on CPU, NCCL on GPU); rank 0 alone logs and writes.

MODEL is a local Hugging Face model directory (config.json + weights; loaded offline, never downloaded)
or module:function, a Python callable returning (model, example_inputs). DIR receives model.pt2,
model.onnx, report.json, report.md and widths.png, and pretrained/ (the model of its own class, with its
tokenizer or processor; reload it with upop_fx.load(DIR)) when the cut can be expressed by the model's class
(--own-class makes sure it can); it is written atomically.

Every option of upop_fx.Options is a flag of the same name (see the sections above); the same option in
Python is explained once, in upop_fx/options.py."""

GENERATE_EPILOG = """examples:
  upop-fx generate small/ --prompt "The markets"
  upop-fx generate small/ --image cat.png --prompt "a picture of"
  upop-fx generate small/pretrained --prompt "Once upon a time" --max-new-tokens 40

DIR is a directory written by upop-fx compress (its pretrained/ is used) or by upop_fx.save_pretrained; it
needs the tokenizer or processor files (upop-fx compress saves those of a Hugging Face model directory).
Decoding is greedy."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upop-fx",
        description="Compress Transformer models by structured pruning (UPop) and keep deployable artifacts.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{compress,bench,generate}")
    c = sub.add_parser("compress", help="compress a model and write its artifacts", epilog=COMPRESS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compress MODEL: remove --ratio of its prunable cost and save the dense small model.")
    c.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory, or module:function")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    c.add_argument("--data", metavar="PATH", help="a folder of .txt files (text models) or images (vision models) "
                   "for the search and the retrain; default: built-in sample inputs")
    c.add_argument("--seq", type=int, default=128, help="tokens per text example (default 128)")
    c.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    c.add_argument("--device", default="auto", help="where to train: auto (cuda when present; default), cpu, "
                   "cuda or cuda:N")
    _add_options(c)
    c.add_argument("--no-onnx", action="store_true", help="skip model.onnx")
    c.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    loud = c.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="one line per phase (capture, latency tables, "
                      "search, cut, retrain, export) on stderr")
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars "
                      "(bars show on a terminal only anyway)")
    b = sub.add_parser("bench", help="time a saved model against its original (ONNX Runtime and PyTorch)",
                       description="Time DIR/model.onnx and DIR/model.pt2 against the original model recorded in "
                       "DIR/report.json, on its example inputs, interleaved, median of --runs.",
                       epilog="example:\n  upop-fx bench small/", formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("dir", metavar="DIR")
    b.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20)")
    b.add_argument("-v", "--verbose", action="store_true")
    g = sub.add_parser("generate", help="generate text with a saved decoder or captioner",
                       description="Greedy generation with the model of DIR (its own class, reloaded with "
                       "upop_fx.from_pretrained): a decoder continues --prompt; a captioner or VQA model "
                       "describes --image (after --prompt, when given).",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("dir", metavar="DIR")
    g.add_argument("--prompt", default="", help="the text to continue (a decoder) or the caption prefix / question")
    g.add_argument("--image", metavar="PATH", help="an image file, for a captioner or VQA model")
    g.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default 20)")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def _add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`~upop_fx.options.Options`, in its section, explained by the field's doc."""
    for group in GROUPS:
        section = parser.add_argument_group(f"{group} options")
        for f in dataclasses.fields(Options):
            meta = f.metadata
            if meta["group"] != group or not meta["cli"]:
                continue
            flag = "--" + f.name.replace("_", "-")
            helptext = f"{meta['doc']} (default: {f.default})".replace("%", "%%")
            if isinstance(f.default, bool):
                action = argparse.BooleanOptionalAction if f.default else "store_true"  # on by default: --no-X
                section.add_argument(flag, action=action, default=f.default, help=helptext)
                continue
            kind = meta["parse"] or (type(f.default) if f.default is not None else str)
            choices = getattr(meta["check"], "choices", None)
            section.add_argument(flag, type=kind, default=f.default, choices=choices, metavar=meta["metavar"],
                                 help=helptext)


def _options_of(args: argparse.Namespace) -> Options:
    """The :class:`~upop_fx.options.Options` the flags give (checked now, before any model is loaded)."""
    return Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if f.metadata["cli"]})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("upop_fx").setLevel(logging.INFO if args.verbose else logging.WARNING)
    show_progress(not getattr(args, "quiet", False))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return {"compress": _compress, "bench": _bench, "generate": _generate}[args.command](args)
    except (UPopError, OSError) as exc:
        print(f"upop-fx: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("upop-fx: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ sources
def load_source(spec: str, seq: int = 128, batch_size: int = 8, data: str | None = None) -> tuple[torch.nn.Module, Any, list[Any] | None]:
    """(model, example_inputs, batches) for MODEL = a HF directory or ``module:function``."""
    path = Path(spec)
    if path.is_dir():
        return _hf_source(path, seq, batch_size, data)
    if ":" in spec and not path.exists():
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"cannot import {spec}: {exc}") from exc
        model, example = fn()
        return model, example, None
    raise InputError(f"MODEL {spec!r} is neither a model directory nor module:function")


def _hf_source(path: Path, seq: int, batch_size: int, data: str | None) -> tuple[torch.nn.Module, Any, list[Any] | None]:
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model directory")
    import transformers

    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    if getattr(model.config, "image_size", None) and not hasattr(model.config, "vocab_size"):
        size = model.config.image_size
        chans = getattr(model.config, "num_channels", 3)
        batches = _image_batches(path, Path(data), batch_size) if data else None
        example = batches[0] if batches else {"pixel_values": torch.randn(batch_size, chans, size, size, generator=torch.Generator().manual_seed(0))}
        return model, example, batches
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    texts = _read_texts(Path(data)) if data else SAMPLE_TEXT
    batches = text_batches(tokenizer, texts, seq, batch_size)
    return model, batches[0], batches if data else None


def text_batches(tokenizer: Any, texts: list[str], seq: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (``input_ids``, ``attention_mask``) of at least 2 texts each."""
    if len(texts) < 2:
        raise InputError("need at least 2 texts")
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        if len(chunk) < 2:
            break
        t = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})
    return out


def _read_texts(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise InputError(f"--data {folder} is not a directory")
    texts = [p.read_text(errors="ignore").strip() for p in sorted(folder.rglob("*.txt"))]
    texts = [t for t in texts if t]
    if len(texts) < 2:
        raise InputError(f"--data {folder} holds fewer than 2 non-empty .txt files")
    return texts


def _image_batches(model_dir: Path, folder: Path, batch_size: int) -> list[dict[str, torch.Tensor]]:
    import transformers
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if len(files) < 2:
        raise InputError(f"--data {folder} holds fewer than 2 images")
    processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    out = []
    for i in range(0, len(files) - 1, batch_size):
        images = [Image.open(f).convert("RGB") for f in files[i : i + batch_size]]
        if len(images) >= 2:
            out.append({"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]})
    return out


# ------------------------------------------------------------------ commands
def _compress(args: argparse.Namespace) -> int:
    options = _options_of(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise InputError(f"{out} exists and is not empty (use --force to replace it)")
    with _process_group() as (rank, world):
        device = _device(args.device, world > 1)
        model, example, batches = load_source(args.model, args.seq, args.batch_size, args.data)
        if batches is not None and world > 1:  # each rank trains on its share of the batches
            batches = batches[rank::world]
            if not batches:
                raise InputError(f"--data gives fewer batches than the {world} ranks")
        model = model.to(device)
        example = to_device(example, device)
        t0 = time.perf_counter()
        result = compress(model, example, data=batches, options=options)
        if rank != 0:
            return 0
        source = {"source": str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model,
                  "seq": args.seq, "batch_size": args.batch_size, "seconds": round(time.perf_counter() - t0, 2),
                  "device": str(device), "ranks": world, "precision": options.precision}
        save(result, example, out, force=args.force, onnx=not args.no_onnx, extra={"cli": source},
             processor=_processor(Path(args.model)) if Path(args.model).is_dir() else None)
        if result.module is None:
            print(f"no pretrained/ (the model's own class cannot express this cut: {result.report.module_reason})")
    print(result.report.table())
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


@contextlib.contextmanager
def _process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is created for the
    command (NCCL when CUDA is present, else gloo) and destroyed after it."""
    created = init_from_environment()
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    finally:
        if created:
            dist.destroy_process_group()


def _device(spec: str, distributed: bool) -> torch.device:
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else torch.cuda.current_device())
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"--device {spec!r} is not a device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def _bench(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    meta_file = d / "report.json"
    if not meta_file.is_file():
        raise InputError(f"{d} has no report.json: not a directory written by upop-fx compress")
    meta = json.loads(meta_file.read_text()).get("cli")
    if not meta:
        raise InputError(f"{meta_file} does not record the original model (it was not written by upop-fx compress)")
    original, example, _ = load_source(meta["source"], meta["seq"], meta["batch_size"])
    small = load(d, graph=True)
    rows = time_pair(original, small, example, d / "model.onnx", runs=args.runs)
    print(f"inputs {rows[0]['shape']}; median of {args.runs} interleaved runs each")
    print(f"{'runtime':<16} {'original ms':>12} {'compressed ms':>14} {'speedup':>8} {'threads':>8}  load before/after")
    for r in rows:
        print(f"{r['runtime']:<16} {r['ms_dense']:>12.2f} {r['ms_pruned']:>14.2f} {r['speedup']:>7.2f}x "
              f"{r['threads'] or 'default':>8}  {r['load_before']} / {r['load_after']}")
    return 0


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "preprocessor_config.json", "processor_config.json")


def _processor(path: Path) -> Any:
    """The processor (or tokenizer) saved with the model in ``path``; None when it has none (transformers would
    otherwise make an empty tokenizer of the model type)."""
    import transformers

    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        return None
    for auto in (transformers.AutoProcessor, transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            return auto.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    d = Path(args.dir)
    folder = d / PRETRAINED if (d / PRETRAINED).is_dir() else d
    model = from_pretrained(folder)
    if not callable(getattr(model, "generate", None)):
        raise InputError(f"{type(model).__name__} cannot generate: it is not a decoder, captioner or VQA model")
    processor = _processor(folder)
    if processor is None:
        raise InputError(f"{folder} holds no tokenizer or processor files (pass tokenizer= to save_pretrained)")
    if args.image:
        from PIL import Image

        try:
            image = Image.open(args.image).convert("RGB")
        except OSError as exc:
            raise InputError(f"cannot read the image {args.image}: {exc}") from exc
        inputs = processor(images=image, text=args.prompt or None, return_tensors="pt")
    else:
        if not args.prompt:
            raise InputError("--prompt is required without --image")
        inputs = processor(args.prompt, return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    decode = getattr(processor, "batch_decode", None) or processor.tokenizer.batch_decode
    print(decode(out, skip_special_tokens=True)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
