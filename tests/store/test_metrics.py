"""StatsMonitor: hit rate and speed arithmetic, busy-time union, thread safety, Prometheus text."""
import threading
import time

import pytest
import torch

from ucm_store.metrics import StatsMonitor


def test_hit_rate_and_counters():
    mon = StatsMonitor()
    assert mon.get_stats()["hit_rate"] == 0.0
    mon.record_lookup(1000, 0)
    mon.record_lookup(1000, 100, tier_hits={"Cache": 60, "Posix": 40})
    stats = mon.get_stats()
    assert stats["hit_rate"] == pytest.approx(0.05)
    assert stats["tier_hits"] == {"Cache": 60, "Posix": 40}
    with pytest.raises(ValueError, match="hits=5, queried=4"):
        mon.record_lookup(4, 5)


def test_speed_is_bytes_over_busy_time_without_double_counting_overlap():
    mon = StatsMonitor()

    def load(nbytes, seconds):
        with mon.transfer("load") as result:
            time.sleep(seconds)
            result["bytes"], result["blocks"] = nbytes, 1

    threads = [threading.Thread(target=load, args=(100_000_000, 0.2)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.2)
    stats = mon.get_stats()
    assert stats["load_bytes"] == 200_000_000 and stats["loads"] == 2 and stats["load_blocks"] == 2
    assert 0.2 <= stats["load_seconds"] < 0.35
    assert stats["load_speed"] == pytest.approx(200_000_000 / stats["load_seconds"])
    assert stats["save_speed"] == 0.0


def test_failed_transfer_counts_failure_not_bytes():
    mon = StatsMonitor()
    with pytest.raises(OSError):
        with mon.transfer("save") as result:
            result["bytes"] = 10
            raise OSError("disk full")
    with mon.transfer("save") as result:
        result["bytes"], result["ok"] = 10, False
    stats = mon.get_stats()
    assert (stats["save_failures"], stats["save_bytes"], stats["saves"]) == (2, 0, 2)
    with pytest.raises(ValueError, match="kind='copy'"):
        with mon.transfer("copy"):
            pass


def test_concurrent_updates_are_exact():
    mon = StatsMonitor()

    def work():
        for _ in range(2000):
            mon.record_lookup(3, 1)
            with mon.transfer("save") as result:
                result["bytes"] = 7

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = mon.get_stats()
    assert (stats["lookups"], stats["hits"], stats["save_bytes"], stats["saves"]) == (24000, 8000, 56000, 8000)
    mon.reset()
    assert mon.get_stats()["lookups"] == 0


def test_prometheus_text():
    mon = StatsMonitor()
    mon.record_lookup(4, 3, tier_hits={"Cache": 3})
    text = mon.prometheus_text()
    assert "# TYPE ucm_hit_rate gauge\nucm_hit_rate 0.75\n" in text
    assert "ucm_lookups_total 4.0" in text and 'ucm_tier_hits_total{tier="Cache"} 3.0' in text
    assert StatsMonitor.get_instance() is StatsMonitor.get_instance()


# ---- tier occupancy, pool usage, health warnings, the endpoint ------------------------------------------------
import logging  # noqa: E402
import urllib.request  # noqa: E402

from ucm_store.factory import UcmConnectorFactory  # noqa: E402
from ucm_store.metrics import (MIN_LOAD_BYTES, MIN_LOOKUPS, format_stats, parse_prometheus_text,  # noqa: E402
                               read_metrics, start_metrics_server)


def busy_load(mon: StatsMonitor, nbytes: int, seconds: float) -> None:
    with mon.transfer("load") as result:
        time.sleep(seconds)
        result["bytes"], result["blocks"] = nbytes, 1


def fill_store(store, count: int, nbytes: int = 8192) -> None:
    ids = [f"blk{i}".encode() for i in range(count)]
    data = torch.randint(0, 256, (count, nbytes), dtype=torch.uint8)
    assert store.wait(store.dump(ids, 0, data)) == 0
    store.commit(ids, [True] * count)
    store.flush()


def test_watched_store_reports_tier_occupancy_and_pool_usage(tmp_path):
    mon = StatsMonitor()
    config = {"store_pipeline": "Cache|Posix", "storage_backends": str(tmp_path), "cache_capacity": 64,
              "storage_capacity": 1 << 20}
    with UcmConnectorFactory.create_connector(config, 0) as store:
        mon.watch_store(store)
        fill_store(store, 10)
        occupancy = mon.tier_occupancy()
        assert occupancy["Cache"] == {"used": 10, "capacity": 64, "unit": "blocks"}
        assert occupancy["Posix"]["unit"] == "bytes" and occupancy["Posix"]["capacity"] == 1 << 20
        assert 10 * 8192 <= occupancy["Posix"]["used"] <= 10 * (8192 + 8192)  # header and padding per block
        pool = store.pool.get_stats()
        samples = parse_prometheus_text(mon.prometheus_text())
        assert samples["ucm_tier_used"][(("tier", "Cache"), ("unit", "blocks"))] == 10.0
        assert samples["ucm_tier_capacity"][(("tier", "Cache"), ("unit", "blocks"))] == 64.0
        assert samples["ucm_tier_occupancy"][(("tier", "Cache"),)] == pytest.approx(10 / 64)
        assert samples["ucm_pool_used_bytes"][()] == float(pool["currently_used"])
        assert samples["ucm_pool_usage"][()] == pytest.approx(pool["currently_used"] / pool["total_allocated"])
        mon.unwatch_store(store)
    assert mon.tier_occupancy() == {} and mon.pool_usage() is None
    assert "ucm_tier_occupancy" in mon.prometheus_text() and "ucm_pool_usage" not in mon.prometheus_text()


def test_check_health_warns_below_the_seed_thresholds_rate_limited(caplog):
    mon = StatsMonitor(warn_interval=60.0)
    mon.record_lookup(MIN_LOOKUPS, MIN_LOOKUPS // 4)
    busy_load(mon, MIN_LOAD_BYTES, 0.2)  # 64 MiB in 0.2 s: 0.34 GB/s
    with caplog.at_level(logging.WARNING, logger="ucm_store.metrics"):
        first = mon.check_health()
        second = mon.check_health()
    assert len(first) == 2 and second == first
    assert "hit rate 25.0% is below 50%" in first[0] and "命中率低于 50%" in first[0]
    assert "GB/s is below 1 GB/s" in first[1] and "加载速度低于 1 GB/s" in first[1]
    assert [r.getMessage() for r in caplog.records] == first  # logged once, not again within warn_interval
    mon.warn_interval = 0.0
    with caplog.at_level(logging.WARNING, logger="ucm_store.metrics"):
        mon.check_health()
    assert len(caplog.records) == 4


def test_check_health_is_quiet_when_healthy_or_too_early(caplog):
    mon = StatsMonitor(warn_interval=0.0)
    with caplog.at_level(logging.WARNING, logger="ucm_store.metrics"):
        mon.record_lookup(MIN_LOOKUPS - 1, 0)  # too few lookups to judge
        busy_load(mon, MIN_LOAD_BYTES - 1, 0.2)  # too few bytes to judge
        assert mon.check_health() == []
        mon.reset()
        mon.record_lookup(1000, 900)
        busy_load(mon, 1 << 30, 0.05)  # 1 GiB in ~0.05 s: above 1 GB/s
        assert mon.check_health() == []
    assert caplog.records == []


@pytest.mark.parametrize("backend", ["prometheus_client", "http.server"])
def test_metrics_server_serves_what_ucm_stats_reads(backend, monkeypatch, tmp_path, caplog):
    if backend == "http.server":
        monkeypatch.setitem(__import__("sys").modules, "prometheus_client", None)  # import fails: fallback
    mon = StatsMonitor(warn_interval=60.0)
    mon.record_lookup(200, 20, tier_hits={"Cache": 15, "Posix": 5})
    busy_load(mon, MIN_LOAD_BYTES, 0.2)
    config = {"store_pipeline": "Cache", "cache_capacity": 32}
    with UcmConnectorFactory.create_connector(config, 0) as store:
        fill_store(store, 4)
        server = start_metrics_server(0, monitor=mon, stores=[store], health_interval=None)
        assert server.backend == backend
        try:
            with caplog.at_level(logging.WARNING, logger="ucm_store.metrics"):
                samples = read_metrics(server.url)
            raw = urllib.request.urlopen(server.url).read().decode()
            assert samples == parse_prometheus_text(mon.prometheus_text())
        finally:
            server.close()
    assert samples["ucm_hit_rate"][()] == pytest.approx(0.1) and samples["ucm_lookups_total"][()] == 200.0
    assert samples["ucm_tier_hits_total"][(("tier", "Posix"),)] == 5.0
    assert samples["ucm_tier_used"][(("tier", "Cache"), ("unit", "blocks"))] == 4.0
    assert "# TYPE ucm_hit_rate gauge" in raw and "# TYPE ucm_lookups_total counter" in raw
    assert len(caplog.records) == 2  # the scrape checked health: both warnings logged once
    table = format_stats(samples)
    assert "hit rate          10.0 %    20 of 200 blocks looked up; hits by tier: Cache 15, Posix 5" in table
    assert "Cache" in table and "4 blocks" in table and "12.5 %" in table and "pinned pool" in table
    assert "WARNING: hit rate 10.0% is below 50%" in table and "WARNING: load speed" in table


def test_parse_prometheus_text_rejects_garbage_and_handles_escapes():
    samples = parse_prometheus_text('# HELP x y\nm{a="q\\"uote",b="1"} 2.5 1700000000\nn 3\n')
    assert samples == {"m": {(("a", 'q"uote'), ("b", "1")): 2.5}, "n": {(): 3.0}}
    with pytest.raises(ValueError, match="not a Prometheus sample line"):
        parse_prometheus_text("this is html\n")


def test_metrics_server_checks_health_on_a_timer(caplog):
    mon = StatsMonitor(warn_interval=60.0)
    mon.record_lookup(MIN_LOOKUPS, 0)
    with caplog.at_level(logging.WARNING, logger="ucm_store.metrics"):
        server = start_metrics_server(0, monitor=mon, health_interval=0.02)
        try:
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # several more checks: still one record (rate-limited)
        finally:
            server.close()
    assert [r.getMessage()[:30] for r in caplog.records] == ["hit rate 0.0% is below 50% (命中"]



# ---- what a store's lookups count: blocks, never requests ----------------------------------------------------
from ucm_store.backends.cache import CacheTier  # noqa: E402
from ucm_store.pipeline import UcmPipelineStore  # noqa: E402
from ucm_store.pool import PinnedMemoryPool  # noqa: E402


def cache_store(mon: StatsMonitor) -> UcmPipelineStore:
    pool = PinnedMemoryPool(1 << 20, 1 << 20)
    return UcmPipelineStore([CacheTier(32, pool)], pool, monitor=mon)


def counted(mon: StatsMonitor) -> tuple[int, int]:
    stats = mon.get_stats()
    return stats["lookups"], stats["hits"]


@pytest.mark.parametrize("n", [1, 7])
def test_prefix_lookup_counts_every_queried_block_cold_and_warm(n):
    mon = StatsMonitor()
    ids = [f"blk{i}".encode() for i in range(n)]
    with cache_store(mon) as store:
        assert store.lookup_on_prefix(ids) == -1
        assert counted(mon) == (n, 0)  # cold: n blocks looked up, none found (not 1 per call)
        fill_store(store, n)
        mon.reset()
        assert store.lookup_on_prefix(ids) == n - 1
        assert counted(mon) == (n, n)
        assert mon.get_stats()["hit_rate"] == 1.0


def test_partial_prefix_hit_counts_the_blocks_after_the_first_miss_as_misses():
    mon = StatsMonitor()
    ids = [f"blk{i}".encode() for i in range(6)] + [b"gap"] + [f"blk{i}".encode() for i in range(6, 9)]
    with cache_store(mon) as store:
        fill_store(store, 9)  # blk0..blk8 stored, "gap" is not
        assert store.lookup_on_prefix(ids) == 5
        assert counted(mon) == (10, 6)  # blk6..blk8 are stored but unusable past the miss
        assert store.lookup_prefix_tiers(ids) == ["Cache"] * 6
        assert counted(mon) == (20, 12) and mon.get_stats()["tier_hits"] == {"Cache": 12}
        assert mon.get_stats()["hit_rate"] == pytest.approx(0.6)


def test_plain_lookup_counts_each_block_and_each_hit():
    mon = StatsMonitor()
    with cache_store(mon) as store:
        fill_store(store, 3)
        assert store.lookup([b"blk0", b"nope", b"blk2", b"blk0"]) == [True, False, True, True]
        assert counted(mon) == (4, 3)
        assert store.lookup([b"nope"]) == [False]
        assert counted(mon) == (5, 3)
