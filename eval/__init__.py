"""What users run to measure reduction: synthetic benchmarks (`benchmarks`), the bundled tiny models
(`tiny_models.load_tiny`), greedy accuracy (`accuracy`), the side-by-side harness (`harness.run_bench`, the
`mmreduce bench` command) running models through `runners`, the schedule comparison (`compare`), schedule search and
tuning (`tune`), the latency benchmark (`latency`), the SEED-token VLM (`seed_vlm`) and the lmms-eval plugin
(`lmms_plugin`). How the tiny models were made lives apart, in `eval.testbed`, which none of these import.
"""
