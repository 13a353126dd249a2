"""StatsMonitor: process-wide counters for hit rate and load / save speed, with Prometheus text exposition.

Speeds are bytes over busy wall time: the time during which at least one transfer of that kind was in flight,
so concurrent transfers are not double-counted and idle gaps do not dilute the figure.

Beside the counters, a monitor reports gauges read at exposition time from the stores it watches
(:meth:`StatsMonitor.watch_store`, until :meth:`~StatsMonitor.unwatch_store`): each tier's occupancy and the
pinned pool's usage. :meth:`StatsMonitor.check_health` logs the tuning guide's section 7.2 warnings (hit rate below 50%,
load speed below 1 GB/s), at most once per warning per ``warn_interval`` seconds.

Endpoint: :func:`start_metrics_server` serves ``/metrics`` (prometheus-client when installed, else a small
``http.server`` thread serving the same text) and checks health on a timer; ``ucm stats`` reads it back with
:func:`read_metrics` and prints :func:`format_stats`.
"""
import logging
import re
import threading
import time
import urllib.request
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ucm_store.process_wide import ProcessWide

logger = logging.getLogger(__name__)

TRANSFER_KINDS = ("load", "save")
DEFAULT_METRICS_PORT = 9477
MIN_HIT_RATE = 0.5  # the tuning guide's section 7.2 thresholds
MIN_LOAD_SPEED = 1e9
MIN_LOOKUPS = 100  # blocks looked up before the hit rate is judged (a cold start always misses)
MIN_LOAD_BYTES = 64 << 20  # bytes loaded before the load speed is judged (small loads are latency-bound)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


@dataclass(frozen=True)
class Family:
    """One metric family: ``name`` (without ``_total``), ``kind`` (gauge | counter), help text and samples,
    each ``(labels, value)`` with labels a tuple of (name, value) pairs."""

    name: str
    kind: str
    doc: str
    samples: tuple


class StatsMonitor(ProcessWide):
    """Thread-safe counters of lookups, hits and transfers (``get_instance()`` for the process's monitor).

    Lookups and hits are counted in blocks: every block id passed to one lookup call adds 1 to ``lookups``,
    every one of them found adds 1 to ``hits``, so ``hit_rate = hits / lookups`` is the fraction of looked-up
    blocks that were found. A prefix lookup (``lookup_on_prefix`` / ``lookup_prefix_tiers``) counts every block
    it was asked about and finds only the leading run of hits: the blocks after the first miss count as misses
    (they cannot be loaded as part of the prefix, even if stored). A cold prefix lookup of N blocks thus adds N
    lookups and 0 hits, a warm one N and N.

    Args:
        warn_interval: seconds between two log records of the same health warning.
    """

    def __init__(self, warn_interval: float = 60.0):
        self._lock = threading.Lock()
        self.warn_interval = warn_interval
        self._stores: "weakref.WeakSet" = weakref.WeakSet()
        self._last_warned: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._counts = {"lookups": 0, "hits": 0, "async_loads": 0, "writedown_failures": 0}
            for kind in TRANSFER_KINDS:
                self._counts.update({f"{kind}s": 0, f"{kind}_blocks": 0, f"{kind}_bytes": 0, f"{kind}_failures": 0})
            self._tier_hits: dict[str, int] = {}
            self._clocks = {kind: _BusyClock() for kind in TRANSFER_KINDS}

    def record_lookup(self, queried: int, hits: int, tier_hits: dict[str, int] | None = None) -> None:
        """Count one lookup call over ``queried`` blocks of which ``hits`` were found (both in blocks, never in
        requests or calls); ``tier_hits`` splits the hits by tier."""
        if not 0 <= hits <= queried:
            raise ValueError(f"hits={hits}, queried={queried}: need 0 <= hits <= queried")
        with self._lock:
            self._counts["lookups"] += queried
            self._counts["hits"] += hits
            for tier, n in (tier_hits or {}).items():
                self._tier_hits[tier] = self._tier_hits.get(tier, 0) + n

    def record_async_load(self) -> None:
        """Count one request whose KV blocks the vLLM connector loaded asynchronously (the request parked)."""
        with self._lock:
            self._counts["async_loads"] += 1

    def record_writedown_failure(self) -> None:
        """Count one committed block that failed to reach a lower tier (it stays in the Cache tier only, so a
        restart loses it: a full disk or a dead server)."""
        with self._lock:
            self._counts["writedown_failures"] += 1

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

    # ---- gauges of watched stores ----------------------------------------------------------------------------
    def watch_store(self, store) -> None:
        """Report ``store``'s tier occupancy and pinned-pool usage until :meth:`unwatch_store` (held weakly).

        ``store`` needs ``tiers`` and ``pool``. A tier reports ``used_bytes`` against ``capacity`` bytes (disk
        tiers) or ``len(tier)`` against ``capacity`` blocks (the Cache); other tiers are not reported."""
        with self._lock:
            self._stores.add(store)

    def unwatch_store(self, store) -> None:
        """Stop reporting ``store`` (when it closes)."""
        with self._lock:
            self._stores.discard(store)

    def tier_occupancy(self) -> dict[str, dict]:
        """Per tier name, summed over watched stores: ``used``, ``capacity`` (0: unbounded) and ``unit``."""
        out: dict[str, dict] = {}
        for store in self._watched():
            for tier in getattr(store, "tiers", ()):
                found = _occupancy(tier)
                if found is None:
                    continue
                used, capacity, unit = found
                entry = out.setdefault(tier.name, {"used": 0, "capacity": 0, "unit": unit})
                entry["used"] += used
                entry["capacity"] += capacity
        return out

    def pool_usage(self) -> dict | None:
        """``get_stats()`` of the watched stores' pinned pool (the process has one), or None."""
        pools = {id(s.pool): s.pool for s in self._watched() if getattr(s, "pool", None) is not None}
        return next(iter(pools.values())).get_stats() if pools else None

    def _watched(self) -> list:
        with self._lock:
            return list(self._stores)

    # ---- health (the tuning guide's section 7.2) ---------------------------------------------------------------------
    def check_health(self, min_hit_rate: float = MIN_HIT_RATE, min_load_speed: float = MIN_LOAD_SPEED) -> list[str]:
        """The tuning guide's section 7.2 warnings that hold now; each is logged at most once per ``warn_interval``.

        The hit rate is judged after ``MIN_LOOKUPS`` looked-up blocks and the load speed after
        ``MIN_LOAD_BYTES`` loaded, so a cold start does not warn."""
        warnings = health_warnings(self.get_stats(), min_hit_rate, min_load_speed)
        now = time.monotonic()
        for key, message in warnings.items():
            with self._lock:
                due = now - self._last_warned.get(key, -float("inf")) >= self.warn_interval
                if due:
                    self._last_warned[key] = now
            if due:
                logger.warning("%s", message)
        return list(warnings.values())

    # ---- exposition ------------------------------------------------------------------------------------------
    def families(self, prefix: str = "ucm") -> list[Family]:
        """Every metric: the counters and speeds, hits by tier, tier occupancy and pool usage."""
        stats = self.get_stats()
        out = [Family(f"{prefix}_{name}", kind, doc, (((), float(stats[name])),)) for name, kind, doc in _METRICS]
        out.append(Family(f"{prefix}_tier_hits", "counter", "Block lookup hits by tier",
                          tuple(((("tier", t),), float(n)) for t, n in sorted(stats["tier_hits"].items()))))
        out += _occupancy_families(prefix, self.tier_occupancy())
        out += _pool_families(prefix, self.pool_usage())
        return out

    def prometheus_text(self, prefix: str = "ucm") -> str:
        """The metrics in Prometheus text exposition format (version 0.0.4)."""
        lines = []
        for family in self.families(prefix):
            metric = family.name + ("_total" if family.kind == "counter" else "")
            lines += [f"# HELP {metric} {family.doc}", f"# TYPE {metric} {family.kind}"]
            lines += [f"{metric}{_label_text(labels)} {value!r}" for labels, value in family.samples]
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
    ("async_loads", "counter", "Requests whose KV the vLLM connector loaded asynchronously"),
    ("writedown_failures", "counter", "Committed blocks that failed to reach a lower tier (Cache copy only)"),
)


def health_warnings(stats: dict, min_hit_rate: float = MIN_HIT_RATE,
                    min_load_speed: float = MIN_LOAD_SPEED) -> dict[str, str]:
    """The tuning guide's section 7.2 warnings for ``stats`` (``get_stats()`` keys), keyed ``hit_rate`` /
    ``load_speed``, and ``writedown`` when committed blocks failed to reach the lower tiers."""
    out = {}
    if stats["lookups"] >= MIN_LOOKUPS and stats["hit_rate"] < min_hit_rate:
        out["hit_rate"] = (f"hit rate {stats['hit_rate'] * 100:.1f}% is below {min_hit_rate * 100:.0f}% "
                           f"(命中率低于 {min_hit_rate * 100:.0f}%): check the cache configuration "
                           "(cache_capacity, block_size, block hashing)")
    if stats["load_bytes"] >= MIN_LOAD_BYTES and stats["load_speed"] < min_load_speed:
        floor = f"{min_load_speed / 1e9:g} GB/s"
        out["load_speed"] = (f"load speed {stats['load_speed'] / 1e9:.2f} GB/s is below {floor} (加载速度低于 "
                             f"{floor}): check the storage configuration (store_pipeline, use_direct_io, io_workers)")
    if stats["writedown_failures"]:
        out["writedown"] = (f"{stats['writedown_failures']} committed blocks failed to reach the lower tiers and live "
                            "in the Cache tier only (a restart loses them): check free disk space and the remote "
                            "servers (the store log names each block and error)")
    return out


def _occupancy(tier) -> tuple[int, int, str] | None:
    capacity = getattr(tier, "capacity", None)
    if not isinstance(capacity, int):
        return None
    used_bytes = getattr(tier, "used_bytes", None)
    if used_bytes is not None:
        return (used_bytes() if callable(used_bytes) else used_bytes), capacity, "bytes"
    if hasattr(tier, "__len__"):
        return len(tier), capacity, "blocks"
    return None


def _occupancy_families(prefix: str, occupancy: dict[str, dict]) -> list[Family]:
    used = tuple(((("tier", t), ("unit", o["unit"])), float(o["used"])) for t, o in sorted(occupancy.items()))
    cap = tuple(((("tier", t), ("unit", o["unit"])), float(o["capacity"])) for t, o in sorted(occupancy.items()))
    frac = tuple(((("tier", t),), o["used"] / o["capacity"]) for t, o in sorted(occupancy.items()) if o["capacity"])
    return [Family(f"{prefix}_tier_used", "gauge", "Blocks (Cache) or bytes (disk tiers) held by each tier", used),
            Family(f"{prefix}_tier_capacity", "gauge", "Capacity of each tier in the same unit (0: unbounded)", cap),
            Family(f"{prefix}_tier_occupancy", "gauge", "Fraction of each bounded tier's capacity in use", frac)]


def _pool_families(prefix: str, pool: dict | None) -> list[Family]:
    if pool is None:
        return []
    gauges = (("used_bytes", "currently_used", "Pinned pool bytes handed out"),
              ("reserved_bytes", "total_allocated", "Pinned pool bytes reserved (arenas)"),
              ("peak_bytes", "peak_allocated", "Most pinned pool bytes handed out at once"),
              ("max_bytes", "max_pinned_size", "Pinned pool limit (max_pinned_size)"))
    out = [Family(f"{prefix}_pool_{name}", "gauge", doc, (((), float(pool[key])),)) for name, key, doc in gauges]
    usage = pool["currently_used"] / pool["total_allocated"] if pool["total_allocated"] else 0.0
    out.append(Family(f"{prefix}_pool_usage", "gauge", "Pinned pool bytes handed out / reserved", (((), usage),)))
    return out


def _label_text(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


# ---- the endpoint --------------------------------------------------------------------------------------------
class MetricsServer:
    """A running ``/metrics`` endpoint (from :func:`start_metrics_server`): ``url``, ``port``, ``backend``
    ("prometheus_client" or "http.server"); ``close()`` stops it."""

    def __init__(self, server, backend: str, monitor: StatsMonitor, health_interval: float | None):
        self._server = server
        self.backend = backend
        self.port = server.server_port
        self.url = f"http://{server.server_address[0]}:{self.port}/metrics"
        self._stop = threading.Event()
        threading.Thread(target=server.serve_forever, name="ucm-metrics", daemon=True).start()
        if health_interval:
            threading.Thread(target=self._check_loop, args=(monitor, health_interval), name="ucm-health",
                             daemon=True).start()

    def _check_loop(self, monitor: StatsMonitor, interval: float) -> None:
        while not self._stop.wait(interval):
            monitor.check_health()

    def close(self) -> None:
        """Stop serving and stop the health timer."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(port: int = DEFAULT_METRICS_PORT, addr: str = "127.0.0.1", *,
                         monitor: StatsMonitor | None = None, stores=(), health_interval: float | None = 60.0
                         ) -> MetricsServer:
    """Serve the monitor's metrics at ``http://addr:port/metrics`` from a daemon thread (port 0: any free one).

    Uses prometheus-client's WSGI app when installed, else ``http.server``; both serve :meth:`families`. Each
    store in ``stores`` is watched (tier occupancy, pool usage). Every ``health_interval`` seconds (None: never)
    and on every scrape the monitor's :meth:`~StatsMonitor.check_health` runs (its warnings are rate-limited)."""
    monitor = monitor or StatsMonitor.get_instance()
    for store in stores:
        monitor.watch_store(store)
    try:
        server, backend = _prometheus_client_server(addr, port, monitor), "prometheus_client"
    except ImportError:
        server, backend = _plain_server(addr, port, monitor), "http.server"
    return MetricsServer(server, backend, monitor, health_interval)


def _prometheus_client_server(addr: str, port: int, monitor: StatsMonitor):
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            monitor.check_health()
            for family in monitor.families():
                cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                label_names = [k for k, _ in family.samples[0][0]] if family.samples else []
                metric = cls(family.name, family.doc, labels=label_names)
                for labels, value in family.samples:
                    metric.add_metric([v for _, v in labels], value)
                yield metric

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return make_server(addr, port, make_wsgi_app(registry), handler_class=QuietHandler)


def _plain_server(addr: str, port: int, monitor: StatsMonitor):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            monitor.check_health()
            body = monitor.prometheus_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", PROMETHEUS_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((addr, port), Handler)


# ---- reading an endpoint back (``ucm stats``) ----------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus_text(text: str) -> dict[str, dict[tuple, float]]:
    """Samples of a Prometheus text exposition: metric name -> {sorted (label, value) pairs: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        pairs = tuple(sorted((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                             for k, v in _LABEL.findall(labels)))
        out.setdefault(name, {})[pairs] = float(value)
    return out


def read_metrics(url: str, timeout: float = 5.0) -> dict[str, dict[tuple, float]]:
    """Fetch ``url`` (a ``/metrics`` endpoint) and parse it with :func:`parse_prometheus_text`."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_prometheus_text(response.read().decode())


def stats_from_samples(samples: dict[str, dict[tuple, float]], prefix: str = "ucm") -> dict:
    """The ``get_stats()`` keys recovered from parsed samples (missing ones are 0)."""
    def one(name: str) -> float:
        return next(iter(samples.get(f"{prefix}_{name}", {}).values()), 0.0)

    stats = {name: one(name + ("_total" if kind == "counter" else "")) for name, kind, _ in _METRICS}
    stats["tier_hits"] = {dict(k)["tier"]: v for k, v in samples.get(f"{prefix}_tier_hits_total", {}).items()}
    return stats


def format_stats(samples: dict[str, dict[tuple, float]], prefix: str = "ucm") -> str:
    """A table of hit rate, load / save speed, tier occupancy and pool usage, then any section 7.2 warnings."""
    stats = stats_from_samples(samples, prefix)
    lines = [f"{'hit rate':<14}{stats['hit_rate'] * 100:8.1f} %    {stats['hits']:.0f} of {stats['lookups']:.0f} "
             f"blocks looked up; hits by tier: {_tier_hits_text(stats['tier_hits'])}"]
    for kind in TRANSFER_KINDS:
        moved = _human_bytes(stats[f"{kind}_bytes"])
        lines.append(f"{kind + ' speed':<14}{stats[f'{kind}_speed'] / 1e9:8.2f} GB/s  {moved} in "
                     f"{stats[f'{kind}_blocks']:.0f} blocks, {stats[f'{kind}_failures']:.0f} failed transfers")
    lines += _occupancy_lines(samples, prefix) + _pool_lines(samples, prefix)
    lines += [f"WARNING: {w}" for w in health_warnings(stats).values()]
    return "\n".join(lines)


def _tier_hits_text(tier_hits: dict[str, float]) -> str:
    return ", ".join(f"{t} {n:.0f}" for t, n in sorted(tier_hits.items())) or "-"


def _occupancy_lines(samples: dict, prefix: str) -> list[str]:
    used, capacity = samples.get(f"{prefix}_tier_used", {}), samples.get(f"{prefix}_tier_capacity", {})
    if not used:
        return ["tiers         (no store watched by this process's monitor)"]
    lines = [f"{'tier':<14}{'used':>12}{'capacity':>14}{'occupancy':>11}"]
    for labels, value in sorted(used.items()):
        tier, unit = dict(labels)["tier"], dict(labels)["unit"]
        cap = capacity.get(labels, 0.0)
        show = _human_bytes if unit == "bytes" else (lambda n: f"{n:.0f} blocks")
        lines.append(f"{tier:<14}{show(value):>12}{show(cap) if cap else 'unbounded':>14}"
                     f"{f'{100 * value / cap:.1f} %' if cap else '-':>11}")
    return lines


def _pool_lines(samples: dict, prefix: str) -> list[str]:
    def one(name: str) -> float:
        return next(iter(samples.get(f"{prefix}_pool_{name}", {}).values()), 0.0)

    if f"{prefix}_pool_usage" not in samples:
        return []
    return [f"{'pinned pool':<14}{one('usage') * 100:8.1f} %    {_human_bytes(one('used_bytes'))} used of "
            f"{_human_bytes(one('reserved_bytes'))} reserved, peak {_human_bytes(one('peak_bytes'))}, "
            f"max {_human_bytes(one('max_bytes'))}"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
