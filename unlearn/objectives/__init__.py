"""Unlearning objectives: one file each, registered here explicitly."""

from unlearn.objectives.base import Objective, ObjectiveConfig
from unlearn.objectives.flat import FLAT
from unlearn.objectives.grad_ascent import GradAscent
from unlearn.objectives.grad_diff import GradDiff
from unlearn.objectives.idk_dpo import IdkDPO
from unlearn.objectives.idk_nll import IdkNLL
from unlearn.objectives.needle import Needle
from unlearn.objectives.npo import NPO
from unlearn.objectives.rmu import RMU, rmu_selection
from unlearn.objectives.salun import SalUn
from unlearn.objectives.simnpo import SimNPO
from unlearn.objectives.undial import UNDIAL
from unlearn.objectives.uoe import UOE, set_base_objectives
from unlearn.objectives.wga import WGA
from unlearn.registry import Registry

OBJECTIVES = Registry("objective")
for _cls in (GradAscent, GradDiff, NPO, SimNPO, IdkNLL, IdkDPO, FLAT, RMU, UNDIAL, WGA, Needle, UOE, SalUn):
    OBJECTIVES.register(_cls.name, _cls)
set_base_objectives(OBJECTIVES)  # uoe trains one of these on the expert (it does not import this package)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "GradAscent", "GradDiff", "NPO", "SimNPO", "IdkNLL", "IdkDPO",
           "FLAT", "RMU", "UNDIAL", "WGA", "Needle", "UOE", "SalUn", "rmu_selection"]
