from ucm.shared.metrics.ucmmonitor import StatsMonitor
monitor = StatsMonitor.get_instance()
stats = monitor.get_stats()

print(f"命中率: {stats.get('hit_rate', 0) * 100:.1f}%")
print(f"加载速度: {stats.get('load_speed', 0) / 1e9:.1f} GB/s")
print(f"保存速度: {stats.get('save_speed', 0) / 1e9:.1f} GB/s")

if stats.get('hit_rate', 0) < 0.5:
    print("WARNING: 命中率低于 50%，检查缓存配置")
if stats.get('load_speed', 0) < 1e9:
    print("WARNING: 加载速度低于 1 GB/s，检查存储配置")
