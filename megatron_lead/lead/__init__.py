"""LEAD's math: targets, efficiency reward, group normalisation, PSI weights, whitening.

Pure PyTorch; imports nothing else of megatron_lead. Statistics are reduced over an optional
process group (reduce.py) so a run's numbers do not depend on the data-parallel size.
"""

from .advantages import AdvantageComputer, LeadResult, RolloutShard, efficiency_reward, target_lengths
from .config import METHODS, LeadConfig
from .controller import PSIController, PSIState

__all__ = ["AdvantageComputer", "LeadResult", "RolloutShard", "efficiency_reward", "target_lengths",
           "METHODS", "LeadConfig", "PSIController", "PSIState"]
