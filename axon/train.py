"""`axon train [overrides]` / `python -m axon.train [overrides]`: one training job.

    python -m axon.train model=tiny parallel.dp=4 train.steps=50             # under torchrun / srun / mpiexec
    python -m axon.train launch.nproc_per_node=8 model=tiny parallel=auto     # starts 8 local workers itself

The layout, the settings' ranges, the data files, the run directory, a resumed checkpoint and
the memory fit are checked before any process group exists (or any worker is spawned), so a bad
setting fails at once with one line naming it (axon/preflight.py). A rank that fails, or whose
peer died, exits non-zero; under the local launcher the other workers are then stopped.

Exit codes: 0 every step ran; 1 a bug (the exception's type is named); 2 bad input; 3 an
unusable checkpoint; 4 a non-finite loss or gradient norm (train.on_nonfinite); 124 a rank made
no progress for launch.timeout_s (launch/watchdog.py); 128 + N stopped by signal N (TERM 143,
INT 130, USR1 138) after a checkpoint at a step boundary, or killed by it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from axon import preflight
from axon.config import RunConfig, freeze, load
from axon.errors import BAD_INPUT, DEBUG_FLAG, CheckpointError, guarded, report
from launch import dist as launch_dist
from launch.env import detect
from launch.grid import Grid
from perfmodel import rules


def resolve_plan(cfg: RunConfig, world: int, argv: list[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The layout to run (the performance model's pick for `parallel=auto`), checked against
    every rule of perfmodel/rules.py; pure, so it runs before any process group exists."""
    info: dict[str, Any] = {"auto": False}
    if cfg.auto_plan:
        from perfmodel.candidates import parse_constraints
        from perfmodel.search import best_plan

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
    spawn = env.kind == "single" and cfg.launch.nproc_per_node > 1
    world = cfg.launch.nproc_per_node if spawn else env.world_size
    local_ranks = world if spawn else env.local_world_size
    cfg = replace(cfg, cluster=cfg.cluster.sharing(local_ranks))  # a CPU preset's rates per rank
    cfg, plan_info = resolve_plan(cfg, world, argv)  # fail before spawning anything
    try:  # run dir, data files, resumed checkpoint, memory (axon/preflight.py)
        preflight.check(cfg, world, plan_info.get("estimate"), local_ranks=local_ranks)
    except CheckpointError as e:  # an unreadable checkpoint: exit code 3, as in the workers
        return report("axon train", e, DEBUG_FLAG in full_argv, code=3)
    if spawn:
        from launch.spawn import run_local

        workers = [a for a in full_argv if a != "--cfg"]  # --debug travels to the workers
        return run_local(cfg.launch.nproc_per_node, workers, master_port=cfg.launch.master_port,
                         timeout_s=cfg.launch.timeout_s)
    return _run_rank(cfg, env, plan_info, debug=DEBUG_FLAG in full_argv)


def resolve_launch(cfg: RunConfig, env: Any) -> RunConfig:
    """`cfg` with launch.backend resolved (auto -> nccl | gloo; a process given GPUs that sees none
    is an error) and checked against the cluster preset, and launch.timeout_s set (launch/dist.py)."""
    backend = launch_dist.resolve_backend(cfg.launch.backend, env.gpus_given)
    launch_dist.check_cluster(backend, cfg.cluster.name)
    timeout_s = launch_dist.timeout_for(backend, cfg.launch.timeout_s)
    return replace(cfg, launch=replace(cfg.launch, backend=backend, timeout_s=timeout_s))


def _run_rank(cfg: RunConfig, env: Any, plan_info: dict[str, Any], debug: bool = False) -> int:
    """One rank: exit 0 once every step ran; on TERM / INT / USR1 a checkpoint at the next step
    boundary and 128 + the signal (axon/preempt.py); a stall of launch.timeout_s, even in the
    rendezvous or inside a collective, ends the rank with a report (launch/watchdog.py)."""
    import signal

    from axon import trainer  # here: the local launcher's own process never needs it (seconds of imports)
    from axon.nonfinite import NONFINITE_EXIT, NonFiniteError
    from axon.preempt import PreemptionHandler
    from launch.watchdog import Watchdog

    status = cfg.run_dir / "status"  # every rank's last step and phase, read by the stall report
    watchdog = Watchdog.start(env.rank, env.world_size, status, cfg.launch.timeout_s)
    preempt = PreemptionHandler.install()  # before the rendezvous: a stop signal never kills a rank midway
    collective_s = launch_dist.collective_timeout(cfg.launch.timeout_s)  # the watchdog reports a stall first
    try:
        watchdog.mark(0, "rendezvous")
        backend = launch_dist.init(env, cfg.launch.backend, collective_s, trace_dir=status)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        watchdog.mark(0, "groups")
        grid = Grid.build(cfg.plan, env.rank, env.world_size, timeout_s=collective_s)
        result = trainer.run(cfg, grid, device, preempt=preempt, plan_info=plan_info, watchdog=watchdog)
        last = result.steps[-1] if result.steps else result.start_step
        if not result.preempted or last >= cfg.train.steps:
            return 0  # every step ran (a stop signal during the last one changes nothing)
        watchdog.mark(last, "requeue")
        preempt.requeue(os.environ)  # rank 0 of a Slurm job; the others wait for it before exiting non-zero,
        torch.distributed.barrier()  # which `srun --kill-on-bad-exit=1` answers by stopping every task
        if env.rank == 0:
            print(f"axon train: stopped by {signal.Signals(preempt.agreed).name} at step {last} of "
                  f"{cfg.train.steps}; checkpoint {result.final_checkpoint}; exit code {preempt.exit_code()} "
                  "(run again with checkpoint.resume=auto to continue)", file=sys.stderr)
        return preempt.exit_code()
    except CheckpointError as e:
        return report(f"axon train [rank {env.rank}]", e, debug, code=3)
    except NonFiniteError as e:  # the loss or gradient norm became NaN/Inf (train.on_nonfinite)
        return report(f"axon train [rank {env.rank}]", e, debug, code=NONFINITE_EXIT)
    except BAD_INPUT as e:  # found after start-up (vocab, resumed batch): still one line naming the setting
        return report(f"axon train [rank {env.rank}]", e, debug, code=2)
    except Exception as e:  # noqa: BLE001 - report which rank failed and why, then exit non-zero
        return report(f"axon train [rank {env.rank}] failed", e, debug, code=1)
    finally:
        watchdog.mark(watchdog.last_step, "shutdown")  # a hung teardown is a stall too
        launch_dist.shutdown()
        watchdog.stop()  # for callers that go on in this process (tests)
        preempt.restore()


if __name__ == "__main__":
    sys.exit(main())
