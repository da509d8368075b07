"""Thin torch front end: the paper's two architectures, their training loop, L_inf attacks.

Imports torch; ``import ntkcore`` does not import this subpackage.
"""

from .attacks import fgsm, mim, model_loss_fn, pgd
from .models import ARCHS, MLPAttn, TwoLayerNet, closed_form_entk, init_weights, make_model
from .train import TrainResult, accuracy, objective, predict, train

__all__ = [
    "ARCHS", "MLPAttn", "TwoLayerNet", "TrainResult", "accuracy", "closed_form_entk", "fgsm",
    "init_weights", "make_model", "mim", "model_loss_fn", "objective", "pgd", "predict", "train",
]
