"""`axon train [overrides]` / `python -m axon.train [overrides]`: one training job.

    python -m axon.train model=tiny parallel.dp=4 train.steps=50             # under torchrun / srun / mpiexec
    python -m axon.train launch.nproc_per_node=8 model=tiny parallel=auto     # starts 8 local workers itself

The layout is validated before any process group exists (or any worker is spawned), so a bad
setting fails at once with a message naming it. A rank that fails, or whose peer died, exits
non-zero; under the local launcher the other workers are then stopped.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import replace
from typing import Any, Optional

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from axon import trainer
from axon.checkpoint import CheckpointError
from axon.config import RunConfig, freeze, load
from launch import dist as launch_dist
from launch.env import LaunchEnvError, detect
from launch.grid import Grid
from perfmodel import rules
from perfmodel.specs import PlanError


def resolve_plan(cfg: RunConfig, world: int, argv: list[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The layout to run (the performance model's pick for `parallel=auto`), checked against
    every rule of perfmodel/rules.py; pure, so it runs before any process group exists."""
    info: dict[str, Any] = {"auto": False}
    if cfg.auto_plan:
        from perfmodel.search import best_plan, parse_constraints

        plan, est = best_plan(cfg.model, cfg.cluster, world, parse_constraints(argv), cfg.train.global_batch_size,
                              cfg.train.seq_len)
        cfg = replace(cfg, plan=plan)
        info = {"auto": True, "estimate": est.to_dict()}
    rules.check(cfg.model, cfg.plan, world, cfg.train.global_batch_size, cfg.train.seq_len)
    if not cfg.auto_plan:
        from perfmodel.estimate import evaluate

        info["estimate"] = evaluate(cfg.model, cfg.plan, cfg.cluster, cfg.train.global_batch_size,
                                    cfg.train.seq_len).to_dict()
    return cfg, info


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = freeze(load(argv))
        env = detect(os.environ)
        if env.kind == "single" and cfg.launch.nproc_per_node > 1:
            resolve_plan(cfg, cfg.launch.nproc_per_node, argv)  # fail before spawning anything
            from launch.spawn import run_local

            return run_local(cfg.launch.nproc_per_node, argv, master_port=cfg.launch.master_port)
        cfg, plan_info = resolve_plan(cfg, env.world_size, argv)
    except (PlanError, LaunchEnvError, HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"axon train: {e}", file=sys.stderr)
        return 2
    return _run_rank(cfg, env, plan_info)


def _run_rank(cfg: RunConfig, env: Any, plan_info: dict[str, Any]) -> int:
    preempt = None
    try:
        backend = launch_dist.init(env, cfg.launch.backend, cfg.launch.timeout_s)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        grid = Grid.build(cfg.plan, env.rank, env.world_size)
        from axon.preempt import PreemptionHandler

        preempt = PreemptionHandler.install()
        result = trainer.run(cfg, grid, device, preempt=preempt, plan_info=plan_info)
        if result.preempted:
            preempt.requeue(os.environ)
            if env.rank == 0:
                print(f"axon train: preempted at step {result.steps[-1] if result.steps else result.start_step}; "
                      f"checkpoint {result.final_checkpoint}", file=sys.stderr)
        return 0
    except CheckpointError as e:
        print(f"axon train [rank {env.rank}]: {e}", file=sys.stderr)
        return 3
    except Exception:  # noqa: BLE001 - report which rank failed and why, then exit non-zero
        print(f"axon train [rank {env.rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1
    finally:
        launch_dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
