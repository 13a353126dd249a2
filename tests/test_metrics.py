"""StatsMonitor: hit rate and speed arithmetic, busy-time union, thread safety, Prometheus text."""
import threading
import time

import pytest

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
