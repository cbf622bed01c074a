"""Project rules that code review would otherwise have to catch."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE = re.compile(r"^\s*(from|import)\s+tensorflow\.python", re.MULTILINE)


def _python_files():
    for top in ("tf_smdist", "tests", "examples", "benchmarks"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_private_tensorflow_imports_only_in_compat():
    offenders = []
    for path in _python_files():
        if path.endswith(os.path.join("tf_smdist", "_compat.py")):
            continue
        with open(path) as f:
            if PRIVATE.search(f.read()):
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_every_private_import_in_compat_says_why():
    with open(os.path.join(ROOT, "tf_smdist", "_compat.py")) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if PRIVATE.match(line):
            assert lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: {line}"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="needs ruff on PATH")
def test_ruff_is_clean():
    proc = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
