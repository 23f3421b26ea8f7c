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
from dataclasses import replace
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from axon import trainer
from axon.checkpoint import CheckpointError
from axon.config import RunConfig, freeze, load
from axon.errors import BAD_INPUT, DEBUG_FLAG, guarded, report
from launch import dist as launch_dist
from launch.env import detect
from launch.grid import Grid
from perfmodel import rules


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
    """`axon train [--help] [--cfg] [--debug] overrides`; bad input is one line and exit code 2
    (axon/errors.py), the traceback only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from axon.help import train_help

        print(train_help())
        return 0
    return guarded("axon train", lambda args: _main(args, argv), argv)


def _main(argv: list[str], full_argv: list[str]) -> int:
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    composed = load(argv)
    if show_cfg:
        print(OmegaConf.to_yaml(composed, resolve=True), end="")
        return 0
    cfg = freeze(composed)
    env = detect(os.environ)
    cfg = resolve_launch(cfg, env)  # backend vs GPUs and cluster preset, before any process starts
    if env.kind == "single" and cfg.launch.nproc_per_node > 1:
        resolve_plan(cfg, cfg.launch.nproc_per_node, argv)  # fail before spawning anything
        from launch.spawn import run_local

        workers = [a for a in full_argv if a != "--cfg"]  # --debug travels to the workers
        return run_local(cfg.launch.nproc_per_node, workers, master_port=cfg.launch.master_port)
    cfg, plan_info = resolve_plan(cfg, env.world_size, argv)
    return _run_rank(cfg, env, plan_info, debug=DEBUG_FLAG in full_argv)


def resolve_launch(cfg: RunConfig, env: Any) -> RunConfig:
    """`cfg` with launch.backend resolved (auto -> nccl | gloo; a process given GPUs that sees none
    is an error) and checked against the cluster preset, and launch.timeout_s set (launch/dist.py)."""
    backend = launch_dist.resolve_backend(cfg.launch.backend, env.gpus_given)
    launch_dist.check_cluster(backend, cfg.cluster.name)
    timeout_s = launch_dist.timeout_for(backend, cfg.launch.timeout_s)
    return replace(cfg, launch=replace(cfg.launch, backend=backend, timeout_s=timeout_s))


def _run_rank(cfg: RunConfig, env: Any, plan_info: dict[str, Any], debug: bool = False) -> int:
    preempt = None
    try:
        backend = launch_dist.init(env, cfg.launch.backend, cfg.launch.timeout_s)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        grid = Grid.build(cfg.plan, env.rank, env.world_size, timeout_s=cfg.launch.timeout_s)
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
        return report(f"axon train [rank {env.rank}]", e, debug, code=3)
    except BAD_INPUT as e:  # found after start-up (vocab, resumed batch): still one line naming the setting
        return report(f"axon train [rank {env.rank}]", e, debug, code=2)
    except Exception as e:  # noqa: BLE001 - report which rank failed and why, then exit non-zero
        return report(f"axon train [rank {env.rank}] failed", e, debug, code=1)
    finally:
        launch_dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
