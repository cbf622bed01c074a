"""Module-level lazy exports: names imported from their modules on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str,
    namespace: dict[str, Any],
    exports: Mapping[str, str],
    subpackages: Sequence[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Returns a package's `__getattr__` and `__dir__` for lazy exports.

    Args:
        package: the package's `__name__`.
        namespace: the package's `globals()`; a resolved name is cached there.
        exports: public name -> the module that defines it.
        subpackages: submodules reachable as attributes (`pkg.sub`).
            Defaults to `()`.

    Example:
    >>> __getattr__, __dir__ = lazy_exports(
    ...     "pkg", {}, {"sqrt": "math"})
    >>> __getattr__("sqrt")(4.0)
    2.0
    """

    def getattr_(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in subpackages:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(subpackages))

    return getattr_, dir_
