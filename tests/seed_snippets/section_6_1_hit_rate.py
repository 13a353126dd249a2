#!/usr/bin/env python
"""测试 KV Cache 命中率"""
from ucm.store.factory import UcmConnectorFactory
import time

def benchmark_hit_rate():
    """命中率基准测试"""
    config = {
        "store_pipeline": "Cache|Posix",
        "storage_backends": "/data/ucm_cache",
        "buffer_number": 2048,
    }
    store = UcmConnectorFactory.create_connector(config, local_rank=0)
    # 生成测试数据
    num_blocks = 1000
    block_ids = [f"test_block_{i}".encode() for i in range(num_blocks)]
    # 第一次查询（全部未命中）
    results = store.lookup(block_ids)
    first_hits = sum(results)
    print(f"First lookup: {first_hits}/{num_blocks} hits")

    # 写入数据
    import torch
    test_tensor = torch.randn(1024 * 1024)
    for block_id in block_ids[:100]:  # 写入部分
        task = store.dump([block_id], 0, test_tensor)
        store.wait(task)
        store.commit([block_id], [True])

    # 第二次查询
    results = store.lookup(block_ids)
    second_hits = sum(results)
    print(f"Second lookup: {second_hits}/{num_blocks} hits ({second_hits/num_blocks*100:.1f}%)")

if __name__ == "__main__":
    benchmark_hit_rate()
