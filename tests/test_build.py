"""The build contract: supported TensorFlow range, build info, Bazel build."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd
from tf_smdist import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_range():
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    low = tuple(int(x) for x in re.search(r"TF_MIN = \((\d+), (\d+)\)", text).groups())
    high = tuple(
        int(x) for x in re.search(r"TF_MAX_EXCLUSIVE = \((\d+), (\d+)\)", text).groups()
    )
    return low, high


def test_installed_tensorflow_is_in_the_pinned_range():
    low, high = _setup_range()
    version = tuple(int(x) for x in tf.__version__.split(".")[:2])
    assert low <= version < high, (tf.__version__, low, high)


def test_library_was_built_against_the_installed_tensorflow():
    from tf_smdist import _build_info

    assert _build_info.TF_VERSION == tf.__version__
    assert _ops.load_library() is _ops.load_library()


def test_setup_refuses_unsupported_tensorflow():
    path = os.path.join(ROOT, "setup.py")
    # Only the helper is needed: run setup.py's definitions, not setup().
    with open(path) as f:
        source = f.read().split("\nsetup(\n")[0]
    scope = {"__file__": path, "__name__": "_setup_check"}
    exec(compile(source, path, "exec"), scope)
    scope["check_tensorflow_version"]("2.21.3")
    for bad in ("2.20.0", "2.22.0", "3.0.0"):
        with pytest.raises(RuntimeError, match=f"Received: tensorflow=={bad}"):
            scope["check_tensorflow_version"](bad)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bazel") is None, reason="needs bazel on PATH")
def test_bazel_builds_a_working_op_library(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", "configure_bazel.sh"], cwd=ROOT, env=env, check=True,
                   timeout=300, capture_output=True)
    try:
        proc = subprocess.run(["bazel", "build", "//:smdist_ops"], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
    finally:
        # Bazel leaves its server running for hours: stop it with the test.
        subprocess.run(["bazel", "shutdown"], cwd=ROOT, capture_output=True,
                       timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    library = os.path.join(ROOT, "bazel-bin", "libsmdist_ops.so")
    # Load it in a fresh interpreter: one process cannot register the ops twice.
    code = (
        "import tensorflow as tf, numpy as np\n"
        f"lib = tf.load_op_library({library!r})\n"
        "x = lib.smdist_host_reduce([tf.ones([5]), tf.ones([5])], scale=0.5,"
        " out_type=tf.float32)\n"
        "print(x.numpy().tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[1.0, 1.0, 1.0, 1.0, 1.0]"


def test_quickstart_runs(tmp_path):
    script = os.path.join(ROOT, "examples", "quickstart.py")
    out = subprocess.run([sys.executable, script], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "largest weight difference from MirroredStrategy" in out.stdout
    assert "PipelineModel, 2 stages" in out.stdout
    assert "matches NumPy" in out.stdout
    assert np.isfinite(float(out.stdout.split("GB/s")[0].split()[-1]))


def test_version_is_a_normalised_release_version():
    from packaging.version import Version

    # What setup.py gives the package metadata is what `smd.__version__` says.
    scope = {}
    with open(os.path.join(ROOT, "tf_smdist", "_version.py")) as f:
        exec(f.read(), scope)
    assert smd.__version__ == scope["__version__"]
    assert str(Version(smd.__version__)) == smd.__version__  # PEP 440, normalised


def test_import_is_lazy_and_every_public_name_resolves(tmp_path):
    code = (
        "import sys, tf_smdist as smd\n"
        "assert 'tensorflow' not in sys.modules, 'import started TensorFlow'\n"
        "missing = [n for n in smd.__all__ if getattr(smd, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert smd.pipeline.solve_partition and smd.data_parallel.plan_buckets\n"
        "print('ok', len(smd.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "ok"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        smd.nope  # noqa: B018
