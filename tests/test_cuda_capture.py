"""What the project's CUDA graphs share (``models.cuda_capture``): the buckets, the cache of captured graphs and the
count of sightings that decides when a shape is worth a capture."""
from __future__ import annotations

import pytest

from models.cuda_capture import GraphCache, Sightings, round_up, row_bucket


def test_buckets():
    assert [row_bucket(n) for n in (1, 3, 5, 16, 17, 512, 513, 700)] == [1, 4, 8, 16, 24, 512, 640, 768]
    assert [round_up(n, 16) for n in (1, 16, 17)] == [16, 16, 32]


def test_the_cache_keeps_the_most_recently_used_graphs_in_one_pool():
    pools = []
    cache: GraphCache[str, tuple] = GraphCache(2, new_pool=lambda: pools.append(object()) or pools[-1])
    made = []

    def make(name):
        def capture(pool):
            made.append(name)
            return name, pool
        return capture

    a = cache.get("a", make("a"))
    assert cache.get("a", make("never")) is a  # kept: not made again
    cache.get("b", make("b"))
    cache.get("a", make("never"))  # "a" is now the most recently used
    cache.get("c", make("c"))  # drops "b"
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert [k for k, _ in cache.items()] == ["a", "c"]
    cache.get("b", make("b"))  # a dropped key met again is captured again
    assert made == ["a", "b", "c", "b"] and cache.captures == 4
    assert len(pools) == 1 and all(g[1] is pools[0] for _, g in cache.items())


def test_a_capture_that_raises_keeps_nothing():
    cache: GraphCache[str, str] = GraphCache(4, new_pool=lambda: None)

    def refuse(pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError):
        cache.get("a", refuse)
    assert "a" not in cache and cache.captures == 0
    assert cache.get("a", lambda pool: "graph") == "graph"
    with pytest.raises(ValueError):
        GraphCache(0)


def test_sightings_count_each_shape_and_forget_the_oldest():
    seen = Sightings(kept=2)
    assert [seen.see("a"), seen.see("a"), seen.see("b"), seen.see("a")] == [1, 2, 1, 3]
    seen.see("c")  # three shapes: "b", the least recently met, is forgotten
    assert seen.see("b") == 1 and seen.see("c") == 2
    assert seen.count("c") == 2 and seen.count("a") == 0 and seen.items() == [("b", 1), ("c", 2)]
