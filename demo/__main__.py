"""`python -m mmreduce.demo [--port N] [--model PATH] [--host ADDR]`."""

import sys

from .cli import main

sys.exit(main())
