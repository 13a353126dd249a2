"""Where the seed 6.2 loop's time goes: ``h2d`` + ``synchronize`` against bare copies, per buffer kind (issue 4).

Run from the repository root on the lent GPU: ``python -m bench.bench_h2d_anatomy`` (JSON under ``$OUT`` or
``bench/results/``). For 1 to 256 MB, each variant runs the seed's loop shape (5 warm-up, 20 timed iterations
of copy then wait, wall clock) ``--repeats`` times, variants interleaved so drift hits them alike:

- ``bare_torch_pinned``: ``copy_`` on the current stream + stream sync, from ``torch.empty(pin_memory=True)``;
- ``bare_pool``: the same from a pinned-pool buffer (what ``get_pinned_buffer`` returns);
- ``side_stream_event`` / ``_sync`` / ``_poll``: the copy on another stream, waited on through an event, a
  stream sync, or polling the event; ``current_stream_event``: the current stream, waited on through an event;
- ``ucm_h2d_pool`` (the seed's loop) and ``ucm_h2d_torch_pinned``: ``CUDATransport.h2d`` + ``synchronize``.

Also the copy's device time (CUDA events) per buffer kind, the host time of one ``h2d`` call (enqueue), and a
placement sweep: bare DMA over 256 MiB windows at offsets of one large pinned buffer.
"""
import argparse
import statistics
import time

import torch

from bench.harness import row, wall_median_ms, write_results
from ucm_store.transport import CUDATransport

SIZES_MB = (1, 4, 16, 64, 256)  # --sizes
WARMUP, ITERATIONS = 5, 20


def loop_gbps(copy_and_wait, nbytes: int) -> float:
    """The seed's measurement: GB/s of ``ITERATIONS`` calls of ``copy_and_wait`` after ``WARMUP`` calls."""
    for _ in range(WARMUP):
        copy_and_wait()
    start = time.time()
    for _ in range(ITERATIONS):
        copy_and_wait()
    return nbytes * ITERATIONS / (time.time() - start) / 1e9


def variants(transport: CUDATransport, pool_buf, torch_buf, gpu) -> dict:
    """name -> a zero-argument copy-then-wait callable."""
    current, side, high = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream(priority=-1)

    def bare(src):
        def run():
            gpu.copy_(src, non_blocking=True)
            current.synchronize()
        return run

    def on_side_stream():
        with torch.cuda.stream(side):
            gpu.copy_(pool_buf, non_blocking=True)

    def side_stream_event():
        on_side_stream()
        side.record_event().synchronize()

    def side_stream_sync():
        on_side_stream()
        side.synchronize()

    def side_stream_poll():
        on_side_stream()
        event = side.record_event()
        while not event.query():
            pass

    def high_priority_stream_event():
        with torch.cuda.stream(high):
            gpu.copy_(pool_buf, non_blocking=True)
        high.record_event().synchronize()

    def side_stream_as_current_sync():
        with torch.cuda.stream(side):
            gpu.copy_(pool_buf, non_blocking=True)
            torch.cuda.current_stream().synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu.copy_(pool_buf, non_blocking=True)

    def graph_on_side_stream_event():
        with torch.cuda.stream(side):
            graph.replay()
        side.record_event().synchronize()

    def current_stream_event():
        gpu.copy_(pool_buf, non_blocking=True)
        current.record_event().synchronize()

    def ucm(src):
        return lambda: transport.synchronize(transport.h2d(src, gpu))

    return {"bare_torch_pinned": bare(torch_buf), "bare_pool": bare(pool_buf), "side_stream_event": side_stream_event,
            "side_stream_sync": side_stream_sync, "side_stream_poll": side_stream_poll,
            "current_stream_event": current_stream_event, "high_priority_stream_event": high_priority_stream_event,
            "side_stream_as_current_sync": side_stream_as_current_sync,
            "graph_on_side_stream_event": graph_on_side_stream_event,
            "ucm_h2d_pool": ucm(pool_buf), "ucm_h2d_torch_pinned": ucm(torch_buf)}


def device_ms(src, gpu, reps: int = 10) -> float:
    """Median device time of one copy (CUDA events around it)."""
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        gpu.copy_(src, non_blocking=True)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def enqueue_us(transport: CUDATransport, src, gpu, reps: int = 50) -> float:
    """Median host time of one ``h2d`` call (not its completion)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        task = transport.h2d(src, gpu)
        times.append((time.perf_counter() - start) * 1e6)
        transport.synchronize(task)
    return statistics.median(times)


def host_costs(transport: CUDATransport, reps: int = 2000) -> dict[str, float]:
    """Host microseconds per call of a 4 KiB copy: ``h2d`` alone, ``h2d`` + ``synchronize``, and a bare
    ``copy_`` + stream sync (the device part of a 4 KiB copy is a few microseconds)."""
    pinned, gpu = transport.get_pinned_buffer(4096), torch.empty(4096, dtype=torch.uint8, device="cuda:0")
    current = torch.cuda.current_stream()
    calls = {"ucm_h2d_enqueue": lambda: transport.h2d(pinned, gpu),
             "ucm_h2d_and_synchronize": lambda: transport.synchronize(transport.h2d(pinned, gpu)),
             "bare_copy_and_stream_sync": lambda: (gpu.copy_(pinned, non_blocking=True), current.synchronize())}
    costs = {}
    for name, call in calls.items():
        for _ in range(100):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        costs[name] = round((time.perf_counter() - start) / reps * 1e6, 2)
        torch.cuda.synchronize()
    transport.release_pinned_buffer(pinned)
    return costs


def measure_size(transport: CUDATransport, size_mb: int, repeats: int) -> dict:
    nbytes = size_mb << 20
    pool_buf = transport.get_pinned_buffer(nbytes)
    torch_buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    runs = variants(transport, pool_buf, torch_buf, gpu)
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(round(loop_gbps(run, nbytes), 1))
    result = {"size_mb": size_mb, "loop_gbps": samples,
              "loop_gbps_median": {name: statistics.median(v) for name, v in samples.items()},
              "device_gbps": {kind: round(nbytes / device_ms(buf, gpu) / 1e6, 1)
                              for kind, buf in (("torch_pinned", torch_buf), ("pool", pool_buf))},
              "h2d_enqueue_us": round(enqueue_us(transport, pool_buf, gpu), 1)}
    transport.release_pinned_buffer(pool_buf)
    return result


def placement_sweep(total_gib: int, window_mib: int = 256, reps: int = 5) -> list[dict]:
    """Bare DMA over ``window_mib`` windows at offsets of one ``total_gib`` pinned buffer: H2D, D2H, and both at
    once (the window at ``offset`` to the GPU while the window mirrored from the end comes back). Shows how much
    the host memory behind pinned pages moves the DMA ceiling."""
    gib, window = 1 << 30, window_mib << 20
    host = torch.empty(total_gib * gib, dtype=torch.uint8, pin_memory=True)
    gpu_in, gpu_out = (torch.empty(window, dtype=torch.uint8, device="cuda") for _ in range(2))
    h2d_stream, d2h_stream = torch.cuda.Stream(), torch.cuda.Stream()
    rows = []
    for offset in range(0, total_gib, max(total_gib // 8, 1)):
        here, mirror = host[offset * gib:][:window], host[(total_gib - 1 - offset) * gib:][:window]

        def h2d():
            with torch.cuda.stream(h2d_stream):
                gpu_in.copy_(here, non_blocking=True)

        def d2h():
            with torch.cuda.stream(d2h_stream):
                mirror.copy_(gpu_out, non_blocking=True)

        placed = f"{window_mib} MiB at {offset} GiB of {total_gib} GiB"
        for name, run, nbytes in (("h2d", h2d, window), ("d2h", d2h, window),
                                  ("both", lambda: (h2d(), d2h()), 2 * window)):
            ms = wall_median_ms(run, reps)
            rows.append(row(f"pinned_placement_{name}", "bare_copy", placed, ms, nbytes=nbytes, offset_gib=offset))
        print(f"  offset {offset:3d} GiB: " + ", ".join(f"{r['name'][17:]} {r['gbps']}" for r in rows[-3:]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MB)), help="sizes in MB")
    parser.add_argument("--placement-gib", type=int, default=32, help="pinned buffer of the placement sweep (0: skip)")
    args = parser.parse_args()
    transport = CUDATransport(device_id=0)
    costs = host_costs(transport)
    print("host us per 4 KiB call:", costs, flush=True)
    results = []
    for size_mb in map(int, args.sizes.split(",")):
        results.append(measure_size(transport, size_mb, args.repeats))
        r = results[-1]
        print(f"{size_mb:4d} MB  device {r['device_gbps']}  enqueue {r['h2d_enqueue_us']} us", flush=True)
        for name, values in r["loop_gbps"].items():
            print(f"      {name:22s} median {statistics.median(values):5.1f}  all {values}", flush=True)
    rows = [row(f"h2d_loop_{name}", name, f"{r['size_mb']} MB", (r["size_mb"] << 20) / gbps / 1e6,
                nbytes=r["size_mb"] << 20) for r in results for name, gbps in r["loop_gbps_median"].items()]
    if args.placement_gib:
        rows += placement_sweep(args.placement_gib)
    path = write_results("h2d_anatomy", rows, {}, extra={"sizes": results, "host_us_per_4kib_call": costs})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
