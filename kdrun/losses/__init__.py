"""Loss terms, grouped by what they read: logits, features, relations (and the methods with their
own trainable parts, one module each). Every class follows :mod:`kdrun.losses.base`."""
from kdrun.losses.base import LossTerm
from kdrun.losses.logits import CrossEntropy, KDLoss, standardize_logits

__all__ = ["CrossEntropy", "KDLoss", "LossTerm", "standardize_logits"]
