"""``python -m mmreduce.tokenizers_visual tokenizer ...``: the same commands as ``mmreduce tokenizer ...``."""

from .cli import main

if __name__ == "__main__":
    main()
