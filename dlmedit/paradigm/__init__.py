"""The paradigm seam (ARM vs masked diffusion)."""

from dlmedit.paradigm.ar import ARParadigm
from dlmedit.paradigm.base import GenerationResult, Paradigm, ScoreResult, TargetBatch, TargetState
from dlmedit.paradigm.mdm import MaskedDiffusionParadigm

__all__ = ["ARParadigm", "GenerationResult", "MaskedDiffusionParadigm", "Paradigm", "ScoreResult", "TargetBatch", "TargetState"]
