"""`megatron-lead plan`: an RL-aware GPU memory planner (docs/PLAN.md).

shapes.py (a model from its config.json) -> memory.py (the terms of each phase) -> planner.py
(layouts, micro-batch search, ranking) -> report.py (text, JSON, recipe comments) -> cli.py;
config.py connects a trainer config; measure.py holds the CPU measurements the tests compare
against. Nothing here imports the trainer's loop, Megatron or vLLM (measure.py, lazily).
"""

from megatron_lead.plan.config import estimate_for_train_config
from megatron_lead.plan.planner import Cluster, Estimate, Layout, MicroBatch, Workload, evaluate, plan
from megatron_lead.plan.shapes import ModelShape, load_shape

__all__ = ["Cluster", "Estimate", "Layout", "MicroBatch", "ModelShape", "Workload", "estimate_for_train_config",
           "evaluate", "load_shape", "plan"]
