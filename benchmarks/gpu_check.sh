#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (torch preinstalled, no internet):
# builds the extension in place (CUDA kernels for sm_90), runs a compute-sanitizer memcheck
# of a small case, the benchmarks, and the whole test suite (CUDA tests, opcheck and
# CUDA-graph capture included) with the time left, then, while 90 s are still left, Nsight
# Compute over the decode kernels (as `profile decode` below) and over the prefill step's
# tensor-core kernels (one launch each); writes report.md and logs (8 files at most: what
# the device tool brings back) to $OUT (the device tool's folder) or to
# benchmarks/results/gpu-latest.
#   GAZE_COMMIT=<hash> bash benchmarks/gpu_check.sh
# Each step runs under its own time limit, cut to what is left of the call's budget,
# GAZE_CHECK_SECONDS (default 570: the device tool stops a call at its timeout, 600 s at
# most, and a call stopped from outside writes no report): a step that would start past it
# is skipped, and the report is always written. Give the tool's timeout_s a margin over it.
# A second call, `... gpu_check.sh sanitizers`, builds again and runs compute-sanitizer's
# racecheck, synccheck and initcheck on a smaller case (shared-memory races and barrier
# misuse: what gaze_sim, whose fibers switch only at barriers, cannot see).
# After a fix, shorter calls: `... gpu_check.sh tests [PYTEST ARGS]` (build, then those
# tests, by default the whole suite, up to 420 s; the whole suite took 207 s in 4 xdist
# workers on an H100 machine) or `... gpu_check.sh bench` (build,
# then both benchmarks with the FlexAttention peer, which the full check leaves out: its
# Triton kernels compile for up to a minute or two, and the full check's time is counted).
# `... gpu_check.sh profile [decode|prefill]` builds and runs Nsight Compute over the decode
# and prefill steps, or one of them (benchmarks/profile_case.py): each kernel's speed of
# light, occupancy, stall reasons and memory traffic, in ncu-decode.txt and ncu-prefill.txt.
set -uo pipefail
MODE=${1:-full}
PROFILE_STEPS="decode prefill"
case $MODE in
  full|sanitizers|bench) ;;
  profile) [ $# -gt 1 ] && PROFILE_STEPS=$2
    case $PROFILE_STEPS in "decode prefill"|decode|prefill) ;;
      *) echo "$0 profile: decode or prefill, not '$PROFILE_STEPS'" >&2; exit 2 ;; esac ;;
  tests) shift; PYTEST_ARGS=("$@") ;;
  *) echo "usage: $0 [full|sanitizers|bench|profile [decode|prefill]|tests [PYTEST ARGS]]" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GAZE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
# The GPU image's default CXX, /opt/gcc/bin/g++, wraps g++-real 13.3; an extension it built
# segfaulted on every C++ exception raised by gaze_attention (2026-11-25, H100 machine),
# while /usr/bin/g++ (13.3 too) built one that raises cleanly.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
PY=${PYTHON:-python3}
REPORT="$OUT/report.md"
BUDGET=${GAZE_CHECK_SECONDS:-570}
REPORT_SECONDS=15  # kept at the end of the budget: a stopped step's 5 s of grace, the report
step() {  # step NAME LIMIT_SECONDS LOG COMMAND...: runs, records status and time
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((BUDGET - REPORT_SECONDS - SECONDS))
  if [ "$left" -lt 1 ]; then
    echo "| $name | skipped: the call's $BUDGET s were spent | |" >> "$OUT/steps.md"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  # TERM at the limit, KILL 5 s later (a process stuck in a hung kernel)
  timeout -k 5 "$limit" "$@" > "$log" 2>&1
  local rc=$? result=ok
  [ $rc != 0 ] && result="FAILED (rc $rc)"
  [ $rc = 124 ] && result="FAILED (stopped at its limit, $limit s)"
  [ $rc = 137 ] && result="FAILED (killed: 5 s past its limit of $limit s, or out of memory)"
  echo "| $name | $result | $((SECONDS - start)) s |" >> "$OUT/steps.md"
  return $rc
}
: > "$OUT/steps.md"

{
  echo "# GPU check ($MODE)"
  echo
  echo "- commit: ${GAZE_COMMIT:-unknown}"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
  echo "- $($PY -c 'import torch, sys; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| python", sys.version.split()[0])')"
  echo "- nvcc: $(nvcc --version | tail -1)"
  echo "- host compiler: ${CXX:-c++} ($(${CXX:-c++} --version | head -1))"
  echo "- kernel: $(uname -r) (compute-sanitizer refuses the GPU under gVisor, kernel 4.4.0)"
} > "$REPORT"

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
sanitize() {  # sanitize TOOL LIMIT [ARGS...]: one compute-sanitizer tool over sanitize_case
  local tool=$1 limit=$2; shift 2
  step "$tool" "$limit" "$OUT/$tool.log" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$@" \
    $PY -m benchmarks.sanitize_case $([ "$MODE" = sanitizers ] && echo --quick)
  grep -q "Device not supported" "$OUT/$tool.log" 2> /dev/null &&
    echo "| ($tool) | compute-sanitizer does not support this machine's GPU runtime | |" >> "$OUT/steps.md"
}

step build 150 "$OUT/build.log" $PY setup.py build_ext --inplace
# (gaze_sim, the CPU emulation of these kernels, is for machines without a GPU, and so is the
# sanitized rerun of the CPU kernels' tests: CI runs both, and device time is short)
# A test that hangs past 60 s (a deadlock on the GPU) prints every thread's stack to the log.
# Without PYTEST ARGS the suite runs so that a crash (a segfault, a broken CUDA context)
# costs one test's or one file's result, not the rest of the suite's: in 4 pytest-xdist
# workers (a crashed worker's test is reported and the worker replaced) where xdist is
# installed, as on the GPU machines, else each test file in its own process.
run_tests() {  # run_tests LIMIT [PYTEST ARGS]
  local limit=$1; shift
  local pytest=($PY -m pytest -q -ra --tb=short -o faulthandler_timeout=60)
  if [ $# -eq 0 ] && $PY -c "import xdist" 2> /dev/null; then
    set -- -n 4 python_tests --ignore=python_tests/test_cuda_sim.py \
      --ignore=python_tests/test_cpu_sanitized.py
  fi
  if [ $# -gt 0 ]; then
    step tests "$limit" "$OUT/tests.log" "${pytest[@]}" "$@"
    return
  fi
  local deadline=$((SECONDS + limit)) f rc=0
  : > "$OUT/tests.log"
  for f in python_tests/test_*.py; do
    case $f in python_tests/test_cuda_sim.py | python_tests/test_cpu_sanitized.py) continue ;; esac
    echo "=== $f" >> "$OUT/tests.log"
    step "tests: ${f#python_tests/}" $((deadline > SECONDS ? deadline - SECONDS : 1)) \
      "$OUT/tests-file.log" "${pytest[@]}" "$f" || rc=1
    cat "$OUT/tests-file.log" >> "$OUT/tests.log"
  done
  rm -f "$OUT/tests-file.log"
  return $rc
}
benchmark() {  # benchmark DECODE_LIMIT PREFILL_LIMIT [--no-flex]
  step decode-benchmark "$1" "$OUT/decode.log" $PY -m benchmarks.decode --device cuda --out "$OUT" ${3:-}
  step prefill-benchmark "$2" "$OUT/prefill.log" $PY -m benchmarks.prefill --device cuda --out "$OUT" ${3:-}
}
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
# decode: 2 steps of each selection mode, every kernel of them (4 a step)
DECODE_KERNELS="attention_|merge_splits|scoring_kernel|topk_kernel"
# prefill, in the full check: the first forward, tile backward and key-major pass
TILE_KERNELS="attention_forward_tiled|attention_backward_tiled|region_keys_backward"
profile() {  # profile STEP LIMIT KERNEL_REGEX LAUNCHES
  # SchedulerStats and InstructionStats: issue slots used and instructions executed, to set
  # beside the instruction counts read from the SASS (GPU-NOTES)
  step "ncu $1" "$2" "$OUT/ncu-$1.txt" "$NCU" --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section MemoryWorkloadAnalysis \
    --kernel-name "regex:$3" --launch-count "$4" $PY -m benchmarks.profile_case "$1"
}
profile_if_time() {  # profile_if_time STEP LIMIT KERNEL_REGEX LAUNCHES: with 90 s left or more
  if [ $((BUDGET - REPORT_SECONDS - SECONDS)) -ge 90 ]; then
    profile "$@"
  else
    echo "| ncu $1 | skipped: under 90 s of the budget left | |" >> "$OUT/steps.md"
  fi
}
case $MODE in
  # the short steps first: the suite takes the time left (207 s on the H100 at 5adf7eb),
  # and what the suite leaves of the budget profiles the decode kernels, then the tile ones
  full) sanitize memcheck 80; benchmark 120 120 --no-flex; run_tests 420
    profile_if_time decode 200 "$DECODE_KERNELS" 16
    profile_if_time prefill 150 "$TILE_KERNELS" 3 ;;
  profile)
    [[ $PROFILE_STEPS == *decode* ]] && profile decode 200 "$DECODE_KERNELS" 16
    [[ $PROFILE_STEPS == *prefill* ]] &&
      profile prefill 300 "tiled|region_keys|selection_keys|scoring_tile|topk_kernel" 8 ;;
  sanitizers) sanitize racecheck 200; sanitize synccheck 100; sanitize initcheck 100 ;;
  tests) run_tests 420 "${PYTEST_ARGS[@]}" ;;
  bench) benchmark 200 240 ;;
esac

{
  echo "- build: $($PY -c 'import gaze_ext; print(gaze_ext.build_info())' 2>&1 | tail -1)"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  cat "$OUT/steps.md"
  echo
  [ -f "$OUT/build.log" ] && grep -qE "error:|FAILED:" "$OUT/build.log" &&
    { echo "## Build errors"; echo '```'; grep -m 20 -E -A 4 "error:|FAILED:" "$OUT/build.log"; echo '```'; }
  if [ -f "$OUT/tests.log" ]; then
    echo "## Tests"
    echo '```'
    grep -E "^(=== python_tests|FAILED|ERROR)|^[0-9]+ [a-z]+.* in [0-9.]+s|Fatal Python" "$OUT/tests.log" |
      head -n 80
    echo '```'
    echo
  fi
  for tool in memcheck racecheck synccheck initcheck; do
    [ -f "$OUT/$tool.log" ] || continue
    echo "## compute-sanitizer $tool"
    echo '```'
    tail -n 12 "$OUT/$tool.log"
    echo '```'
    echo
  done
  for f in "$OUT"/ncu-*.txt; do  # the profiles stay in their files; their errors here
    [ -f "$f" ] && grep -qE "==ERROR==|==WARNING==" "$f" &&
      { echo "## $(basename "$f")"; echo '```'; grep -m 10 -E "==ERROR==|==WARNING==" "$f"; echo '```'; }
  done
  for f in "$OUT/decode-cuda.md" "$OUT/prefill-cuda.md"; do
    [ -f "$f" ] && cat "$f" && echo
  done
  for name in decode prefill; do  # a benchmark's log when it wrote no report or an error
    f="$OUT/$name.log"
    [ -f "$f" ] || continue
    if [ ! -f "$OUT/$name-cuda.md" ] || grep -qiE "error|traceback" "$f"; then
      echo "## $name.log"; echo '```'; tail -n 30 "$f"; echo '```'
    fi
  done
} >> "$REPORT"
rm -f "$OUT/steps.md" "$OUT/decode-cuda.md" "$OUT/prefill-cuda.md" "$OUT/decode.log" "$OUT/prefill.log"
cat "$REPORT"
