#!/usr/bin/env bash
# bench/gpu_check.sh -- the GPU check of the fused update-block kernels, in one command.
#
# On a GPU machine with nothing but this repository (python3 with torch, CuPy, pytest and
# pytest-benchmark, as on the nvidia-h200 image; wheels carried in .whl/ are installed first if
# present), from any directory:
#
#     bash bench/gpu_check.sh
#
# 1. runs the kernel tests: tests/test_kernels*.py (the GPU ones included: the fused kernels vs
#    the torch reference, and the update operators with backend="cupy" vs finite differences of
#    real optimizer steps and vs backend="torch"), plus the device tests of tests/test_operators.py
#    (on CUDA they take the fused path under backend="auto"), and the solvers' CUDA tests (eigs,
#    eigsh, kappa_V / condition numbers on CUDA vs the CPU); junit XML;
# 2. runs the kernel benchmark: bench/bench_kernels.py (fused vs torch eager vs copy bandwidth),
#    then bench/bench_operators.py on the GPU (the default HVP through the kept graph vs
#    jvp(grad): the default was chosen on a CPU) into $OUT/bench_operators.txt;
# 3. writes $OUT/gpu_check.json: environment, test counts and failures, benchmark targets.
#
# Results go to $OUT (default: out/gpu_check, git-ignored): gpu_check.json, bench_kernels.json,
# pytest_kernels.xml, gpu_check.log. Everything runs under `timeout` and ends inside
# GPU_CHECK_BUDGET_S seconds (default 450, under the 8 minutes a check may take). Exit status:
# 0 when the tests pass and the benchmark ran, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/kappa_gpu_cupy_cache}"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
  echo "== environment"
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  command -v nvcc && nvcc --version | tail -1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
  "$PY" -c 'import cupy; print("cupy", cupy.__version__)' 2>&1 | tail -1
} >>"$LOG" 2>&1

echo "== tests" | tee -a "$LOG"
timeout $((BUDGET / 2)) "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py \
  tests/test_kernels_operator.py tests/test_kernels_emulated.py tests/test_kernels_compile.py \
  tests/test_kernels_dispatch.py tests/test_kernels_reference.py \
  tests/test_operators.py::test_every_device_agrees_with_cpu \
  tests/test_operators.py::test_dropout_on_every_device_is_deterministic \
  tests/test_solvers.py::test_eigs_cuda_matches_cpu \
  tests/test_solvers_lanczos.py::test_eigsh_cuda_matches_cpu \
  tests/test_conditioning.py::test_conditioning_on_cuda \
  --junitxml "$OUT/pytest_kernels.xml" 2>&1 | tee -a "$LOG"
rc_tests=${PIPESTATUS[0]}

echo "== benchmark" | tee -a "$LOG"
left=$((BUDGET - SECONDS - 15))
if [ "$left" -gt 30 ]; then
  timeout "$left" "$PY" bench/bench_kernels.py --json "$OUT/bench_kernels.json" \
    --budget-s $((left - 30)) 2>&1 | tee -a "$LOG"
  rc_bench=${PIPESTATUS[0]}
else
  echo "no time left for the benchmark" | tee -a "$LOG"
  rc_bench=124
fi

echo "== HVP modes on the GPU (bench/bench_operators.py: kept graph vs jvp(grad))" | tee -a "$LOG"
left=$((BUDGET - SECONDS - 15))
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device: skipped" | tee -a "$LOG"
elif [ "$left" -gt 40 ]; then
  timeout 60 "$PY" bench/bench_operators.py --size 1m --reps 10 --device cuda \
    2>&1 | tee "$OUT/bench_operators.txt" | tee -a "$LOG"
else
  echo "no time left for the HVP-mode benchmark" | tee -a "$LOG"
fi

"$PY" - "$OUT" "$rc_tests" "$rc_bench" "$SECONDS" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys, xml.etree.ElementTree as ET
out, rc_tests, rc_bench, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"rc_tests": rc_tests, "rc_bench": rc_bench, "seconds": seconds}
try:
    import torch
    summary["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as err:  # noqa: BLE001
    summary["env"] = {"error": repr(err)}
xml = os.path.join(out, "pytest_kernels.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad, skipped = [], {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                bad.append({"test": name, tag: (el.get("message") or "")[:400]})
        el = case.find("skipped")
        if el is not None:
            msg = (el.get("message") or "")[:200]
            skipped[msg] = skipped.get(msg, 0) + 1
    summary["tests"]["failed"] = bad
    summary["tests"]["skip_reasons"] = skipped
bench = os.path.join(out, "bench_kernels.json")
if os.path.exists(bench):
    b = json.load(open(bench))
    summary["bench"] = {k: b.get(k) for k in ("device", "cupy", "skipped", "targets", "seconds",
                                             "krylov_gemv")}
    summary["bench"]["copy"] = b.get("copy")
    summary["bench"]["rows"] = [
        {k: r.get(k) for k in ("kind", "pass", "dtype", "n", "s", "frac_copy_bw", "GBps_kernel",
                               "speedup_vs_eager", "bytes_ratio_eager", "t_kernel", "t_call",
                               "accuracy_ok", "error", "skipped")}
        for r in b.get("rows", [])
    ]
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps({k: summary.get(k) for k in ("rc_tests", "rc_bench", "seconds", "tests")}, indent=1)[:3000])
PYEOF

[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
