def benchmark_e2e_latency():
    """端到端延迟测试"""
    from vllm import LLM
    from vllm.config import KVTransferConfig
    import time

    # 配置
    ktc = KVTransferConfig(
        kv_connector="UCMConnector",
        kv_connector_module_path="ucm.integration.vllm.ucm_connector",
        kv_role="kv_both",
        kv_connector_extra_config={
            "store_pipeline": "Cache|Posix",
            "storage_backends": "/data/ucm_cache",
        }
    )
    llm = LLM(
        model="meta-llama/Llama-2-7b-hf",
        kv_transfer_config=ktc,
    )

    # 测试提示
    prompts = [
        "What is the capital of France?",
        "Explain quantum computing in simple terms.",
        "Write a short poem about nature.",
    ]
    # 预热
    _ = llm.generate(prompts[:1])

    # 测试
    latencies = []
    for prompt in prompts:
        start = time.time()
        output = llm.generate([prompt])
        elapsed = time.time() - start
        latencies.append(elapsed)
        print(f"Prompt: {prompt[:30]}... -> {elapsed:.3f}s")
    print(f"\nAverage latency: {sum(latencies)/len(latencies):.3f}s")
