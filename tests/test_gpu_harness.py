"""The CUDA kernels build here without a GPU: harness and GPU OpKernels."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_CHECKS = ROOT / "kernels" / "gpu" / "run_checks.sh"


def _nvcc() -> str | None:
    return os.environ.get("NVCC") or shutil.which("nvcc")


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder next to nvcc, or under CUDA_HOME."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    nvcc = _nvcc()
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    return None


needs_nvcc = pytest.mark.skipif(
    _nvcc() is None,
    reason="nvcc is not on PATH (nor NVCC set): the CUDA kernels cannot be "
    "compiled on this machine",
)


@pytest.mark.slow
@needs_nvcc
def test_gpu_harness_compiles_and_its_cpu_reference_matches_cuda(tmp_path):
    env = dict(os.environ, SMDIST_GPU_BUILD_DIR=str(tmp_path))
    build = subprocess.run(
        ["bash", str(RUN_CHECKS), "--compile-only"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    binary = tmp_path / "smdist_gpu_harness"
    assert binary.is_file() and os.access(binary, os.X_OK)

    # The harness's CPU reference conversions (float <-> float16/bfloat16,
    # round to nearest even) against cuda_fp16.h / cuda_bf16.h host code;
    # needs no GPU.
    selftest = subprocess.run([str(binary), "--host-selftest"],
                              capture_output=True, text=True, timeout=300)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "HOST SELFTEST: 0 mismatches" in selftest.stdout


@pytest.mark.slow
@needs_nvcc
def test_gpu_opkernels_compile_against_tensorflow_headers():
    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA include folder next to nvcc or under CUDA_HOME")
    tf_flags = subprocess.run(
        [sys.executable, "-c",
         "import tensorflow as tf; "
         "print(' '.join(tf.sysconfig.get_compile_flags()))"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert tf_flags.returncode == 0, tf_flags.stderr
    cxx = os.environ.get("CXX", "g++")
    cmd = ([cxx, "-fsyntax-only", "-DGOOGLE_CUDA=1", "-Wno-deprecated-declarations",
            "-I" + str(ROOT), "-I" + str(include)]
           + tf_flags.stdout.split() + [str(ROOT / "ops" / "smdist_kernels_gpu.cc")])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
