"""`python -m mmreduce.eval.testbed.train MODEL ...`: the `train-tiny` command without the console script."""

from .cli import main

raise SystemExit(main())
