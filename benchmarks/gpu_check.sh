#!/usr/bin/env bash
# The prepared GPU check of upop_fx: one command, at most ~8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]          # OUTDIR defaults to gpu_results/
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh OUTDIR
#
# Runs from the repository root (it cd's there itself) with PYTHONPATH=. and ${PYTHON:-python3}. Steps:
#   machine       nvidia-smi, torch/triton/transformers versions, load average  -> machine.json, nvidia-smi.txt
#   kernel_tests  pytest tests/test_kernels.py tests/test_kernel_op.py tests/test_fuse_attention.py with
#                 TRITON_INTERPRET=0 exported. NOTE: these tests never put a tensor on CUDA. test_kernels.py and
#                 test_kernel_op.py set os.environ["TRITON_INTERPRET"] = "1" unconditionally (not setdefault)
#                 and reload the kernel module if it was imported without it, and every tensor in the three
#                 files is a CPU tensor (test_fuse_attention.py: CPU models, FuseMaskedAttention(force=True)).
#                 So on a GPU machine this step runs the kernels in Triton's CPU interpreter, exactly as CI
#                 does: it checks the GPU machine's torch/Triton versions, not the compiled kernels.
#   kernel_cuda   what kernel_tests cannot do: masked_attention on CUDA tensors (compiled Triton kernels; fp32,
#                 fp16, bf16; padding, causal, cross-attention, head dims 24..128) against the float64 torch
#                 reference, forward and all five gradients, with test_kernels.py's tolerances -> kernel_cuda.json
#   kernel_bench  python -m benchmarks.kernels --quick --out OUTDIR/kernels.json
#   memory        python -m benchmarks.memory --device cuda --out OUTDIR (peak memory of compressing a
#                 BERT-base-sized model, in model copies) -> memory_cuda.json
#   gpu_search    python -m benchmarks.gpu_search --out OUTDIR/gpu_search.json (BERT-base UPop search +
#                 retrain: fused vs unfused, fp32 vs bf16 keep-sets, dense vs pruned latency)
# Every step has a timeout and a log (OUTDIR/<step>.log); a failing step is recorded and the next one runs.
# Without CUDA the CUDA steps are skipped, with the reason. OUTDIR/summary.md (and steps.json) list every step
# as ran / skipped (why) / failed (rc). Exit status: 0 if every step ran or was skipped, 1 otherwise.
#
# GPU_CHECK_BUDGET_S (default 450) caps the steps' time together: a step's timeout is cut to what is left.

set -u
set -o pipefail

PY=${PYTHON:-python3}
OUT=${1:-gpu_results}
BUDGET=${GPU_CHECK_BUDGET_S:-450}

mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# compiled kernels, not Triton's interpreter, whatever the caller's environment says (kernel_tests sets its own)
export TRITON_INTERPRET=0

START=$SECONDS
NAMES=() STATUS=() DETAIL=() SECS=()
FAILED=0
NOTES=()

record() {  # name status detail seconds
    NAMES+=("$1"); STATUS+=("$2"); DETAIL+=("$3"); SECS+=("$4")
    [ "$2" = failed ] && FAILED=1
    echo "gpu_check: $1: $2${3:+ ($3)} [${4}s]"
}

skip() { record "$1" skipped "$2" 0; }

# run_step NAME MAX_SECONDS CMD...: runs CMD with a timeout (MAX_SECONDS, cut to what is left of BUDGET),
# stdout and stderr into OUT/NAME.log; records ran (rc 0) or failed (rc, or timeout).
run_step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((max < left ? max : left))
    if [ "$limit" -lt 10 ]; then
        record "$name" failed "not started: the check's ${BUDGET}s budget is used up" 0
        return
    fi
    STEP_LIMIT=$limit
    local t0=$SECONDS rc
    echo "gpu_check: $name (timeout ${limit}s): $*"
    {
        echo "# $*"
        echo "# timeout ${limit}s, started $(date -u +%FT%TZ)"
    } >"$OUT/$name.log"
    if [ -n "$TIMEOUT" ]; then
        "$TIMEOUT" --kill-after=15 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    else
        "$@" >>"$OUT/$name.log" 2>&1
    fi
    rc=$?
    local dt=$((SECONDS - t0))
    echo "# exit status $rc after ${dt}s" >>"$OUT/$name.log"
    if [ "$rc" -eq 0 ]; then
        record "$name" ran "log: $name.log${STEP_NOTE:+; $STEP_NOTE}" "$dt"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" failed "rc $rc: timed out after ${limit}s; log: $name.log" "$dt"
    else
        record "$name" failed "rc $rc; log: $name.log (tail: $(tail -n 2 "$OUT/$name.log" | head -n 1 | cut -c1-160 | tr '|' '/'))" "$dt"
    fi
    STEP_NOTE=""
}
STEP_NOTE=""
STEP_LIMIT=0

TIMEOUT=$(command -v timeout || true)
[ -z "$TIMEOUT" ] && NOTES+=("\`timeout\` (coreutils) is missing: the steps ran without a time limit.")

# ------------------------------------------------------------------------------------------- a. machine
if command -v nvidia-smi >/dev/null 2>&1; then
    ${TIMEOUT:+$TIMEOUT 30} nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
else
    echo "nvidia-smi: not found" >"$OUT/nvidia-smi.txt"
fi
run_step machine 60 "$PY" - "$OUT/machine.json" <<'EOF'
import json, sys
from benchmarks.gpu_search import machine_info
info = machine_info(smi=True)
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info, indent=2))
EOF

# is there a CUDA device (and a Python that imports torch)?
CUDA_REASON=""
${TIMEOUT:+$TIMEOUT 60} "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' \
    >"$OUT/cuda_probe.log" 2>&1
case $? in
    0) CUDA_REASON="" ;;
    3) CUDA_REASON="no CUDA device: torch.cuda.is_available() is False" ;;
    *) CUDA_REASON="the CUDA probe failed (cannot import torch with $PY?), see cuda_probe.log"
       record cuda_probe failed "$CUDA_REASON" 0 ;;
esac

# ------------------------------------------------------------------------------------------- b. kernel tests
KT_NOTE="CPU tensors + Triton interpreter only: the tests force TRITON_INTERPRET=1 and use no CUDA tensor"
if [ -n "$CUDA_REASON" ]; then
    skip kernel_tests "$CUDA_REASON"
elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    skip kernel_tests "pytest is not installed for $PY"
elif ! TRITON_INTERPRET=1 ${TIMEOUT:+$TIMEOUT 60} "$PY" - >"$OUT/interpreter_probe.log" 2>&1 <<'PROBE'
# Can this Triton's interpreter run a loop over a run-time bound (what every kernel here does)? Triton <= 3.6
# converts the bound with int() of a 1-element array, which NumPy >= 2.5 refuses ("only 0-dimensional arrays").
import torch, triton, triton.language as tl

@triton.jit
def _count(Out, n):
    acc = 0
    for _ in range(0, n, 1):
        acc += 1
    tl.store(Out, acc)

out = torch.zeros(1, dtype=torch.int32)
_count[(1,)](out, 3)
assert int(out) == 3, int(out)
PROBE
then
    skip kernel_tests "this Triton's interpreter cannot run a loop over a run-time bound here (interpreter_probe.log; Triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null), NumPy $("$PY" -c 'import numpy; print(numpy.__version__)' 2>/dev/null)); CI runs these tests; kernel_cuda checks the compiled kernels"
else
    STEP_NOTE=$KT_NOTE
    run_step kernel_tests 100 "$PY" -m pytest -q tests/test_kernels.py tests/test_kernel_op.py \
        tests/test_fuse_attention.py -p no:cacheprovider
fi

# ------------------------------------------------------------------------------------------- b'. kernels on CUDA
if [ -n "$CUDA_REASON" ]; then
    skip kernel_cuda "$CUDA_REASON"
else
    run_step kernel_cuda 90 "$PY" - "$OUT/kernel_cuda.json" <<'EOF'
"""masked_attention's compiled Triton kernels on CUDA against the float64 reference (forward + 5 gradients)."""
import importlib, json, sys, time
import torch
ma = importlib.import_module("upop_fx.kernels.masked_attention")  # the module (the package re-exports the function)

assert not ma.INTERPRET, "TRITON_INTERPRET=1 in this process: the kernels would be interpreted"
TOL = {torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}  # tests/test_kernels.py
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("out", "dq", "dk", "dv", "d_qk_mask", "d_v_mask")
CASES = [  # name, dtypes, (B, H, Tq, Tk, D, causal, padding, qk mask (H, D)?, v mask (H, D)?)
    ("bert-T128-D64-pad", ("fp32", "bf16", "fp16"), (2, 12, 128, 128, 64, False, True, False, False)),
    ("cross-Tq45-Tk77-D24-causal-pad", ("fp32",), (2, 3, 45, 77, 24, True, True, True, False)),
    ("T300-D128-causal-head-masks", ("bf16",), (2, 4, 300, 300, 128, True, False, True, True)),
    ("T37-D16-head-masks", ("fp32",), (2, 2, 37, 37, 16, False, False, True, True)),
]
rows, ok = [], True
g = torch.Generator(device="cuda").manual_seed(0)
for name, dtypes, (B, H, Tq, Tk, D, causal, padding, qk_head, v_head) in CASES:
    for dname in dtypes:
        dtype = DT[dname]
        q, k, v = (torch.randn(B, H, t, D, device="cuda", generator=g).to(dtype) for t in (Tq, Tk, Tk))
        masks = [torch.rand(*((H, D) if head else (D,)), device="cuda", generator=g) for head in (qk_head, v_head)]
        masks[0].view(-1)[0] = 0.0  # a pruned channel
        kpm = None
        if padding:
            kpm = torch.rand(B, Tk, device="cuda", generator=g) > 0.3
            kpm[:, 0] = True
        inputs = [x.requires_grad_() for x in (q, k, v, *masks)]
        used = ma._use_kernel(*inputs)
        t0 = time.perf_counter()
        out = ma.masked_attention(*inputs, causal=causal, key_padding_mask=kpm)
        grad_out = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
        got = [out, *torch.autograd.grad(out, inputs, grad_out)]
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0  # includes compiling and autotuning
        ref_in = [x.detach().double().requires_grad_() for x in inputs]
        ref = ma.masked_attention_reference(*ref_in, causal=causal, key_padding_mask=kpm)
        want = [ref, *torch.autograd.grad(ref, ref_in, grad_out.double())]
        eager_in = [x.detach().requires_grad_() for x in inputs]  # the torch reference in the same dtype
        eager = ma.masked_attention_reference(*eager_in, causal=causal, key_padding_mask=kpm)
        eager_all = [eager, *torch.autograd.grad(eager, eager_in, grad_out)]
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        errs = {n: rel(a, b) for n, a, b in zip(NAMES, got, want)}
        eager_errs = {n: rel(a, b) for n, a, b in zip(NAMES, eager_all, want)}
        finite = all(bool(torch.isfinite(x).all()) for x in got)
        passed = used and finite and max(errs.values()) <= TOL[dtype]
        ok &= passed
        rows.append({"case": name, "dtype": dname, "kernel_used": used, "finite": finite, "passed": passed,
                     "tolerance": TOL[dtype], "max_rel_err": max(errs.values()), "rel_err": errs,
                     "eager_same_dtype_max_rel_err": max(eager_errs.values()), "first_call_s": round(secs, 2)})
        print(f"{name} {dname}: kernel {used}, max rel err {max(errs.values()):.2e} (tol {TOL[dtype]:.0e}; "
              f"torch reference in {dname}: {max(eager_errs.values()):.2e}) {'ok' if passed else 'FAILED'}, "
              f"first call {secs:.1f}s", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": ma.triton.__version__,
               "passed": ok, "rows": rows}, f, indent=2)
sys.exit(0 if ok else 1)
EOF
fi

# ------------------------------------------------------------------------------------------- c. kernel benchmark
if [ -n "$CUDA_REASON" ]; then
    skip kernel_bench "$CUDA_REASON"
else
    run_step kernel_bench 100 "$PY" -m benchmarks.kernels --quick --out "$OUT/kernels.json"
fi

# ------------------------------------------------------------------------------------------- c'. memory
if [ -n "$CUDA_REASON" ]; then
    skip memory "$CUDA_REASON"
else
    run_step memory 170 "$PY" -m benchmarks.memory --device cuda --out "$OUT"
fi

# ------------------------------------------------------------------------------------------- d. UPop search
if [ -n "$CUDA_REASON" ]; then
    skip gpu_search "$CUDA_REASON (its CPU smoke, --cpu-smoke, is tests/test_gpu_check.py)"
else
    # optional rows only while they fit in this step's time limit (with a row's worth of margin)
    left=$((BUDGET - (SECONDS - START)))
    limit=$((250 < left ? 250 : left))
    run_step gpu_search 250 "$PY" -m benchmarks.gpu_search --out "$OUT/gpu_search.json" \
        --budget-s $((limit > 100 ? limit - 60 : 40))
fi

# ------------------------------------------------------------------------------------------- summary
TOTAL=$((SECONDS - START))
{
    echo "# upop_fx GPU check"
    echo
    echo "$(date -u +%FT%TZ), $(hostname 2>/dev/null || echo '?'), python: $PY, repository: $ROOT, ${TOTAL}s in all."
    echo
    echo "| step | status | seconds | detail |"
    echo "|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${DETAIL[$i]} |"
    done
    echo
    if [ -n "$CUDA_REASON" ]; then
        echo "CUDA steps skipped: $CUDA_REASON."
        echo
    fi
    echo "Notes:"
    echo
    echo "* kernel_tests does NOT test the compiled kernels on the GPU: tests/test_kernels.py and"
    echo "  tests/test_kernel_op.py set \`os.environ[\"TRITON_INTERPRET\"] = \"1\"\` unconditionally and reload the"
    echo "  kernel module, and all three test files use CPU tensors only, so exporting TRITON_INTERPRET=0 changes"
    echo "  nothing: they run in Triton's CPU interpreter, as in CI. kernel_cuda is the check of the compiled"
    echo "  kernels on CUDA tensors."
    for n in "${NOTES[@]+"${NOTES[@]}"}"; do echo "* $n"; done
    echo
    "$PY" - "$OUT" <<'EOF' 2>/dev/null || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = []
try:
    k = json.loads((out / "kernel_cuda.json").read_text())
    worst = max(k["rows"], key=lambda r: r["max_rel_err"] / r["tolerance"])
    lines.append(f"* kernel_cuda: {'passed' if k['passed'] else 'FAILED'}; worst {worst['case']} {worst['dtype']}: "
                 f"{worst['max_rel_err']:.2e} (tol {worst['tolerance']:.0e})")
except Exception:
    pass
try:
    s = json.loads((out / "gpu_search.json").read_text())
    if "skipped" in s:
        lines.append(f"* gpu_search: skipped ({s['skipped']})")
    else:
        rows = ", ".join(f"{r['row']} {r['status']} {r['wall_s']}s" for r in s["rows"])
        lines.append(f"* gpu_search ({'complete' if s.get('complete') else 'INCOMPLETE'}): {rows}")
        for c in s["comparisons"]:
            lines.append(f"  * keep-sets {c['what']}: Jaccard {c['jaccard']:.4f}, identical: {c['identical']}")
        for r in s["latency"]:
            lines.append(f"  * latency {r['runtime']} {r['precision']}: dense graph {r['ms_dense_gm']:.2f} ms, "
                         f"pruned {r['ms_pruned']:.2f} ms, speedup {r['speedup']:.2f}x "
                         f"(FLOPs reduction {r['flops_reduction']:.2f}x)")
except Exception:
    pass
if lines:
    print("Key results:\n")
    print("\n".join(lines))
EOF
} >"$OUT/summary.md"

"$PY" - "$OUT/steps.json" "$TOTAL" "${#NAMES[@]}" "${NAMES[@]}" "${STATUS[@]}" "${SECS[@]}" "${DETAIL[@]}" \
    <<'EOF' 2>/dev/null || true
import json, sys
path, total, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = sys.argv[4:]
steps = [{"step": a[i], "status": a[n + i], "seconds": int(a[2 * n + i]), "detail": a[3 * n + i]} for i in range(n)]
json.dump({"total_s": total, "steps": steps}, open(path, "w"), indent=2)
EOF

cat "$OUT/summary.md"
exit "$FAILED"
