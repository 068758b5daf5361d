"""Curvature of a model's loss: K-FAC factors (``kfac``) and exact dense matrices for small models
(``ggn``, ``empirical_fisher``). Conventions follow curvlinops 3.x; see ``docs/curvature.md``."""
from __future__ import annotations

from . import rules
from ._losses import LOSS_NAMES, LossSpec
from .exact import empirical_fisher, ggn
from .kfac import FISHER_TYPES, KFAC_APPROXES, KFACCurvature, kfac
from .rules import LayerRule, register_rule

__all__ = ["kfac", "ggn", "empirical_fisher", "KFACCurvature", "FISHER_TYPES", "KFAC_APPROXES", "LossSpec",
           "LOSS_NAMES", "rules", "LayerRule", "register_rule"]
