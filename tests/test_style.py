"""Project rules that code review would otherwise have to catch."""

import ast
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


# Where TensorFlow's and Keras' private names may be read: the compatibility
# module and the one walker of the Keras graph.
PRIVATE_API_MODULES = (
    os.path.join("tf_smdist", "_compat.py"),
    os.path.join("tf_smdist", "pipeline", "graph.py"),
)
# Names under which code reads private attributes of its own objects, not of
# TensorFlow's or Keras': `other` in the comparison methods of our classes.
OWN_OBJECT_NAMES = frozenset({"self", "cls", "other"})


def _own_imports(tree):
    """Names bound to tf_smdist modules or objects by the file's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").split(".")[0] == "tf_smdist"
        ):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tf_smdist":
                    names.add((alias.asname or alias.name).split(".")[0])
    return names


def _own_private_names():
    """Private names our own classes define: `self._x = ...` and `def _x`."""
    names = set()
    for path in _python_files():
        if not os.path.relpath(path, ROOT).startswith("tf_smdist" + os.sep):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                names.update(
                    f.name for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                )
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_attribute_reads(source, path="<string>", own_private=frozenset()):
    """`x._name` reads in `source` that may reach into TensorFlow or Keras.

    A heuristic over the AST: an attribute whose name starts with one
    underscore (dunders are Python's), read directly or by a constant name
    through `getattr`/`hasattr`/`setattr`/`delattr`, is flagged unless it is read from
    `self`, `cls` or `other` (our own objects), from a name bound to one of
    our own modules or objects by an import, through `super()` inside the
    method of the same name (an override calling the base it overrides), or
    when the name is one of `own_private`: the private attributes and
    methods our own classes define (so `pipe._process` passes; a Keras name
    that one of our classes also defines would pass too).
    """
    tree = ast.parse(source, path)
    own = _own_imports(tree)
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            value = node.value
            allowed = node.attr in own_private or (
                isinstance(value, ast.Name)
                and (value.id in OWN_OBJECT_NAMES or value.id in own)
            ) or (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "super"
                and node.attr == function
            )
            if not allowed:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
            and not node.args[1].value.startswith("__")
            and node.args[1].value not in own_private
            and not (
                isinstance(node.args[0], ast.Name)
                and (node.args[0].id in OWN_OBJECT_NAMES or node.args[0].id in own)
            )
        ):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_private_attribute_scanner_flags_what_it_should():
    source = (
        "import keras\n"
        "from tf_smdist import _compat\n"
        "class A(Base):\n"
        "    def _hook(self, other):\n"
        "        _compat.move_variable(self._v, other._w)\n"
        "        return super()._hook()\n"
        "    def run(self, model, optimizer):\n"
        "        model._flatten_layers()\n"
        "        super()._hook()\n"
        "        getattr(self, '_mine', None), hasattr(model, '_nodes_by_depth')\n"
        "        return self.optimizer._var_key, keras.__version__\n"
    )
    assert [f.split(": ", 1)[1] for f in private_attribute_reads(source)] == [
        "model._flatten_layers",
        "super()._hook",
        "hasattr(model, '_nodes_by_depth')",
        "self.optimizer._var_key",
    ]


def test_private_tensorflow_and_keras_attributes_only_in_compat():
    offenders = []
    own_private = _own_private_names()
    assert "_var_key" not in own_private and "_initialize" not in own_private
    for path in _python_files():
        rel = os.path.relpath(path, ROOT)
        if not rel.startswith("tf_smdist" + os.sep) or rel in PRIVATE_API_MODULES:
            continue
        with open(path) as f:
            offenders += private_attribute_reads(f.read(), rel, own_private)
    assert offenders == [], (
        "Read TensorFlow's and Keras' private attributes only through a "
        "function of tf_smdist/_compat.py (with a comment saying why no public "
        "API serves), or in tf_smdist/pipeline/graph.py for the Keras graph. "
        "For a private attribute of our own objects, read it through `self`, "
        "or make it public. Offenders:\n" + "\n".join(offenders)
    )
