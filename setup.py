"""Builds tf_smdist and compiles its op library against the installed TensorFlow.

`pip install .` runs this. The op library (`tf_smdist/libsmdist_ops.so`) is
compiled with the compile and link flags that the installed TensorFlow reports
through `tf.sysconfig`, so TensorFlow must be installed first. In a source
checkout, `python setup.py build_ext --inplace` builds it next to the sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# The TensorFlow releases this version is built and tested against.
TF_MIN = (2, 21)
TF_MAX_EXCLUSIVE = (2, 22)
TF_RANGE = ">=2.21,<2.22"

HERE = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-fPIC", "-DNDEBUG", "-Wno-deprecated-declarations"]

OPS_SOURCES = [
    "ops/smdist_ops.cc",
    "ops/smdist_kernels.cc",
    "kernels/cpu/smdist_cpu.cc",
]

# Built only when Open MPI's `mpicc` is on PATH (multi-process training).
MPI_SOURCES = [
    "ops/mpi/mpi_ops.cc",
    "kernels/mpi/comm.cc",
    "kernels/mpi/heartbeat.cc",
    "kernels/mpi/c_api.cc",
    "ops/mpi/hvd_ops.cc",
    "kernels/mpi/negotiator.cc",
    "kernels/mpi/hvd_c_api.cc",
]


def _showme(mpicc: str, what: str) -> list[str] | None:
    """The words of `mpicc --showme:WHAT`, or None when it cannot run."""
    try:
        return subprocess.run([mpicc, f"--showme:{what}"], check=True,
                              capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None


def mpi_build_flags() -> tuple[list[str], list[str]] | None:
    """Returns MPI's (compile, link) flags from `mpicc --showme`, or None.

    None when `mpicc` is missing: the MPI library is then skipped and
    multi-process runs fail with an error naming what to install
    (`apt-get install openmpi-bin libopenmpi-dev`).
    """
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        return None
    cflags, lflags = _showme(mpicc, "compile"), _showme(mpicc, "link")
    if cflags is None or lflags is None:
        return None
    rpath = ["-Wl,-rpath," + f[2:] for f in lflags if f.startswith("-L")]
    return cflags, lflags + rpath


_MPI_FLAGS = mpi_build_flags()


def linked_mpi_library(library: str) -> str | None:
    """Returns the absolute path of the libmpi that `library` loads, or None.

    Asks the dynamic loader (`ldd`, which follows the rpath set from `mpicc
    --showme:link`); without `ldd`, takes `libmpi.so` from `mpicc
    --showme:libdirs` and resolves its links.
    """
    try:
        out = subprocess.run(["ldd", library], check=True, capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            name, _, rest = line.strip().partition(" => ")
            if name.startswith("libmpi.so") and rest.startswith("/"):
                return os.path.abspath(rest.split(" (")[0].strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        return None
    dirs = _showme(mpicc, "libdirs")
    if dirs is None:
        return None
    for d in dirs:
        candidate = os.path.join(d, "libmpi.so")
        if os.path.exists(candidate):
            return os.path.realpath(candidate)
    return None

# CUDA kernels of SmdistPack and SmdistUnpack, linked into the core op
# library only when nvcc and a CUDA-enabled TensorFlow are both present.
GPU_CUDA_SOURCES = ["kernels/gpu/smdist_gpu.cu"]
GPU_OPS_SOURCES = ["ops/smdist_kernels_gpu.cc"]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-DNDEBUG", "--threads", "0", "-Xcompiler", "-fPIC",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def cuda_toolkit(tf_built_with_cuda: bool) -> tuple[tuple[str, str] | None, str]:
    """Returns ((nvcc, CUDA root), "") for a GPU build, or (None, why not).

    nvcc is `$NVCC`, else `nvcc` on PATH, else `$CUDA_HOME/bin/nvcc`; the
    CUDA root (headers, libcudart) is `$CUDA_HOME`, else the folder above
    nvcc's real location, else /usr/local/cuda.
    """
    if not tf_built_with_cuda:
        return None, ("the installed TensorFlow is not built with CUDA "
                      "(tf.test.is_built_with_cuda() is False)")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None and cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        nvcc = candidate if os.path.isfile(candidate) else None
    if nvcc is None:
        return None, "nvcc was not found (put CUDA's bin on PATH or set CUDA_HOME)"
    roots = [cuda_home, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"]
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include",
                                                "cuda_runtime_api.h")):
            return (nvcc, root), ""
    return None, (f"no CUDA headers next to {nvcc} (set CUDA_HOME to the "
                  "CUDA toolkit)")


_PROBE = (
    "import json, tensorflow as tf; print(json.dumps({"
    "'version': tf.__version__, "
    "'cflags': tf.sysconfig.get_compile_flags(), "
    "'lflags': tf.sysconfig.get_link_flags(), "
    "'cuda': tf.test.is_built_with_cuda()}))"
)


def tensorflow_build_info() -> dict:
    """Returns the installed TensorFlow's version and compile/link flags.

    pip builds in an isolated environment that hides the installed packages,
    so TensorFlow is asked in a child interpreter whose environment drops
    pip's isolation variables: it sees the site-packages the package is
    being installed into.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for python in (sys.executable, shutil.which("python3"), shutil.which("python")):
        if not python:
            continue
        proc = subprocess.run([python, "-c", _PROBE], env=env,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
    raise RuntimeError(
        "tf_smdist compiles its ops against the installed TensorFlow, but "
        "`import tensorflow` failed. Install TensorFlow " + TF_RANGE + " first "
        "(e.g. `pip install tensorflow-cpu==2.21.0` or `pip install "
        "'tensorflow[and-cuda]==2.21.0'`), then `pip install .` again."
    )


def check_tensorflow_version(version: str) -> None:
    """Raises RuntimeError unless `version` is in the supported range."""
    parts = tuple(int(p) for p in version.split(".")[:2])
    if not TF_MIN <= parts < TF_MAX_EXCLUSIVE:
        raise RuntimeError(
            f"tf_smdist supports TensorFlow {TF_RANGE}. Received: "
            f"tensorflow=={version}. Install a supported TensorFlow, e.g. "
            "`pip install tensorflow-cpu==2.21.0`."
        )


class OpLibrary(Extension):
    """A TensorFlow op library: a plain shared object, not a Python module."""

    def __init__(self, name: str, sources: list[str],
                 extra_flags: tuple[list[str], list[str]] = ([], [])) -> None:
        super().__init__(name, sources=sources)
        self.extra_flags = extra_flags


class BuildOps(build_ext):
    """Compiles the op libraries with the installed TensorFlow's flags."""

    def get_ext_filename(self, fullname: str) -> str:
        parts = fullname.split(".")
        return os.path.join(*parts[:-1], parts[-1] + ".so")

    def run(self) -> None:
        self._tf = tensorflow_build_info()
        check_tensorflow_version(self._tf["version"])
        super().run()

    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(self.build_temp, ext.name)
        os.makedirs(tmp, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        extra_cflags, extra_lflags = getattr(ext, "extra_flags", ([], []))
        cflags = CXX_FLAGS + ["-I" + HERE] + self._tf["cflags"] + extra_cflags

        def compile_one(src: str) -> str:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [cxx, "-c", os.path.join(HERE, src), "-o", obj] + cflags
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        if ext.name == "tf_smdist.libsmdist_ops":
            gpu_objects, gpu_lflags = self._build_gpu(cxx, cflags, tmp)
            objects += gpu_objects
            extra_lflags = list(extra_lflags) + gpu_lflags
        cmd = ([cxx, "-shared", "-o", target] + objects + self._tf["lflags"]
               + extra_lflags)
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        if ext.name == "tf_smdist.libsmdist_mpi":
            self._mpi_library = linked_mpi_library(target)
        # Next to the library in the wheel, and in the source tree for
        # in-place and editable builds.
        for package_dir in {os.path.dirname(target), os.path.join(HERE, "tf_smdist")}:
            self._write_build_info(package_dir)

    def _build_gpu(self, cxx: str, cflags: list[str],
                   tmp: str) -> tuple[list[str], list[str]]:
        """Compiles the CUDA kernels and GPU OpKernels, or says why it skips.

        Returns the objects and link flags to add to the core op library.
        """
        toolkit, reason = cuda_toolkit(bool(self._tf["cuda"]))
        if toolkit is None:
            print(f"tf_smdist: GPU kernels skipped: {reason}. The op library "
                  "gets CPU kernels only.", file=sys.stderr)
            return [], []
        nvcc, root = toolkit
        print(f"tf_smdist: building GPU kernels with {nvcc} (CUDA at {root})")
        abi = [f for f in self._tf["cflags"]
               if f.startswith("-D_GLIBCXX_USE_CXX11_ABI")]
        objects = []
        for src in GPU_CUDA_SOURCES:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = ([nvcc, "-c", os.path.join(HERE, src), "-o", obj, "-I" + HERE]
                   + NVCC_FLAGS + abi)
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(obj)
        for src in GPU_OPS_SOURCES:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = ([cxx, "-c", os.path.join(HERE, src), "-o", obj] + cflags
                   + ["-DGOOGLE_CUDA=1", "-I" + os.path.join(root, "include")])
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(obj)
        self._gpu_kernels = True
        lib = os.path.join(root, "lib64")
        return objects, ["-L" + lib, "-lcudart", "-Wl,-rpath," + lib]

    def _write_build_info(self, package_dir: str) -> None:
        with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
            f.write('"""Written by setup.py: what the op library was built '
                    'against."""\n\n')
            f.write(f"TF_VERSION = {self._tf['version']!r}\n")
            f.write(f"TF_CUDA = {bool(self._tf['cuda'])!r}\n")
            f.write(f"GPU_KERNELS = {getattr(self, '_gpu_kernels', False)!r}\n")
            f.write("# The MPI library libsmdist_mpi.so was linked against (None: not\n"
                    "# built); tf_smdist loads exactly this one.\n")
            f.write(f"MPI_LIBRARY = {getattr(self, '_mpi_library', None)!r}\n")


def _read_version() -> str:
    scope: dict = {}
    with open(os.path.join(HERE, "tf_smdist", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


setup(
    name="tf_smdist",
    version=_read_version(),
    description=(
        "Distributed training for Keras 3 on TensorFlow: host-offloaded "
        "data parallelism and automatically partitioned pipelines."
    ),
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["tf_smdist", "tf_smdist.*"]),
    ext_modules=[OpLibrary("tf_smdist.libsmdist_ops", OPS_SOURCES)] + (
        [OpLibrary("tf_smdist.libsmdist_mpi", MPI_SOURCES, _MPI_FLAGS)]
        if _MPI_FLAGS is not None else []),
    cmdclass={"build_ext": BuildOps},
    entry_points={
        "console_scripts": [
            "tf-smdist-launch = tf_smdist.launch:main",
            "tf-smdist-plan = tf_smdist.planner.cli:main",
        ]
    },
    install_requires=["numpy", "absl-py"],
    extras_require={
        "cpu": ["tensorflow-cpu" + TF_RANGE],
        "gpu": ["tensorflow[and-cuda]" + TF_RANGE],
        "test": ["pytest>=7", "pytest-timeout", "hypothesis", "ruff",
                 "scikit-learn", "tensorboard", "matplotlib"],
    },
    zip_safe=False,
)
