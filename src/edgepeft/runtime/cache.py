"""A least-recently-used cache of serving models with a RAM budget.

Installed versions live on disk (``STATE/assets/<id>/<version>/``); the cache holds the ones recently used in
memory. When the total of the entries' :attr:`~edgepeft.runtime.resident.ServingModel.private_bytes` exceeds the
budget the least recently used entries are dropped (their files stay, so "eviction to disk" costs nothing) and
reloaded on the next request that needs them. A request already holding an evicted model keeps it alive
until it finishes: eviction only forgets the reference.

Concurrent misses on the same key load once: the first caller loads under a per-key lock, the others wait for
it, and loading never holds the cache-wide lock, so hits on other keys are not blocked by a slow load.

Example:
    >>> cache = AdapterCache(budget_bytes=100)
    >>> class Entry:
    ...     private_bytes = 60
    >>> first = cache.get(("a", "1"), Entry)
    >>> second = cache.get(("b", "1"), Entry)   # over budget: ("a", "1") is evicted
    >>> cache.keys(), cache.stats()["evictions"]
    ([('b', '1')], 1)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

Key = tuple[str, str]  # (asset_id, version)


class Sized(Protocol):
    private_bytes: int


class AdapterCache:
    """LRU cache of loaded versions keyed by ``(asset_id, version)``, bounded by ``budget_bytes``.

    The most recently used entry is always kept, even alone over budget: a version too big for the budget
    must still be servable.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[Key, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[Key, threading.Lock] = {}
        self.hits = 0
        self.loads = 0
        self.evictions = 0

    def peek(self, key: Key) -> Any | None:
        """The cached entry or None, marking it recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return entry

    def get(self, key: Key, load: Callable[[], Sized]) -> Any:
        """The entry for ``key``, calling ``load()`` once on a miss (concurrent misses share that load)."""
        entry = self.peek(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        try:
            with key_lock:
                entry = self.peek(key)  # another thread may have loaded it while we waited
                if entry is not None:
                    return entry
                entry = load()
                self.put(key, entry)
                return entry
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def put(self, key: Key, entry: Sized) -> None:
        """Insert or replace ``key`` as most recently used, then evict down to the budget."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.private_bytes
            else:
                self.loads += 1
            self._entries[key] = entry
            self._bytes += entry.private_bytes
            while self._bytes > self.budget_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.private_bytes
                self.evictions += 1

    def discard(self, key: Key) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.private_bytes

    def snapshot(self) -> dict[Key, Any]:
        """The loaded entries, without touching their recency (for listings)."""
        with self._lock:
            return dict(self._entries)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "loads": self.loads,
                "evictions": self.evictions,
            }
