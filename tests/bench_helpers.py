"""Helpers shared by the bench tests: a timing-free contender and the ratio keys of a report."""

from __future__ import annotations

from typing import Any


def ratio_items(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (dotted key, value) whose key ends in 'ratio', anywhere in a JSON tree."""
    found: list[tuple[str, Any]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            dotted = f"{path}.{key}" if path else str(key)
            if str(key).endswith("ratio"):
                found.append((dotted, value))
            found += ratio_items(value, dotted)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += ratio_items(value, f"{path}[{i}]")
    return found


class FixedContender:
    """A contender that reports a fixed number of images per round (timing-independent checks)."""

    def __init__(self, per_round: int) -> None:
        self.per_round = per_round
        self.calls: list[int] = []

    def run(self, n_rounds: int) -> int:
        self.calls.append(n_rounds)
        return n_rounds * self.per_round

    def close(self) -> None:
        pass
