"""LoraCache (serving/lora_cache.py) on its own: one load per key under concurrency, LRU order, no eviction of a
LoRA in use, failed loads not cached. The real vLLM side is tests/test_vllm_engine.py."""

import asyncio

import pytest

from adaptermix.serving.lora_cache import LoraCache


class Server:
    """Stands in for vLLM's registry: what is loaded, and every call in order."""

    def __init__(self, fail: set[str] = frozenset()):
        self.loaded, self.calls, self.fail = set(), [], set(fail)

    async def load(self, key):
        await asyncio.sleep(0.01)
        if key in self.fail:
            raise RuntimeError(f"cannot load {key}")
        self.calls.append(("load", key))
        self.loaded.add(key)
        return key

    async def unload(self, name):
        self.calls.append(("unload", name))
        self.loaded.remove(name)


def use(cache, server, key, hold=0.0):
    async def run():
        async with cache.use(key, server.load) as name:
            await asyncio.sleep(hold)
            return name
    return run()


def test_concurrent_requests_share_one_load():
    server = Server()
    cache = LoraCache(2, server.unload)

    async def main():
        return await asyncio.gather(*[use(cache, server, "a", 0.01) for _ in range(5)])

    assert asyncio.run(main()) == ["a"] * 5
    assert server.calls == [("load", "a")] and (cache.loads, cache.hits) == (1, 4)


def test_least_recently_used_idle_lora_is_unloaded():
    server = Server()
    cache = LoraCache(2, server.unload)

    async def main():
        for key in ["a", "b", "a", "c"]:          # "b" is the least recently used when "c" arrives
            await use(cache, server, key)

    asyncio.run(main())
    assert server.loaded == {"a", "c"} == set(cache.names()) and cache.evictions == 1
    assert cache.keys() == ["a", "c"]


def test_a_lora_in_use_is_never_unloaded_under_its_request():
    server = Server()
    cache = LoraCache(1, server.unload)

    async def main():
        long = asyncio.ensure_future(use(cache, server, "a", 0.2))
        await asyncio.sleep(0.05)
        await use(cache, server, "b")            # over capacity, but "a" is busy: nothing to evict yet
        assert "a" in server.loaded
        await long
        await use(cache, server, "c")            # now both idle: back to capacity
        return cache.keys()

    assert asyncio.run(main()) == ["c"] and server.loaded == {"c"}


def test_failed_load_is_not_cached_and_every_waiter_sees_it():
    server = Server(fail={"bad"})
    cache = LoraCache(2, server.unload)

    async def main():
        return await asyncio.gather(*[use(cache, server, "bad") for _ in range(3)], return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "cannot load bad" in str(r) for r in results)
    assert len(cache) == 0 and cache.loads == 1


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        LoraCache(0, Server().unload)
