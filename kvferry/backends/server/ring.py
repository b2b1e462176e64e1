"""Consistent hashing of block keys over store servers (client side, no I/O).

Each server owns ``virtual_nodes`` points on a 64-bit ring (xxh3-64 of "address#i"); a key goes
to the first point at or after its own position. Adding or removing one of N servers moves
about 1/N of the keys, and every client with the same member list agrees on every key.
:meth:`HashRing.owners` walks on from there to the next distinct servers: a key's replicas, in
an order every client agrees on, and when one of them leaves the ring the others keep their
place (the next server on the walk joins at the end).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import xxhash

from kvferry.backends.base import Key


class HashRing:
    """Maps keys to members.

    Raises:
        ValueError: no members, or ``virtual_nodes`` < 1.
    """

    def __init__(self, members: Iterable[str], virtual_nodes: int = 64) -> None:
        self.members = sorted(set(members))
        if not self.members:
            raise ValueError("a hash ring needs at least one member")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        points = sorted(
            (xxhash.xxh3_64_intdigest(f"{m}#{i}".encode()), m)
            for m in self.members
            for i in range(virtual_nodes)
        )
        self._points = [pt for pt, _ in points]
        self._owners = [m for _, m in points]

    def owner(self, key: Key) -> str:
        # Hashed again (about 0.1 us): block hashes are uniform, but keys from other sources
        # (tests, tools) need not be, and a skewed ring would pile them on one server.
        pos = xxhash.xxh3_64_intdigest(key)
        i = bisect.bisect_left(self._points, pos)
        return self._owners[i if i < len(self._owners) else 0]

    def owners(self, key: Key, n: int) -> list[str]:
        """The first ``n`` distinct members at or after ``key``'s position (fewer when the ring
        has fewer members): ``owners(key, 1) == [owner(key)]``."""
        n = min(n, len(self.members))
        if n == 1:
            return [self.owner(key)]
        pos = xxhash.xxh3_64_intdigest(key)
        i = bisect.bisect_left(self._points, pos)
        out: list[str] = []
        size = len(self._owners)
        for step in range(size):
            m = self._owners[(i + step) % size]
            if m not in out:
                out.append(m)
                if len(out) == n:
                    break
        return out

    def split(self, keys: Sequence[Key]) -> dict[str, list[int]]:
        """member -> indexes of ``keys`` it owns."""
        if len(self.members) == 1:
            return {self.members[0]: list(range(len(keys)))}
        out: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(self.owner(k), []).append(i)
        return out
