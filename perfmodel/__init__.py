"""Axon's performance model: pure Python (standard library, numpy at most), no torch.

Holds the shared vocabulary (`ModelSpec`, `Plan`, `Cluster`) and the formulas that predict
step time and memory for a parallel layout.
"""
from perfmodel.specs import Cluster, ModelSpec, Offload, Plan, PlanError

__all__ = ["Cluster", "ModelSpec", "Offload", "Plan", "PlanError"]
