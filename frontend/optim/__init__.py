"""cutegrad.optim: SGD, Adam, AdamW and learning-rate schedules."""
from .optimizer import Optimizer
from .sgd import SGD
from .adamw import Adam, AdamW
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler"]
