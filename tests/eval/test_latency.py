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


def test_before_the_llm_benchmark_runs_and_its_ideal_is_the_model_given_fewer_features():
    """The plain-indexing ideal is the stock model sent only the kept features; with packed positions a hooked
    before-the-LLM method computes the same last-token logits."""
    import torch

    import mmreduce
    from mmreduce.eval.latency import _cut_by_indexing, before_markdown, build_model, make_inputs, run_before_benchmark

    preset = LatencyPreset(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=300, vision_hidden=32,
                           vision_layers=1, vision_heads=2, image_size=32, patch_size=4, text_tokens=12, repeats=1,
                           decode_tokens=2)
    rows = run_before_benchmark(preset, log=lambda message: None)
    assert [row["method"] for row in rows] == ["baseline", "stride r=0.25", "pool r=0.25", "tome r=0.25"]
    assert all(row["equivalent_vision_tokens"] == 16 for row in rows[1:])
    assert "| stride r=0.25 | 16 |" in before_markdown(rows)

    model, inputs = build_model(preset), make_inputs(preset)
    with torch.no_grad(), mmreduce.wrap(model, "stride", keep_ratio=0.25, positions="packed") as reduced:
        logits = reduced(**inputs, logits_to_keep=1).logits[:, -1]
        first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
        kept = torch.tensor(reduced.stats.kept_positions[0][0]) - first
        ideal = _cut_by_indexing(model, inputs, kept)()[:, -1]
    assert kept.tolist() == [int((i + 0.5) * 64 / 16) for i in range(16)]  # evenly spaced, independently
    assert torch.allclose(logits, ideal, atol=1e-5, rtol=0)
