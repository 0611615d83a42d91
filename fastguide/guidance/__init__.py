"""Guidance methods: the specs users build (``specs``; the per-sample combines of ``modern``), the gradients
they contribute (``gradients``) and how they fold into a sampler plan (``plan``).

>>> guidance = [fastguide.CFG(3.0, null_label=10), fastguide.ClassifierGuidance(clf, scale=2.0)]
>>> x = fastguide.sample(model, x_T, schedule=s, sampler="ddpm", steps=50, y=labels, guidance=guidance)
"""

from .modern import APG, TCFG, CFGZeroStar, MamboG, PerturbedGuidance
from .specs import CFG, CFGPlusPlus, ClassifierGuidance, DiscriminatorGuidance, smooth

__all__ = ["APG", "CFG", "CFGPlusPlus", "CFGZeroStar", "ClassifierGuidance", "DiscriminatorGuidance", "MamboG",
           "PerturbedGuidance", "TCFG", "smooth"]
