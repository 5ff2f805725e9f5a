#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU, run the GPU tests and the GPU benchmarks and write
# dated results to commit, under benchmarks/results/<date>-<gpu-name>/:
#   summary.md          machine, versions, nvidia-smi, and every table below
#   pytest-gpu.log      pytest -m gpu
#   bench-mix-cuda-*    the mixing stage alone (json, md): dalimix's fused kernel vs timm /
#                       torchvision / torch by hand, its GB/s against a measured device copy,
#                       planning cost, loader images/s with mixing on vs off
#   bench-cuda-*        dalimix vs torchvision vs timm vs DALI + torch (json, md, png)
#
# Usage: bash benchmarks/gpu_suite.sh [--quick] [--dry-run] [tests] [mix] [bench]
#   no part named = all three; --quick = the smoke sizes of each benchmark; --dry-run = print the
#   commands and the results folder, run nothing.
# Environment:
#   PYTHON       the interpreter (default: python3); dalimix runs from this checkout (PYTHONPATH).
#   DALI_WHEELS  folder(s), ':'-separated, of wheels to install with `pip install --target
#                $DALI_SITE` when nvidia.dali does not import (default: .whl when it exists).
#                Split wheels (NAME.whl.partaa, NAME.whl.partab, ... from
#                `split -b 60M NAME.whl NAME.whl.part`), parts in any of the folders, are joined first.
#   DALI_SITE    where those wheels go (default /tmp/site); it is put on PYTHONPATH.
#   RESULTS      the results folder (default benchmarks/results/<date>-<gpu-name>).
#   OUT          if set, the results folder is also copied to $OUT/<its name>/.
#   BENCH_ARGS, BENCH_MIX_ARGS  extra arguments for `dalimix bench` / bench_mix.py.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
QUICK=0
DRY=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    tests|mix|bench) PARTS+=("$arg") ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests mix bench)
want() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DALI_LOG_LEVEL=${DALI_LOG_LEVEL:-3}

# DALI from wheels when it is not installed
DALI_SITE=${DALI_SITE:-/tmp/site}
DALI_WHEELS=${DALI_WHEELS:-}
[ -z "$DALI_WHEELS" ] && [ -d "$REPO/.whl" ] && DALI_WHEELS="$REPO/.whl"
have_dali() { "$PYTHON" -c "import nvidia.dali" >/dev/null 2>&1; }
if [ $DRY -eq 0 ] && ! have_dali && [ -n "$DALI_WHEELS" ]; then
  # wheels and wheel parts may be spread over several folders (one per upload)
  JOINED=$(mktemp -d /tmp/dalimix-wheels.XXXXXX)
  IFS=':' read -r -a WHEEL_DIRS <<< "$DALI_WHEELS"
  for dir in "${WHEEL_DIRS[@]}"; do
    for whl in "$dir"/*.whl; do [ -e "$whl" ] && cp "$whl" "$JOINED/"; done
  done
  for first in $(for dir in "${WHEEL_DIRS[@]}"; do ls "$dir"/*.whl.partaa 2>/dev/null; done); do
    name=$(basename "${first%.partaa}")
    parts=$(for dir in "${WHEEL_DIRS[@]}"; do
      for part in "$dir/$name".part*; do [ -e "$part" ] && printf '%s\t%s\n' "$(basename "$part")" "$part"; done
    done | sort | cut -f2)
    # shellcheck disable=SC2086
    cat $parts > "$JOINED/$name"
  done
  echo "gpu_suite: installing $(ls "$JOINED" | wc -l) wheel(s) from $DALI_WHEELS into $DALI_SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DALI_SITE" \
    "$JOINED"/*.whl || echo "gpu_suite: pip install of the wheels in $DALI_WHEELS failed" >&2
  rm -rf "$JOINED"
fi
[ -d "$DALI_SITE" ] && export PYTHONPATH="$PYTHONPATH:$DALI_SITE"

if [ $DRY -eq 0 ]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: torch sees no CUDA GPU here ($PYTHON); this suite is for a machine with one." >&2
    echo "gpu_suite: on a CPU machine run 'dalimix bench' and 'python benchmarks/bench_mix.py' instead." >&2
    exit 1
  fi
  GPU_NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
else
  GPU_NAME="<gpu-name>"
fi
SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
RESULTS=${RESULTS:-benchmarks/results/$(date +%Y-%m-%d)-$SLUG}

DALI_OK=1
if [ $DRY -eq 0 ] && ! have_dali; then
  DALI_OK=0
  echo "gpu_suite: WARNING: nvidia.dali does not import with $PYTHON (PYTHONPATH=$PYTHONPATH)." >&2
  echo "gpu_suite: the loader tests fail and the loader benchmarks are skipped; give DALI_WHEELS=<folder of" >&2
  echo "gpu_suite: nvidia-dali-cuda130 and its dependencies' wheels> (see the README's Benchmarks section)." >&2
fi

QUICK_ARG=()
[ $QUICK -eq 1 ] && QUICK_ARG=(--quick)
BENCH_MIX_CMD=("$PYTHON" benchmarks/bench_mix.py --device cuda --out "$RESULTS" --no-progress "${QUICK_ARG[@]}")
[ $DALI_OK -eq 0 ] && BENCH_MIX_CMD+=(--no-loader)
# shellcheck disable=SC2206
BENCH_MIX_CMD+=(${BENCH_MIX_ARGS:-})
# 20 batches of 256 per epoch: a few seconds per epoch even for the fastest loader
BENCH_CMD=("$PYTHON" -m dalimix.cli bench --device cuda --out "$RESULTS" --no-progress "${QUICK_ARG[@]}")
[ $QUICK -eq 0 ] && BENCH_CMD+=(--min-batches 20)
# shellcheck disable=SC2206
BENCH_CMD+=(${BENCH_ARGS:-})
TEST_CMD=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests)

if [ $DRY -eq 1 ]; then
  echo "results: $RESULTS"
  want tests && echo "tests: ${TEST_CMD[*]}"
  want mix && echo "mix: ${BENCH_MIX_CMD[*]}"
  want bench && echo "bench: ${BENCH_CMD[*]}"
  exit 0
fi

mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.md"
{
  echo "# GPU suite, $(date -Iseconds)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PYTHON" - <<'EOF'
import json
from dalimix.bench.machine import describe
m = describe()
print(json.dumps({k: m[k] for k in ("cpu_model", "usable_cpus", "memory_gib", "gpu", "versions", "dalimix_commit")}, indent=1))
EOF
  echo '```'
} > "$SUMMARY" 2>&1

STATUS=0
run_part() {  # name, command...
  local name=$1; shift
  echo "gpu_suite: $name: $*"
  local t0=$SECONDS
  "$@"
  local rc=$?
  echo "gpu_suite: $name finished with exit code $rc in $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && STATUS=1
  return $rc
}

if want tests; then
  run_part tests "${TEST_CMD[@]}" 2>&1 | tee "$RESULTS/pytest-gpu.log"
  [ "${PIPESTATUS[0]}" -ne 0 ] && STATUS=1
  { echo; echo "## pytest -m gpu"; echo; echo '```'; tail -n 15 "$RESULTS/pytest-gpu.log"; echo '```'; } >> "$SUMMARY"
fi
if want mix; then
  run_part mix "${BENCH_MIX_CMD[@]}"
  latest=$(ls -t "$RESULTS"/bench-mix-cuda-*.md 2>/dev/null | head -n 1)
  [ -n "$latest" ] && { echo; echo "## Mixing stage (benchmarks/bench_mix.py)"; echo; cat "$latest"; } >> "$SUMMARY"
fi
if want bench; then
  if [ $DALI_OK -eq 1 ]; then
    run_part bench "${BENCH_CMD[@]}"
    latest=$(ls -t "$RESULTS"/bench-cuda-*.md 2>/dev/null | head -n 1)
    [ -n "$latest" ] && { echo; echo "## Loaders (dalimix bench)"; echo; cat "$latest"; } >> "$SUMMARY"
  else
    echo "gpu_suite: bench skipped: no DALI" | tee -a "$SUMMARY"
    STATUS=1
  fi
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  mkdir -p "$OUT/$(basename "$RESULTS")"
  cp "$RESULTS"/* "$OUT/$(basename "$RESULTS")/"
fi
echo "gpu_suite: results in $RESULTS (summary: $SUMMARY)"
exit $STATUS
