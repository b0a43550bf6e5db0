"""Tests of `mmreduce.eval`: benchmarks, tiny models, the bench harness, compare, latency, SEED-VLM, lmms plugin."""
