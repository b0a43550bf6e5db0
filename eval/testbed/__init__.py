"""How the bundled tiny models were made: training (`train`, the `train-tiny` command; `train_seed_vlm`) with the
one optimizer both use (`optim`), the probes and reports that guided it, and the masked quality bars. Nothing
outside this package imports it: the harness and the demo only load the finished checkpoints. Recipes, commands and
figures: docs/TRAINING.md."""
