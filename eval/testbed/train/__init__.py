"""`train-tiny`: how the bundled tiny LLaVA checkpoints are trained (docs/TRAINING.md has the commands).

config (TrainConfig, finishing_stage) -> targets (what each loss aims at) -> losses -> loop (train) -> cli.
"""

from .cli import add_subparser, main
from .config import TrainConfig, finishing_stage
from .loop import train
from .targets import patch_labels

__all__ = ["TrainConfig", "add_subparser", "finishing_stage", "main", "patch_labels", "train"]
