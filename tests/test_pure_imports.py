"""The planning modules import with TensorFlow and Keras absent."""

import subprocess
import sys

from mp_util import TESTS, package_env

PURE_MODULES = (
    "tf_smdist.pipeline.schedule",
    "tf_smdist.pipeline.solver",
    "tf_smdist.pipeline.cost_model",
    "tf_smdist.pipeline.partition",
    "tf_smdist.pipeline.profile",
    "tf_smdist.data_parallel.buckets",
)

# Any import of tensorflow or keras (or their submodules) raises.
_BLOCKER = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Blocker())
"""


def _run(code):
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code],
        cwd=TESTS,
        env=package_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_planning_modules_import_without_tensorflow_or_keras():
    code = (
        "import importlib\n"
        f"for name in {PURE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m.split('.')[0] in ('tensorflow', 'keras') "
        "for m in sys.modules)\n"
        "from tf_smdist.pipeline.profile import LayerProfile, Profile\n"
        "from tf_smdist.pipeline.partition import partition\n"
        "layers = [LayerProfile(f'l{i}', 'Dense', (), 1.0, 8, 8, 0, 4, 4) "
        "for i in range(4)]\n"
        "part = partition(Profile(layers, batch_size=2, input_bytes=4), 2)\n"
        "print(part.stage_sizes)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[2, 2]"


def test_the_blocker_blocks():
    # The check above would pass vacuously if the blocker did not work.
    proc = _run("import tf_smdist.pipeline.profiler\n")
    assert proc.returncode != 0
    assert "blocked import of" in proc.stderr
