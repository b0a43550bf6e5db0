"""The latency benchmark runs end to end (timings are never asserted: they belong to the benchmark itself)."""

from mmreduce.eval.latency import LatencyPreset, run_benchmark, to_markdown


def test_latency_benchmark_runs_on_a_tiny_preset():
    preset = LatencyPreset(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=300, vision_hidden=32,
                           vision_layers=1, vision_heads=2, image_size=32, patch_size=4, text_tokens=12, repeats=1,
                           decode_tokens=2)
    rows = run_benchmark(preset, log=lambda message: None)
    by_name = {row["method"]: row for row in rows}
    assert set(by_name) == {"baseline", "fastv K=2 r=0.25", "pdrop λ=0.5"}
    assert by_name["baseline"]["predicted_speedup"] == 1.0
    assert by_name["fastv K=2 r=0.25"]["equivalent_vision_tokens"] == (2 * 64 + 2 * 16) / 4
    assert by_name["pdrop λ=0.5"]["prefill_flops"] < by_name["baseline"]["prefill_flops"]
    assert by_name["fastv K=2 r=0.25"]["kv_cache_mb"] < by_name["baseline"]["kv_cache_mb"]
    assert "| fastv K=2 r=0.25 | 40 |" in to_markdown(rows)
