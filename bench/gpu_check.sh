#!/usr/bin/env bash
# One call on a lent GPU: install the project, run the gpu-marked tests and the op benchmarks (ours side by side
# with the peers), time the static gate's shapes next to the work model's H100 bound, write
# bench/results/<gpu name>/*.json and print one summary table. Budget: 8 minutes including the install.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--python PY] [--dry-run]
#
# The borrowed machines (H100/H200) have torch 2.11+cu130 and triton 3.6 but no open_clip, no webdataset and no
# internet. Bring the missing pure-Python wheels in a directory (default bench/wheels, or --wheels DIR), built on a
# machine with internet for the box's Python (3.12):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d bench/wheels \
#       open_clip_torch webdataset braceexpand ftfy wcwidth timm pytest-benchmark py-cpuinfo
#
# (`pip wheel --no-deps -w bench/wheels <name>` for any that ships only as an sdist). The project is installed with
# --no-deps --no-build-isolation, so pip never replaces the box's torch or triton; packages already installed there
# are not reinstalled. RPP_CUDA_ARCHS defaults to 90 here (the extension builds for the box's GPU only).
#
# --dry-run (CI, CPU): no install; the same stages on tiny shapes through the torch path, results to a temp dir, so
# the script never rots. Exit status: non-zero when a stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=bench/wheels
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
    --python) PY=${2:?--python needs an interpreter}; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # the whole call, install included, stays under 8 minutes
STATUS=0
declare -a STAGES=()
stage() {  # stage NAME TIMEOUT_S CMD...: run one stage under min(its limit, what is left of the budget)
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  local left=$(( BUDGET - (t0 - START) ))
  if (( left < 15 )); then
    STAGES+=("$name|SKIPPED (no time left)|0s"); STATUS=1; return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STAGES+=("$name|ok|${took}s") ;;
    5) STAGES+=("$name|nothing collected|${took}s") ;;
    124|137) STAGES+=("$name|TIMED OUT|${took}s"); STATUS=1 ;;
    *) STAGES+=("$name|FAILED (rc $rc)|${took}s"); STATUS=1 ;;
  esac
}

if [[ $DRY == 1 ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}  # CPU: the import-heavy stages are slower than on the GPU box
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  export RPP_KERNELS_BACKEND=torch
  stage "versions" 180 "$PY" -m rpp_kernels.info
  # -m gpu on a CPU machine: every test is collected and skipped (conftest), which proves the selection works.
  stage "gpu tests (collect only on CPU)" 180 "$PY" -m pytest tests -m gpu -q --co -p no:cacheprovider
  stage "work model" 240 "$PY" bench/model.py --only "vit-b16 P=16 bf16" --out "$OUT/model"
  stage "measure vs model" 120 "$PY" bench/gpu_check.py --dry-run --out "$OUT"
else
  export RPP_CUDA_ARCHS=${RPP_CUDA_ARCHS:-90}
  if [[ -d "$WHEELS" ]]; then
    missing=()
    for spec in open_clip:open_clip_torch webdataset:webdataset braceexpand:braceexpand ftfy:ftfy timm:timm \
                pytest_benchmark:pytest-benchmark; do
      "$PY" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
    done
    if (( ${#missing[@]} )); then
      stage "wheels: ${missing[*]}" 60 "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}"
    fi
  else
    echo "no wheel directory $WHEELS: assuming the box already has the project's Python dependencies"
  fi
  stage "install" 100 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  stage "versions" 30 "$PY" -m rpp_kernels.info
  OUT=bench/results/$("$PY" -c 'import sys; sys.path.insert(0, "bench"); import benchutil; print(benchutil.device_tag())')
  mkdir -p "$OUT"
  stage "gpu tests" 120 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
  stage "op benchmarks" 120 "$PY" -m pytest bench/test_bench_attention.py bench/test_bench_kd.py -q -k "not compile" \
    -p no:cacheprovider --benchmark-disable-gc
  stage "work model" 40 "$PY" bench/model.py --out "$OUT/model"
  stage "measure vs model" 60 "$PY" bench/gpu_check.py --out "$OUT"
fi

echo
echo "=== summary ($(( $(date +%s) - START ))s total)"
printf '%-34s %-18s %s\n' stage outcome time
for s in "${STAGES[@]}"; do
  IFS='|' read -r name outcome took <<<"$s"
  printf '%-34s %-18s %s\n' "$name" "$outcome" "$took"
done
if [[ -f "$OUT/gpu_check.json" ]]; then
  "$PY" bench/gpu_check.py --summary "$OUT"
fi
echo "results: $OUT"
exit $STATUS
