"""Optimizers (SGD, Adam, AdamW), gradient clipping and learning-rate schedules. Never imports MPI."""
from . import lr_scheduler
from .adam import Adam, AdamW
from .clip import clip_grad_norm, grad_norm
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "SGD", "clip_grad_norm", "grad_norm", "lr_scheduler"]
