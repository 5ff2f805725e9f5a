#!/usr/bin/env bash
# Build, on a CPU machine with pip and PyPI, a DALI bundle for a GPU machine that has Python 3.12,
# torch and CuPy but no DALI and no package registry: the exact wheels below, unpacked, trimmed
# (other Python versions' extension modules, C/C++ headers, decoders the loader does not use),
# shared libraries stripped, packed as one tar.xz and split into parts of at most 56 MiB, so that
# each part travels with one call of at most 64 MiB (benchmarks/gpu_suite.sh stage 1, 2, 3).
#
# Usage: bash benchmarks/gpu_bundle.sh [--dry-run]
# Environment:
#   BUNDLE_DIR   output folder (default: .gpu-bundle in the checkout; git-ignored, never commit it)
#   PY_VERSION   target Python (default 3.12), PYTHON the interpreter that runs pip (default python3)
#   PART_SIZE    split size (default 56M)
#   XZ_LEVEL     xz preset (default -9e)
#   LOAD_TEST    a Python of version PY_VERSION with numpy to load-test the trimmed tree with
#                (default: none; the suite's stage 3 loads it on the GPU machine anyway);
#                LOAD_TEST_ARGS its arguments (e.g. --images DIR where that Python has no Pillow)
# Output: $BUNDLE_DIR/parts/dali-py312.tar.xz.part0{0,1,2}, SHA256SUMS, MANIFEST.txt (sizes,
#         wheels, what was removed). On the GPU machine: cat parts | xz -d | tar -x -C DIR, then
#         PYTHONPATH=DIR (benchmarks/gpu_suite.sh stage 3 does this).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
BUNDLE_DIR=${BUNDLE_DIR:-$REPO/.gpu-bundle}
PY_VERSION=${PY_VERSION:-3.12}
PYTHON=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-56M}
XZ_LEVEL=${XZ_LEVEL:--9e}
TAG=py${PY_VERSION/./}
CPTAG=cpython-${PY_VERSION/./}

# The set, pinned: DALI 2.4.0 requires nvidia-libnvcomp-cu13==5.3.0.16 exactly and
# nvidia-nvimgcodec-cu13[all]>=0.9,<0.10 (whose nvtiff extra wants nvcomp >=5,<6: the same 5.3.0.16
# satisfies both), six<=1.17 and packaging<=26.3. nvimgcodec's JPEG path needs libnvjpeg
# (nvidia-nvjpeg, CUDA 13), its TIFF path nvtiff + nvcomp; PNG, WebP and the CPU decoders are in
# nvimgcodec's own extensions. `import nvidia.dali` and its auto_aug/conditionals import astunparse,
# gast, optree, six, packaging (typing_extensions is on the GPU image). Left out on purpose:
# nvjpeg2k (JPEG 2000), nvtx, makefun, libcst (not imported on this path), numpy (on the image).
WHEELS=(
  nvidia-dali-cuda130==2.4.0
  nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-libnvcomp-cu13==5.3.0.16
  nvidia-nvjpeg==13.3.2.43
  nvidia-nvtiff-cu13==0.8.0.82
  astunparse==1.6.3
  gast==0.7.0
  optree==0.20.0
  six==1.17.0
  packaging==26.3
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

if [ "${1:-}" = "--dry-run" ]; then
  echo "bundle: $BUNDLE_DIR/parts (python $PY_VERSION, parts of $PART_SIZE, xz $XZ_LEVEL)"
  printf 'wheel: %s\n' "${WHEELS[@]}"
  exit 0
fi

WHL=$BUNDLE_DIR/wheels
SITE=$BUNDLE_DIR/site
PARTS=$BUNDLE_DIR/parts
mkdir -p "$WHL"
rm -rf "$SITE" "$PARTS"
mkdir -p "$SITE" "$PARTS"

plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
echo "gpu_bundle: downloading ${#WHEELS[@]} wheels for Python $PY_VERSION into $WHL"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plat_args[@]}" -d "$WHL" "${WHEELS[@]}"

echo "gpu_bundle: unpacking"
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  pattern=$(echo "$name" | tr '-' '_')
  whl=$(ls "$WHL"/${pattern}-${version}-*.whl 2>/dev/null | head -n 1)
  [ -n "$whl" ] || { echo "gpu_bundle: no wheel for $spec in $WHL" >&2; exit 1; }
  "$PYTHON" -m zipfile -e "$whl" "$SITE"
done
# wheels with a .data folder: its purelib/platlib go to the top (what pip install --target does)
for data in "$SITE"/*.data; do
  [ -d "$data" ] || continue
  for kind in purelib platlib; do
    [ -d "$data/$kind" ] && cp -a "$data/$kind/." "$SITE/"
  done
  rm -rf "$data"
done
before=$(du -sb "$SITE" | cut -f1)

echo "gpu_bundle: trimming"
REMOVED=$BUNDLE_DIR/removed.txt
: > "$REMOVED"
drop() { for f in "$@"; do [ -e "$f" ] && { echo "${f#"$SITE"/}" >> "$REMOVED"; rm -rf "$f"; }; done; return 0; }
# nvidia/__init__.py (shipped by some of these wheels) would make `nvidia` a regular package that
# hides torch's and CuPy's nvidia.* (nvidia.cu13, nvidia.cuda_nvrtc, ...) behind this folder; without
# it `nvidia` stays a namespace package spanning both. Same for nvidia/cu13/__init__.py.
drop "$SITE/nvidia/__init__.py" "$SITE/nvidia/cu13/__init__.py"
# extension modules for other Python versions (cpython-310, -311, -313, -313t, -314, ...)
while IFS= read -r -d '' f; do drop "$f"; done < <(find "$SITE" -name '*.cpython-3*.so' ! -name "*.${CPTAG}-*" -print0)
# C/C++ headers, static libraries, caches, type stubs of the C++ parts
while IFS= read -r -d '' f; do drop "$f"; done < <(find "$SITE" -type d \( -name include -o -name __pycache__ \) -prune -print0)
while IFS= read -r -d '' f; do drop "$f"; done < <(find "$SITE" -type f \( -name '*.a' -o -name '*.h' -o -name '*.hpp' -o -name '*.cuh' \) -print0)
# nvimgcodec: its JPEG 2000 extension needs nvjpeg2k (left out); its command line tools
drop "$SITE"/nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so* "$SITE/nvidia/nvimgcodec/tools"
# DALI's TensorFlow / JAX / PaddlePaddle plugins (PyTorch's stays)
drop "$SITE/nvidia/dali/plugin/tf" "$SITE/nvidia/dali/plugin/jax" "$SITE/nvidia/dali/plugin/paddle" \
     "$SITE/nvidia/dali/plugin/mxnet" "$SITE/nvidia/dali/plugin/numba"
# DALI's test data and the nvcomp examples, if any ship
drop "$SITE/nvidia/dali/test" "$SITE/nvidia/libnvcomp/bin" "$SITE/nvidia/libnvcomp/share"

echo "gpu_bundle: stripping shared libraries"
stripped=0
while IFS= read -r -d '' f; do
  if file -b "$f" | grep -q 'ELF.*shared object'; then
    strip --strip-unneeded "$f" 2>/dev/null && stripped=$((stripped + 1)) || true
  fi
done < <(find "$SITE" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
after=$(du -sb "$SITE" | cut -f1)

if [ -n "${LOAD_TEST:-}" ]; then
  echo "gpu_bundle: load test with $LOAD_TEST"
  # shellcheck disable=SC2086
  PYTHONPATH="$SITE" "$LOAD_TEST" "$REPO/benchmarks/gpu_bundle_check.py" ${LOAD_TEST_ARGS:-}
fi

echo "gpu_bundle: packing (xz $XZ_LEVEL)"
TARXZ=$BUNDLE_DIR/dali-$TAG.tar.xz
tar -C "$SITE" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | nice xz "$XZ_LEVEL" -T1 -c > "$TARXZ"
split -b "$PART_SIZE" -d -a 2 "$TARXZ" "$PARTS/dali-$TAG.tar.xz.part"
rm -f "$TARXZ"
(cd "$PARTS" && sha256sum dali-"$TAG".tar.xz.part* > SHA256SUMS)
{
  echo "dalimix DALI bundle for Python $PY_VERSION, built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "wheels: ${WHEELS[*]}"
  echo "unpacked: $((before / 1048576)) MiB; trimmed and stripped ($stripped libraries): $((after / 1048576)) MiB"
  echo "parts:"
  for p in "$PARTS"/dali-"$TAG".tar.xz.part*; do echo "  $(basename "$p") $(stat -c %s "$p") bytes"; done
  echo "removed: $(wc -l < "$REMOVED") paths (see removed.txt)"
} > "$PARTS/MANIFEST.txt"
cp "$REMOVED" "$PARTS/removed.txt"
cat "$PARTS/MANIFEST.txt"
n=$(ls "$PARTS"/dali-"$TAG".tar.xz.part* | wc -l)
if [ "$n" -gt 3 ]; then
  echo "gpu_bundle: $n parts: more than the suite's three calls can carry" >&2
  exit 1
fi
