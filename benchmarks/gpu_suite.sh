#!/usr/bin/env bash
# The GPU suite in three stages, one short call each on a GPU machine that has Python 3.12, torch,
# CuPy, pytest, timm and torchvision but no DALI and no package registry, reached by calls that
# each carry at most 64 MiB (the checkout plus one part of the DALI bundle of
# benchmarks/gpu_bundle.sh) and run at most 10 minutes. Run the three back to back on one machine:
# the parts carried by stages 1 and 2 stay there for stage 3, which joins and unpacks them.
#
#   stage 1 (no DALI): kernel tests (nvcc, NVRTC with CuPy's options, host shim, the CUDA kernel
#           against the float64 reference, launch stream), the mixing / mask hook / AutoMix paths
#           on device batches under set_sync_debug_mode("error"), AutoMix in bf16 and fp16, and
#           bench_mix at batch 256: kernel GB/s against a measured device copy.
#   stage 2 (no DALI): bench_mix at batch 64 and 128, bench_automix (step and kernel parts).
#   stage 3: join the parts, unpack DALI, check it decodes, pytest -m gpu for the loader tests
#           (20 batches of every path under sync debug, policy stage, hook, AutoMix, resume, ...),
#           bench_automix's loader part, `dalimix bench --device cuda` sized to the time left.
#
# Usage: bash benchmarks/gpu_suite.sh STAGE      (STAGE: 1, 2 or 3)
#        bash benchmarks/gpu_suite.sh --dry-run  (the three stages: commands, carried part, size, time budget)
# Each stage writes its log and results under $OUT as it goes (a stage cut short still returns
# what it finished; at most 8 files), and under $RESULTS (default
# benchmarks/results/<date>-<gpu-name>/) on the machine: copy what comes back there to commit it.
# Environment: PYTHON (default python3), OUT, RESULTS, BUNDLE_DIR (default .gpu-bundle),
#   DALI_DIR (where stage 3 unpacks, default /tmp/dalimix-dali), STAGE_BUDGET (seconds; defaults
#   below), BENCH_ARGS (extra `dalimix bench` arguments).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
BUNDLE_DIR=${BUNDLE_DIR:-.gpu-bundle}
PARTS_DIR=$BUNDLE_DIR/parts
DALI_DIR=${DALI_DIR:-/tmp/dalimix-dali}
PART_PREFIX=dali-py312.tar.xz.part
# device-time plan for 15 minutes: ~2 min start-up, calls back to back (a warm machine is kept
# only briefly between calls), each stage well inside its call's 10-minute limit
declare -A BUDGET=([1]=200 [2]=120 [3]=360)
CALL_LIMIT_MIB=64

# ---------------------------------------------------------------------------- the commands
STAGE1_KERNELS=("$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py)
STAGE1_TESTS=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_automix_precision.py
              -k "test_cuda_kernel_matches or current_stream or standalone or mix_block_flow")
STAGE1_BENCH=("$PYTHON" benchmarks/bench_mix.py --device cuda --no-loader --batch-sizes 256 --repeats 10 --no-progress)
STAGE2_BENCH=("$PYTHON" benchmarks/bench_mix.py --device cuda --no-loader --batch-sizes 64,128 --repeats 10 --no-progress)
STAGE2_AUTOMIX=("$PYTHON" benchmarks/bench_automix.py --device cuda --batch-size 128 --size 224 --skip loader --save)
# the modules that hold GPU tests (only these are collected: the others may need scipy or
# hypothesis), the sync-debug tests first and the slow bench smoke run last
GPU_TEST_FILES="tests/test_gpu.py $(grep -l "pytest.mark.gpu" tests/test_*.py | grep -v -e test_gpu.py -e test_bench.py |
  tr '\n' ' ')tests/test_bench.py"
# shellcheck disable=SC2206
STAGE3_TESTS=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors $GPU_TEST_FILES
              -k "not standalone and not test_cuda_kernel_matches and not current_stream and not mix_block_flow")
STAGE3_AUTOMIX=("$PYTHON" benchmarks/bench_automix.py --device cuda --batch-size 128 --size 224 --skip steps kernel)
bench_cmd() {  # seconds left -> the dalimix bench command that fits (prints nothing when none does)
  local left=$1
  if [ "$left" -ge 240 ]; then
    echo "$PYTHON -m dalimix.cli bench --device cuda --no-progress --batch-sizes 64,256 --min-batches 10 --epochs 2 --warmup 1 ${BENCH_ARGS:-}"
  elif [ "$left" -ge 120 ]; then
    echo "$PYTHON -m dalimix.cli bench --device cuda --no-progress --batch-sizes 256 --min-batches 8 --epochs 2 --warmup 1 ${BENCH_ARGS:-}"
  elif [ "$left" -ge 60 ]; then
    echo "$PYTHON -m dalimix.cli bench --device cuda --no-progress --quick ${BENCH_ARGS:-}"
  fi
}

repo_mib() {  # what travels besides the carried part: tracked and untracked-not-ignored files
  git ls-files -z -co --exclude-standard 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1 |
    awk '{printf "%.1f", $1 / 1048576}'
}
show() { printf '%q ' "$@"; }
part_mib() { [ -f "$1" ] && awk -v b="$(stat -c %s "$1")" 'BEGIN {printf "%.1f", b / 1048576}' || echo "?"; }

if [ "${1:-}" = "--dry-run" ]; then
  repo=$(repo_mib)
  echo "gpu_suite: three calls back to back on one GPU machine; each carries the checkout ($repo MiB) and one part"
  [ -d "$PARTS_DIR" ] || echo "gpu_suite: no bundle in $PARTS_DIR yet: run 'bash benchmarks/gpu_bundle.sh' first"
  for stage in 1 2 3; do
    part="$PARTS_DIR/${PART_PREFIX}0$((stage - 1))"
    pm=$(part_mib "$part")
    total=$(awk -v a="$repo" -v b="$pm" 'BEGIN {if (b == "?") print "?"; else printf "%.1f", a + b}')
    echo
    echo "stage $stage: bash benchmarks/gpu_suite.sh $stage"
    echo "  carry: $part ($pm MiB) $PARTS_DIR/SHA256SUMS; travels: $total MiB of $CALL_LIMIT_MIB"
    echo "  budget: ${BUDGET[$stage]} s (call limit 600 s)"
    case $stage in
      1) echo "  run: $(show "${STAGE1_KERNELS[@]}")"; echo "  run: $(show "${STAGE1_TESTS[@]}")"
         echo "  run: $(show "${STAGE1_BENCH[@]}")" ;;
      2) echo "  run: $(show "${STAGE2_BENCH[@]}")"; echo "  run: $(show "${STAGE2_AUTOMIX[@]}")" ;;
      3) echo "  run: cat $PARTS_DIR/${PART_PREFIX}0* | xz -d | tar -x -C $DALI_DIR; PYTHONPATH+=:$DALI_DIR"
         echo "  run: $PYTHON benchmarks/gpu_bundle_check.py --gpu"
         echo "  run: $(show "${STAGE3_TESTS[@]}")"
         echo "  run: $(show "${STAGE3_AUTOMIX[@]}")"
         echo "  run: $(bench_cmd 240)   (smaller when less time is left)" ;;
    esac
  done
  echo
  echo "results: \$OUT (what comes back) and benchmarks/results/<date>-<gpu-name>/ on the machine"
  exit 0
fi

STAGE=${1:-}
case "$STAGE" in
  1|2|3) ;;
  -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
  *) echo "gpu_suite.sh: give a stage, 1, 2 or 3, or --dry-run (see --help)" >&2; exit 2 ;;
esac
STAGE_BUDGET=${STAGE_BUDGET:-${BUDGET[$STAGE]}}
T0=$SECONDS
left() { echo $((STAGE_BUDGET - (SECONDS - T0))); }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DALI_LOG_LEVEL=${DALI_LOG_LEVEL:-3}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_suite: torch sees no CUDA GPU here ($PYTHON); this suite is for a machine with one." >&2
  echo "gpu_suite: on a CPU machine run 'dalimix bench' and 'python benchmarks/bench_mix.py' instead." >&2
  exit 1
fi
GPU_NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
RESULTS=${RESULTS:-benchmarks/results/$(date +%Y-%m-%d)-$SLUG}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/stage$STAGE.log"
: > "$LOG"
OUT_DIR=${OUT:-}
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"

say() { echo "gpu_suite[$STAGE] $(date -u +%H:%M:%S) +$((SECONDS - T0))s: $*" | tee -a "$LOG"; }
ship() { [ -n "$OUT_DIR" ] && for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT_DIR/"; done; return 0; }
STATUS=0
step() {  # name, seconds, command...: run with a time limit, log, ship the log
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then say "$name: skipped, $limit s left of the stage budget"; STATUS=1; return 1; fi
  say "$name (limit $limit s): $*"
  local t=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit code $rc after $((SECONDS - t)) s"
  [ "$rc" -ne 0 ] && STATUS=1
  ship "$LOG"
  return "$rc"
}
newest() { ls -t "$@" 2>/dev/null | head -n 1; }

say "$GPU_NAME; $("$PYTHON" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")'); budget $STAGE_BUDGET s"
if [ "$STAGE" = 1 ]; then
  {
    echo "# GPU suite machine, $(date -Iseconds)"
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PYTHON" -c "import json; from dalimix.bench.machine import describe; m = describe(); print(json.dumps({k: m.get(k) for k in ('cpu_model', 'usable_cpus', 'memory_gib', 'gpu', 'versions', 'dalimix_commit')}, indent=1))" 2>&1
    echo '```'
  } > "$RESULTS/machine.md"
  ship "$RESULTS/machine.md"
fi
# this stage's part of the bundle, as it arrived
part="$PARTS_DIR/${PART_PREFIX}0$((STAGE - 1))"
if [ -f "$part" ]; then
  (cd "$PARTS_DIR" && grep " $(basename "$part")\$" SHA256SUMS 2>/dev/null | sha256sum -c --quiet - 2>&1) \
    && say "$(basename "$part") is here and intact" || say "WARNING: $(basename "$part") does not match SHA256SUMS"
else
  say "WARNING: $part did not come with this call (stage 3 needs all parts)"
fi

case $STAGE in
1)
  step "kernel tests (nvcc, NVRTC, host shim)" $(( $(left) - 120 )) "${STAGE1_KERNELS[@]}"
  step "CUDA kernel, hook and AutoMix tests without DALI" $(( $(left) - 75 )) "${STAGE1_TESTS[@]}"
  step "bench_mix, batch 256" $(( $(left) - 5 )) "${STAGE1_BENCH[@]}" --out "$RESULTS"
  ship "$(newest "$RESULTS"/bench-mix-cuda-*.json)" "$(newest "$RESULTS"/bench-mix-cuda-*.md)"
  ;;
2)
  step "bench_mix, batch 64 and 128" $(( $(left) - 50 )) "${STAGE2_BENCH[@]}" --out "$RESULTS"
  ship "$(newest "$RESULTS"/bench-mix-cuda-*.json)" "$(newest "$RESULTS"/bench-mix-cuda-*.md)"
  step "bench_automix, step and kernel" $(( $(left) - 5 )) "${STAGE2_AUTOMIX[@]}"
  saved=$(newest benchmarks/results/*-automix-cuda*.json)
  [ -n "$saved" ] && mv "$saved" "$RESULTS/" && ship "$RESULTS/$(basename "$saved")"
  ;;
3)
  missing=""
  for i in 0 1 2; do
    [ -f "$PARTS_DIR/${PART_PREFIX}0$i" ] || missing="$missing ${PART_PREFIX}0$i"
  done
  n_parts=$(ls "$PARTS_DIR/${PART_PREFIX}"* 2>/dev/null | wc -l)
  if [ -n "$missing" ] || [ "$n_parts" -eq 0 ]; then
    say "DALI bundle incomplete (missing:$missing): the machine was not kept between the calls; run stages 1-3 back to back"
    STATUS=1
  elif ! (cd "$PARTS_DIR" && sha256sum -c --quiet SHA256SUMS >> "$LOG" 2>&1); then
    say "DALI bundle parts do not match SHA256SUMS"
    STATUS=1
  else
    rm -rf "$DALI_DIR" && mkdir -p "$DALI_DIR"
    say "unpacking DALI into $DALI_DIR"
    if cat "$PARTS_DIR/${PART_PREFIX}"0* | xz -d -T0 | tar -x -C "$DALI_DIR"; then
      export PYTHONPATH="$PYTHONPATH:$DALI_DIR"
      say "unpacked: $(du -sm "$DALI_DIR" | cut -f1) MiB"
    else
      say "unpacking failed"
      STATUS=1
    fi
  fi
  if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
    step "DALI bundle decodes" 60 "$PYTHON" benchmarks/gpu_bundle_check.py --gpu
    step "GPU tests with DALI" $(( $(left) - 150 )) "${STAGE3_TESTS[@]}"
    grep -E "passed|failed|error" "$LOG" | tail -n 3 > "$RESULTS/pytest-stage3-summary.txt"
    ship "$RESULTS/pytest-stage3-summary.txt"
    if [ "$(left)" -gt 200 ]; then
      step "bench_automix, loader" 60 "${STAGE3_AUTOMIX[@]}"
    else
      say "bench_automix, loader: not run, the $(left) s left go to dalimix bench"
    fi
    cmd=$(bench_cmd $(( $(left) - 15 )))
    if [ -n "$cmd" ]; then
      # shellcheck disable=SC2086
      step "dalimix bench" $(( $(left) - 5 )) $cmd --out "$RESULTS"
      ship "$(newest "$RESULTS"/bench-cuda-*.json)" "$(newest "$RESULTS"/bench-cuda-*.md)" "$(newest "$RESULTS"/bench-cuda-*.png)"
    else
      say "dalimix bench: skipped, $(left) s left"
      STATUS=1
    fi
  else
    say "nvidia.dali does not import: the loader tests and benchmarks are not run"
    STATUS=1
  fi
  ;;
esac
say "stage $STAGE done with status $STATUS in $((SECONDS - T0)) s of $STAGE_BUDGET; results in $RESULTS${OUT_DIR:+ and $OUT_DIR}"
ship "$LOG"
exit $STATUS
