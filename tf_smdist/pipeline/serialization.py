"""JSON text and files for value objects that define `to_dict` / `from_dict`."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

__all__ = ["JsonSerializable"]

T = TypeVar("T", bound="JsonSerializable")


class JsonSerializable:
    """Adds `to_json`, `from_json`, `save` and `load` on top of the dict form.

    Subclasses define `to_dict()` (JSON-compatible values) and the class
    method `from_dict(data)`.

    Example:

    >>> profile.save("/tmp/profile.json")
    >>> smd.Profile.load("/tmp/profile.json") == profile
    True
    """

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        raise NotImplementedError

    def to_json(self) -> str:
        """This object as indented JSON text (see `from_json`).

        Example:

        >>> smd.Partition.from_json(part.to_json()) == part
        True
        """
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        """Parses an object from `to_json()` text.

        Args:
            text: JSON text.
        """
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Writes this object to a JSON file.

        Args:
            path: File to write.
        """
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.to_json())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        """Reads an object written by `save`.

        Args:
            path: JSON file to read.
        """
        with open(path, encoding="utf-8") as file:
            return cls.from_json(file.read())
