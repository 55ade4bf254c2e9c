"""Deterministic sharding of an evaluation across machines: ``--shard i/n``.

Every test image belongs to exactly one shard: a stable hash (SHA-256, not Python's salted ``hash``) of
``(class name, path relative to the data set root)`` modulo ``n``. The split does not depend on the order
files are listed in, on the machine, or on which other images exist, so ``n`` runs with ``--shard 0/n`` …
``--shard n-1/n`` cover the data set exactly once and ``eagle eval-merge`` can put them back together.

Example:
    >>> shard = Shard.parse("1/4")
    >>> shard.index, shard.count
    (1, 4)
    >>> sum(Shard(i, 4).contains("bottle", "test/good/000.png") for i in range(4))
    1
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


class ShardError(ValueError):
    """A ``--shard`` value is malformed or out of range."""


def stable_hash(class_name: str, rel_path: str) -> int:
    """A 64-bit hash of ``(class_name, rel_path)`` that is the same on every machine and Python run.

    Example:
        >>> stable_hash("bottle", "test/good/000.png") == stable_hash("bottle", "test/good/000.png")
        True
    """
    digest = hashlib.sha256(f"{class_name}\0{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based: ``0 <= index < count``); ``Shard(0, 1)`` is the whole run."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"shard count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(f"shard index must be 0..{self.count - 1} for {self.count} shards, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``"i/n"`` (0-based index ``i`` of ``n`` shards).

        Raises:
            ShardError: not of the form ``i/n`` or out of range.
        """
        parts = text.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ShardError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    def contains(self, class_name: str, rel_path: str) -> bool:
        """Whether the image ``rel_path`` of ``class_name`` belongs to this shard."""
        return stable_hash(class_name, rel_path) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
