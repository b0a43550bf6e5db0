"""How the bundled tiny models were made: training (`train_tiny`, `train_seed_vlm`), the probes and reports that
guided it, and the masked quality bars. Nothing outside this package imports it: the harness and the demo only
load the finished checkpoints. Recipes, commands and figures: docs/TRAINING.md."""
