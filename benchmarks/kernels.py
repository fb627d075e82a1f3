"""How fast is upop_fx's fused masked attention against what UPop does in eager PyTorch?

Compares, on one CUDA GPU, forward and forward+backward of

* ``upop_fx``  — ``upop_fx.kernels.masked_attention`` (Triton; masks fused into the loads, mask gradients
  reduced in the kernels' epilogues);
* ``eager``    — what UPop runs: multiply q, k, v by the masks, then ``F.scaled_dot_product_attention``
  (PyTorch picks its fastest backend), autograd for every gradient, masks included;
* ``sdpa``     — plain unmasked ``F.scaled_dot_product_attention``: the floor, the cost of attention alone.

Shapes are the attention layers of ViT-B/16 (T=197), BERT-base (T=512), CLIP ViT-L/14 (T=257) and a long
sequence (T=4096), with the batch chosen so that each call holds about ``--tokens`` query tokens (enough to
fill a large GPU). Times are medians of ``triton.testing.do_bench``. TFLOP/s count the attention matmuls
only — forward 4·B·H·T²·D, forward+backward 3.5× that (FlashAttention-2's convention, backward recomputes
the scores), halved for ``--causal`` — the same count for all three methods, so TFLOP/s compare like times.

Writes ``benchmarks/results/kernels.json`` (``{"machine": {...}, "rows": [...]}``) and prints a markdown
table. Exits with status 2 and says so when no CUDA device (or no Triton) is present.

    python benchmarks/kernels.py            # all shapes, bf16 and fp16
    python benchmarks/kernels.py --quick    # two shapes, bf16, shorter timing runs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name: (T, H, D)
    "ViT-B/16": (197, 12, 64),
    "BERT-base": (512, 12, 64),
    "CLIP-ViT-L/14": (257, 16, 64),
    "long-4096": (4096, 12, 64),
}
QUICK_SHAPES = ("ViT-B/16", "long-4096")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, bf16 only, shorter timing runs")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes to run (default: bf16 fp16; bf16 with --quick)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None, help="shapes to run")
    p.add_argument("--tokens", type=int, default=65536,
                   help="query tokens per call; batch = max(1, tokens // T) (default 65536)")
    p.add_argument("--causal", action="store_true", help="causal attention (default: bidirectional)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    return p.parse_args(argv)


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, backward: bool) -> float:
    f = 4.0 * B * H * T * T * D * (3.5 if backward else 1.0)
    return f / 2 if causal else f


def make_methods(q, k, v, m_qk, m_v, causal: bool) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    """name -> (call returning the output, the tensors whose .grad the backward fills)."""
    from upop_fx.kernels import masked_attention

    def upop_fx():
        return masked_attention(q, k, v, m_qk, m_v, causal=causal)

    def eager():  # UPop: mask the qkv tensor, then attention; masks cast to the activation dtype
        mq, mv = m_qk.to(q.dtype), m_v.to(q.dtype)
        return F.scaled_dot_product_attention(q * mq, k * mq, v * mv, is_causal=causal)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    masked = [q, k, v, m_qk, m_v]
    return {"upop_fx": (upop_fx, masked), "eager": (eager, masked), "sdpa": (sdpa, [q, k, v])}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(name: str, dtype_name: str, args: argparse.Namespace, do_bench: Callable) -> list[dict]:
    T, H, D = SHAPES[name]
    dtype = DTYPES[dtype_name]
    B = max(1, args.tokens // T)
    while True:
        try:
            return _bench(name, B, H, T, D, dtype_name, dtype, args, do_bench)
        except torch.cuda.OutOfMemoryError:
            if B == 1:
                raise
        torch.cuda.empty_cache()  # outside the except: the failed call's tensors are freed by now
        B //= 2
        print(f"  out of memory; retrying {name} with batch {B}", file=sys.stderr)


def _bench(name, B, H, T, D, dtype_name, dtype, args, do_bench, dev: str = "cuda") -> list[dict]:
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    # fp32 masks like UPop's parameters, values in [0.1, 1) as in the middle of a search
    m_qk = torch.rand(D, device=dev).clamp_min(0.1).requires_grad_()
    m_v = torch.rand(D, device=dev).clamp_min(0.1).requires_grad_()
    grad_out = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    methods = make_methods(q, k, v, m_qk, m_v, args.causal)

    # sanity check before timing: output and all five gradients against the eager masked path, same dtype
    results = {}
    for method in ("upop_fx", "eager"):
        fn, leaves = methods[method]
        out = fn()
        results[method] = (out, *torch.autograd.grad(out, leaves, grad_out))
    check = max(rel_err(a, b) for a, b in zip(results["upop_fx"], results["eager"], strict=True))
    del results, out
    reps = dict(warmup=10, rep=50) if args.quick else dict(warmup=25, rep=200)

    rows = []
    for backward in (False, True):
        ms = {}
        for method, (fn, leaves) in methods.items():
            if backward:
                def step(fn=fn, grad_out=grad_out):
                    fn().backward(grad_out)
                ms[method] = do_bench(step, grad_to_none=leaves, return_mode="median", **reps)
            else:
                with torch.no_grad():
                    ms[method] = do_bench(fn, return_mode="median", **reps)
        flops = attention_flops(B, H, T, D, args.causal, backward)
        rows.append({
            "shape": name, "B": B, "H": H, "T": T, "D": D, "dtype": dtype_name, "causal": args.causal,
            "pass": "fwd+bwd" if backward else "fwd",
            "ms": ms,
            "tflops": {m: flops / (t * 1e-3) / 1e12 for m, t in ms.items()},
            "speedup_vs_eager": ms["eager"] / ms["upop_fx"],
            "speedup_vs_sdpa": ms["sdpa"] / ms["upop_fx"],
            "check_rel_err_vs_eager": check,
        })
        print(f"  {name} {dtype_name} {rows[-1]['pass']}: " + ", ".join(f"{m} {t:.3f} ms" for m, t in ms.items()))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| shape | B | dtype | pass | upop_fx ms (TFLOP/s) | eager ms (TFLOP/s) | sdpa ms (TFLOP/s) "
            "| vs eager | vs sdpa | max rel err vs eager |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cell = {m: f"{r['ms'][m]:.3f} ({r['tflops'][m]:.0f})" for m in r["ms"]}
        lines.append(f"| {r['shape']} | {r['B']} | {r['dtype']} | {r['pass']} | {cell['upop_fx']} | {cell['eager']} "
                     f"| {cell['sdpa']} | {r['speedup_vs_eager']:.2f}× | {r['speedup_vs_sdpa']:.2f}× "
                     f"| {r['check_rel_err_vs_eager']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
              "nothing was measured.", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        print("benchmarks/kernels.py needs Triton (pip install triton); nothing was measured.", file=sys.stderr)
        return 2

    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp16"])
    machine = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "tokens": args.tokens, "quick": args.quick,
    }
    print(f"# masked attention on {machine['gpu']} (torch {machine['torch']}, triton {machine['triton']})")
    rows = [row for dtype in dtypes for name in shapes for row in bench_shape(name, dtype, args, do_bench)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
