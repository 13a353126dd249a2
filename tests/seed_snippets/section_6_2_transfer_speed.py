def benchmark_transfer_speed():
    """传输速度基准测试"""
    import torch
    from ucm.shared.trans import CUDATransport

    transport = CUDATransport(device_id=0)
    sizes = [1, 4, 16, 64, 256]  # MB
    iterations = 20

    print("Transfer Speed Benchmark:")
    print("-" * 50)
    for size_mb in sizes:
        size = size_mb * 1024 * 1024

        pinned = transport.get_pinned_buffer(size)
        gpu = torch.empty(size, dtype=torch.uint8, device='cuda:0')
        # Warmup
        for _ in range(5):
            task = transport.h2d(pinned, gpu)
            transport.synchronize(task)

        # Benchmark
        start = time.time()
        for _ in range(iterations):
            task = transport.h2d(pinned, gpu)
            transport.synchronize(task)
        elapsed = time.time() - start
        bandwidth = (size * iterations) / elapsed / 1e9
        print(f"{size_mb:3d} MB: {bandwidth:.1f} GB/s")

        transport.release_pinned_buffer(pinned)
