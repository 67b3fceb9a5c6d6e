"""Loss terms, grouped by what they read: logits (:mod:`.logits`), feature maps (:mod:`.features`),
relations between samples (:mod:`.relations`), token sequences (:mod:`.tokens`), and methods with
trainable parts of their own (one module each). Every class follows the contract of
:mod:`kdrun.losses.base`."""
from kdrun.losses.ab import ABLoss
from kdrun.losses.advantage import AdvantageDistillationLoss, CachedAdvantageLoss
from kdrun.losses.base import LossTerm
from kdrun.losses.crd import CRDLoss
from kdrun.losses.cross_tokenizer import CrossTokenizerDivergence
from kdrun.losses.ddk import DDKLoss
from kdrun.losses.diswot import DisWOTRelationLoss, DisWOTSemanticLoss
from kdrun.losses.features import ATLoss, FSPLoss, HintLoss, NSTLoss, SmoothL1FeatureLoss
from kdrun.losses.ft import FTLoss
from kdrun.losses.grpo import GRPOLoss
from kdrun.losses.hard import HARDLoss
from kdrun.losses.logits import (BalancedKLLoss, BinaryKLLoss, CrossEntropy, DISTLoss, DKDLoss, HardDistillationLoss, KDLoss,
                                 ReverseKLLoss, standardize_logits)
from kdrun.losses.minillm import MiniLLMLoss
from kdrun.losses.mst import MixtureOfTeachersKD
from kdrun.losses.nd import NDLoss
from kdrun.losses.ofa import OFALoss
from kdrun.losses.outputs import ModelOutputLoss
from kdrun.losses.preference import DPOLoss, REDILoss
from kdrun.losses.ranking import MarginMSELoss, PairwiseRankingAccuracy
from kdrun.losses.ofd import OFDLoss
from kdrun.losses.relations import CCLoss, PKTLoss, RKDLoss, SPLoss
from kdrun.losses.reviewkd import ReviewKDLoss
from kdrun.losses.sinkhorn import SinkhornLoss
from kdrun.losses.swing import PrivacyScores, SwingDistillationLoss
from kdrun.losses.taid import TAIDClassifierLoss
from kdrun.losses.tgeo import TGeoKDLoss
from kdrun.losses.tokens import CachedTokenDivergence, SampledTokenKL, TAIDLoss, TokenCrossEntropy, TokenDivergence, TokenHiddenLoss, TokenKLLoss
from kdrun.losses.trg import TokenSampler, TRGContextualLoss, TRGGlobalLoss, TRGLocalLoss, TRGLoss
from kdrun.losses.vid import VIDLoss

__all__ = [
    "ABLoss", "AdvantageDistillationLoss", "ATLoss", "CachedAdvantageLoss", "CachedTokenDivergence", "BalancedKLLoss", "BinaryKLLoss", "CCLoss", "CRDLoss", "CrossEntropy", "CrossTokenizerDivergence", "DDKLoss", "DISTLoss", "DPOLoss", "DisWOTRelationLoss", "DisWOTSemanticLoss", "DKDLoss", "FSPLoss", "FTLoss", "GRPOLoss", "HARDLoss", "HardDistillationLoss", "HintLoss",
    "KDLoss", "LossTerm", "MarginMSELoss", "MiniLLMLoss", "MixtureOfTeachersKD", "ModelOutputLoss", "NDLoss", "NSTLoss", "OFALoss", "OFDLoss", "PairwiseRankingAccuracy", "PKTLoss", "REDILoss", "RKDLoss", "ReverseKLLoss", "ReviewKDLoss", "SampledTokenKL", "SinkhornLoss", "SmoothL1FeatureLoss", "PrivacyScores", "SPLoss", "SwingDistillationLoss", "TAIDClassifierLoss", "TAIDLoss", "TGeoKDLoss", "TokenCrossEntropy", "TokenDivergence", "TokenHiddenLoss", "TokenKLLoss", "TokenSampler",
    "TRGContextualLoss", "TRGGlobalLoss", "TRGLocalLoss", "TRGLoss", "VIDLoss",
    "standardize_logits",
]
