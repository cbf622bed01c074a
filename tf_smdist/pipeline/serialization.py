"""JSON text and files for value objects that define `to_dict` / `from_dict`."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

__all__ = ["JsonSerializable", "check_format_version"]

T = TypeVar("T", bound="JsonSerializable")


def check_format_version(
    data: dict[str, Any], supported: int, *, what: str, remedy: str
) -> None:
    """Raises ValueError unless `data["format_version"]` is `supported`.

    Args:
        data: the dict form being read.
        supported: the format version this code reads.
        what: the kind of object, for the message (e.g. "profile").
        remedy: what to do instead (e.g. "Profile the model again.").

    Example:

    >>> check_format_version({"format_version": 1}, 1, what="profile", remedy="")
    """
    version = data.get("format_version")
    if version != supported:
        raise ValueError(
            f"Unsupported {what} format version {version!r}; this version "
            f"of tf_smdist reads version {supported}. "
            f"Received: format_version={version!r}. {remedy}"
        )


class JsonSerializable:
    """Adds `to_json`, `from_json`, `save` and `load` on top of the dict form.

    Subclasses define `to_dict()` (JSON-compatible values) and the class
    method `from_dict(data)`.

    Example:

    >>> profile.save("profile.json")
    >>> smd.Profile.load("profile.json") == profile
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
