"""Axon's performance model: pure Python (standard library only), no torch.

Holds the shared vocabulary (`ModelSpec`, `Plan`, `Cluster`), the rules that decide whether a plan can run
(`perfmodel/rules.py`), the pipeline schedules, and the formulas that predict
step time and memory for a parallel layout.
"""
from perfmodel.specs import Cluster, ModelSpec, Offload, Plan, PlanError

__all__ = ["Cluster", "ModelSpec", "Offload", "Plan", "PlanError"]
