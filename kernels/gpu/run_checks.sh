#!/usr/bin/env bash
# Builds the standalone CUDA harness (no TensorFlow) and runs it: checks every
# kernel against a CPU reference, then times each against a device-to-device
# cudaMemcpy and prints a table last.
#
#   kernels/gpu/run_checks.sh                  build, check, benchmark
#   kernels/gpu/run_checks.sh --compile-only   build only (no GPU needed)
#   kernels/gpu/run_checks.sh --no-bench       build and check only
# Other arguments go to the harness (--seed N, --reps N, --tune).
# NVCC overrides the compiler, SMDIST_GENCODE the targets and SMDIST_GPU_BUILD_DIR
# the build folder (default kernels/gpu/build).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${SMDIST_GPU_BUILD_DIR:-${here}/build}"
nvcc="${NVCC:-nvcc}"
gencode="${SMDIST_GENCODE:--gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90}"

compile_only=0
args=()
for arg in "$@"; do
  if [[ "${arg}" == "--compile-only" ]]; then
    compile_only=1
  else
    args+=("${arg}")
  fi
done

if ! command -v "${nvcc}" >/dev/null 2>&1; then
  echo "run_checks.sh: nvcc not found (set NVCC or put CUDA's bin on PATH)" >&2
  exit 2
fi

mkdir -p "${build}"
flags=(-std=c++17 -O3 -lineinfo --threads 0 -Xcompiler -Wall ${gencode})
echo "+ ${nvcc} ${flags[*]} (smdist_gpu.cu, harness.cu)"
"${nvcc}" "${flags[@]}" -c "${here}/smdist_gpu.cu" -o "${build}/smdist_gpu.o"
"${nvcc}" "${flags[@]}" -c "${here}/harness.cu" -o "${build}/harness.o"
"${nvcc}" ${gencode} "${build}/smdist_gpu.o" "${build}/harness.o" \
  -o "${build}/smdist_gpu_harness"
echo "built ${build}/smdist_gpu_harness"

if [[ "${compile_only}" == 1 ]]; then
  exit 0
fi
exec "${build}/smdist_gpu_harness" "${args[@]+"${args[@]}"}"
