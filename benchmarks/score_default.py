"""Which ranking score should UPop use by default: ``gradient`` (the paper's) or ``sensitivity``? Decided from the
committed results, not run here.

Every digits task (``benchmarks.<task>``, three seeds) has a ``unified`` row ranked by ``--score`` (gradient
by default) and a ``unified_sensitivity`` row, the same search ranked by sensitivity; the MiniLM accuracy
benchmark, run as ``python -m benchmarks.accuracy_minilm --seeds 0 1 2 --ratios 0.5 --methods upop
upop_sensitivity --name accuracy_minilm_scores``, has ``upop`` (gradient) and ``upop_sensitivity`` rows. Per task
this compares the mean over the seeds of the task's metric after the retrain (for MiniLM: MRR × 100). A score
*wins* a task when its mean is ahead by more than its own standard deviation; the default changes to a score only
if it wins on most tasks (more than half of those with results). Writes ``benchmarks/results/score_default.json``
and ``.md``.

    python -m benchmarks.score_default
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from upop_fx import SCORES

from .common import RESULTS, markdown_table

log = logging.getLogger("benchmarks.score_default")

TASKS = ("caption_digits", "vqa_digits", "nlvr2_digits", "segmenter_digits", "vit_digits", "clip_digits")
MINILM = "accuracy_minilm_scores"
CURRENT_DEFAULT = "gradient"


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def task_scores(payload: dict[str, Any], when: str = "") -> dict[str, tuple[float, float, int]]:
    """``{score: (mean, std, seeds)}`` of a digits task's unified rows, by the score they were ranked with: the
    metric after the retrain, or right after the cut with ``when="_cut"``."""
    metric = payload["metric"] + when
    by: dict[str, list[float]] = {}
    for r in payload["rows"]:
        if (r["method"] == "unified" or r["method"].startswith("unified_")) and metric in r:
            by.setdefault(r["score"], []).append(r[metric])
    return {s: _stats(v) for s, v in by.items()}


def minilm_scores(payload: dict[str, Any], ratio: float = 0.5) -> dict[str, tuple[float, float, int]]:
    """``{score: (mean, std, seeds)}`` of MiniLM's MRR × 100 at ``ratio`` for ``upop`` and ``upop_sensitivity``."""
    by: dict[str, list[float]] = {}
    for r in payload["rows"]:
        if r["ratio"] == ratio and r["method"] in ("upop", "upop_sensitivity"):
            by.setdefault("sensitivity" if r["method"] == "upop_sensitivity" else "gradient", []).append(100 * r["mrr"])
    return {s: _stats(v) for s, v in by.items()}


def decide(per_task: dict[str, dict[str, tuple[float, float, int]]]) -> tuple[list[dict[str, Any]], str, str]:
    """The table (one row per task), the default it implies and why."""
    rows, wins = [], dict.fromkeys(SCORES, 0)
    for task, scores in per_task.items():
        (g, gs, gn), (s, ss, sn) = scores["gradient"], scores["sensitivity"]
        winner = "sensitivity" if s - g > ss else "gradient" if g - s > gs else "neither"
        if winner in wins:
            wins[winner] += 1
        rows.append({"task": task, "seeds": min(gn, sn), "gradient": f"{g:.2f} ± {gs:.2f}",
                     "sensitivity": f"{s:.2f} ± {ss:.2f}", "difference": round(s - g, 2), "wins": winner})
    best = max(wins, key=lambda k: wins[k])
    if per_task and wins[best] > len(per_task) / 2:
        return rows, best, f"{best} wins {wins[best]} of {len(per_task)} tasks by more than its std"
    return rows, CURRENT_DEFAULT, (f"no score wins most tasks ({', '.join(f'{k} {v}' for k, v in wins.items())} of "
                                   f"{len(per_task)}): the default stays {CURRENT_DEFAULT}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.score_default", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="the results folder to read and write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    folder = Path(args.results)
    per_task, missing, cut = {}, [], {}
    for name in (*TASKS, MINILM):
        path = folder / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        payload = json.loads(path.read_text())
        scores = minilm_scores(payload) if name == MINILM else task_scores(payload)
        if {"gradient", "sensitivity"} <= scores.keys():
            per_task[name] = scores
            cut[name] = {} if name == MINILM else task_scores(payload, "_cut")
        else:
            missing.append(name)
    rows, default, why = decide(per_task)
    for row in rows:  # for information: the same comparison right after the cut (MiniLM retrains inside compress)
        c = cut[row["task"]]
        for s in ("gradient", "sensitivity"):
            row[f"{s}_cut"] = f"{c[s][0]:.2f} ± {c[s][1]:.2f}" if s in c else ""
    out = {"default": default, "why": why, "rows": rows, "missing": missing,
           "rule": "a score wins a task when its mean after the retrain is ahead by more than its own std; the "
                   "default changes only to a score that wins more than half of the tasks"}  # fmt: skip
    (folder / "score_default.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# score_default", "", f"- rule: {out['rule']}",
          "- metric: each task's metric after the retrain, mean ± std over its seeds (MiniLM: MRR x 100)",
          f"- missing (no results with both scores): {', '.join(missing) or 'none'}", "",
          markdown_table(rows, ["task", "seeds", "gradient", "sensitivity", "difference", "wins"]), "",
          f"**Default: {default}** — {why}", "",
          "For information, not part of the rule: the same unified rows right after the cut, before any retrain "
          "(MiniLM's rows retrain inside `compress`, so they have no such figure):", "",
          markdown_table([r for r in rows if r["gradient_cut"]], ["task", "gradient_cut", "sensitivity_cut"]), ""]
    (folder / "score_default.md").write_text("\n".join(md))
    log.info("default %s: %s", default, why)
    return out


if __name__ == "__main__":
    main()
