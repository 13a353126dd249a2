"""StatsMonitor: process-wide counters for hit rate and load / save speed, with Prometheus text exposition.

Speeds are bytes over busy wall time: the time during which at least one transfer of that kind was in flight,
so concurrent transfers are not double-counted and idle gaps do not dilute the figure.
"""
import threading
import time
from contextlib import contextmanager

TRANSFER_KINDS = ("load", "save")


class _BusyClock:
    """Wall time during which at least one transfer is active."""

    def __init__(self):
        self.active = 0
        self.since = 0.0
        self.total = 0.0

    def start(self, now: float) -> None:
        if self.active == 0:
            self.since = now
        self.active += 1

    def stop(self, now: float) -> None:
        self.active -= 1
        if self.active == 0:
            self.total += now - self.since

    def seconds(self, now: float) -> float:
        return self.total + (now - self.since if self.active else 0.0)


class StatsMonitor:
    """Thread-safe counters of lookups, hits and transfers (``get_instance()`` for the process's monitor)."""

    _instance: "StatsMonitor | None" = None
    _instance_lock = threading.Lock()

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    @classmethod
    def get_instance(cls) -> "StatsMonitor":
        """The process-wide monitor that the store and the connector feed."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._counts = {"lookups": 0, "hits": 0}
            for kind in TRANSFER_KINDS:
                self._counts.update({f"{kind}s": 0, f"{kind}_blocks": 0, f"{kind}_bytes": 0, f"{kind}_failures": 0})
            self._tier_hits: dict[str, int] = {}
            self._clocks = {kind: _BusyClock() for kind in TRANSFER_KINDS}

    def record_lookup(self, queried: int, hits: int, tier_hits: dict[str, int] | None = None) -> None:
        """Count ``queried`` block lookups of which ``hits`` hit; ``tier_hits`` splits the hits by tier."""
        if not 0 <= hits <= queried:
            raise ValueError(f"hits={hits}, queried={queried}: need 0 <= hits <= queried")
        with self._lock:
            self._counts["lookups"] += queried
            self._counts["hits"] += hits
            for tier, n in (tier_hits or {}).items():
                self._tier_hits[tier] = self._tier_hits.get(tier, 0) + n

    @contextmanager
    def transfer(self, kind: str):
        """Time one transfer; the body fills ``result["bytes"]``, ``result["blocks"]``, and ``result["ok"] = False``
        on failure (an exception out of the body counts as a failure too)."""
        if kind not in TRANSFER_KINDS:
            raise ValueError(f"kind={kind!r}: allowed {', '.join(TRANSFER_KINDS)}")
        result = {"bytes": 0, "blocks": 0, "ok": True}
        with self._lock:
            self._clocks[kind].start(time.perf_counter())
        try:
            yield result
        except BaseException:
            result["ok"] = False
            raise
        finally:
            self._finish(kind, result)

    def _finish(self, kind: str, result: dict) -> None:
        with self._lock:
            self._clocks[kind].stop(time.perf_counter())
            self._counts[f"{kind}s"] += 1
            if result["ok"]:
                self._counts[f"{kind}_bytes"] += result["bytes"]
                self._counts[f"{kind}_blocks"] += result["blocks"]
            else:
                self._counts[f"{kind}_failures"] += 1

    def get_stats(self) -> dict:
        """``hit_rate`` (0..1), ``load_speed`` and ``save_speed`` (bytes/s of busy time) and the raw counters."""
        now = time.perf_counter()
        with self._lock:
            stats = dict(self._counts)
            stats["hit_rate"] = stats["hits"] / stats["lookups"] if stats["lookups"] else 0.0
            for kind in TRANSFER_KINDS:
                busy = self._clocks[kind].seconds(now)
                stats[f"{kind}_seconds"] = busy
                stats[f"{kind}_speed"] = stats[f"{kind}_bytes"] / busy if busy > 0 else 0.0
            stats["tier_hits"] = dict(self._tier_hits)
        return stats

    def prometheus_text(self, prefix: str = "ucm") -> str:
        """The counters in Prometheus text exposition format (version 0.0.4)."""
        stats = self.get_stats()
        lines = []
        for name, kind, doc in _METRICS:
            metric = f"{prefix}_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {metric} {doc}", f"# TYPE {metric} {kind}", f"{metric} {float(stats[name])!r}"]
        metric = f"{prefix}_tier_hits_total"
        lines += [f"# HELP {metric} Block lookup hits by tier", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{tier="{tier}"}} {float(n)!r}' for tier, n in sorted(stats["tier_hits"].items())]
        return "\n".join(lines) + "\n"


_METRICS = (
    ("hit_rate", "gauge", "Fraction of looked-up blocks found in the store"),
    ("load_speed", "gauge", "Bytes per second of load busy time"),
    ("save_speed", "gauge", "Bytes per second of save busy time"),
    ("lookups", "counter", "Blocks looked up"),
    ("hits", "counter", "Blocks found"),
    ("loads", "counter", "Load transfers finished"),
    ("load_blocks", "counter", "Blocks loaded"),
    ("load_bytes", "counter", "Bytes loaded"),
    ("load_failures", "counter", "Load transfers that failed"),
    ("saves", "counter", "Save transfers finished"),
    ("save_blocks", "counter", "Blocks saved"),
    ("save_bytes", "counter", "Bytes saved"),
    ("save_failures", "counter", "Save transfers that failed"),
)
