"""Which LoRAs a vLLM server holds for us: a least-recently-used set with a capacity, reference counts (a LoRA
that a running request uses is never unloaded under it) and one load per key however many requests ask at
once.

    cache = LoraCache(capacity=4, unload=server.unload_lora)
    async with cache.use(key, load) as lora_name:   # load(key) -> name, awaited once per key while cached
        ...                                          # stream a completion with model=lora_name
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass

__all__ = ["LoraCache"]


@dataclass
class _Entry:
    loading: asyncio.Future        # -> the LoRA's name in vLLM
    users: int = 0


class LoraCache:
    """Args:
        capacity: LoRAs kept loaded; beyond it the least recently used idle ones are unloaded (when all are
            in use the cache runs over capacity until requests finish: vLLM keeps its own LRU below).
        unload: async (name) -> None, called for each evicted LoRA; its failures are counted, not raised.
    """

    def __init__(self, capacity: int, unload: Callable[[str], Awaitable[None]]):
        if capacity < 1:
            raise ValueError(f"LoraCache needs capacity >= 1, got {capacity}")
        self.capacity, self._unload = capacity, unload
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._unloading: dict[Hashable, asyncio.Future] = {}     # a key loads again only once its unload is done
        self.loads = self.evictions = self.hits = self.unload_failures = 0

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """Least to most recently used."""
        return list(self._entries)

    def names(self) -> list[str]:
        """The loaded LoRAs' names (in the server), least to most recently used."""
        return [e.loading.result() for e in self._entries.values() if e.loading.done() and not e.loading.exception()]

    @asynccontextmanager
    async def use(self, key: Hashable, load: Callable[[Hashable], Awaitable[str]]):
        entry = self._entries.get(key)
        loader = entry is None
        if loader:
            entry = self._entries[key] = _Entry(asyncio.get_running_loop().create_future())
            self.loads += 1
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        entry.users += 1
        try:
            if loader:
                name = await self._load(key, entry, load)
                await self._evict()
            else:
                name = await asyncio.shield(entry.loading)
            yield name
        finally:
            entry.users -= 1

    async def _load(self, key, entry: _Entry, load) -> str:
        try:
            if key in self._unloading:
                await asyncio.shield(self._unloading[key])
            name = await load(key)
        except BaseException as error:
            entry.loading.set_exception(error if isinstance(error, Exception) else RuntimeError("load cancelled"))
            entry.loading.exception()            # marked retrieved: each waiter re-raises it itself
            if self._entries.get(key) is entry:
                del self._entries[key]
            raise
        entry.loading.set_result(name)
        return name

    async def _evict(self) -> None:
        while len(self._entries) > self.capacity:     # one at a time: other requests run while we await
            key = next((k for k, e in self._entries.items() if e.users == 0 and e.loading.done()), None)
            if key is None:
                return
            entry = self._entries.pop(key)
            self.evictions += 1
            done = self._unloading[key] = asyncio.get_running_loop().create_future()
            try:
                await self._unload(entry.loading.result())
            except Exception:
                self.unload_failures += 1
            finally:
                done.set_result(None)
                self._unloading.pop(key, None)

    def forget(self, key: Hashable) -> None:
        """Drop a key without unloading it (the server no longer has it); the next use loads it again."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything (the server went away: what it held is gone with it)."""
        self._entries.clear()
