"""Loss terms, grouped by what they read: logits (:mod:`.logits`), feature maps (:mod:`.features`),
relations between samples (:mod:`.relations`), and methods with trainable parts of their own (one
module each). Every class follows the contract of :mod:`kdrun.losses.base`."""
from kdrun.losses.base import LossTerm
from kdrun.losses.features import ATLoss, FSPLoss, HintLoss, NSTLoss
from kdrun.losses.logits import CrossEntropy, DISTLoss, DKDLoss, KDLoss, standardize_logits
from kdrun.losses.relations import CCLoss, PKTLoss, RKDLoss, SPLoss

__all__ = [
    "ATLoss", "CCLoss", "CrossEntropy", "DISTLoss", "DKDLoss", "FSPLoss", "HintLoss", "KDLoss", "LossTerm",
    "NSTLoss", "PKTLoss", "RKDLoss", "SPLoss", "standardize_logits",
]
