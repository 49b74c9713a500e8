"""The few explicit registries of the toolkit, consulted at the recipe boundary only.

Registration checks itself: a duplicate or badly formed name is an error, and an unknown
name is answered with the known ones and a "did you mean".
"""

from __future__ import annotations

import difflib
import re
from typing import Any

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Registry:
    """name -> object, with checked registration and helpful look-up errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> Any:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}"
                + did_you_mean(name, self._items)
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
