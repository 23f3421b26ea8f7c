"""`axon dry-run`: build one rank of a layout over torch's fake process group, run one training
step, and set the bytes it held (by role) beside the performance model's prediction for the
same model, layout, batch and dtype; then say whether the prediction fits the cluster's device.

    axon dry-run parallel=llama3.1-405b-dgx-h100 cluster=dgx-h100 model=tiny model.n_layers=62 ... [--rank R] [--json]
    axon dry-run --predict-only model=llama3.1-405b cluster=frontier parallel=llama3.1-405b-frontier ...

Every `parallel.*` degree must be fixed (no parallel=auto): the world is the plan's size, and the
command builds only rank `--rank` of it (default `most_loaded_rank`: the one the prediction
describes), in one process, on the CPU. The fake process group
(torch.testing._internal.distributed.fake_pg) moves no data, so losses are meaningless but shapes
and bytes are exact, as in tests/distributed/test_memory_roles.py.

Measured, as the trainer records them (axon/memory.py, parallel/activation_offload.py): params,
grads and optimizer are the distinct storages of the gradient engine's state tensors (the bf16
compute weights are in params; the optimizer offload's host copies are `host`); activations the
pipeline store's peak of saved tensors on the device during the step, and `host` adds its
offloaded peak. `peak` is params + grads + optimizer + activations: the bytes the rank holds at
its activation peak, what the performance model's `Memory` (perfmodel/memory.py) predicts with
the same four terms. The model's other two terms are not measured: `buffers` (ZeRO-3 and tp_depth
gathered weights, transient) and `overhead` (runtime context, a cluster constant); they are
added to the prediction for the fit against `cluster.hbm_bytes`.

`--predict-only` skips the build (a 405B rank does not fit this machine) and prints the
prediction and the fit alone. docs/recipes/llama3.1-405b.md uses both.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from axon.config import ConfigError, RunConfig, freeze, load
from axon.errors import Parser, guarded
from perfmodel.specs import Plan

GiB = 2**30
ROLES = ("params", "grads", "optimizer", "activations", "peak")
# Before the user's overrides: the fake group's losses are meaningless (its collectives move no
# data), so a non-finite step is skipped and clipping is off; the run directory is a temporary one.
DEFAULTS = ("train.progress=false", "logger.wandb.mode=disabled", "checkpoint.at_end=false",
            "train.on_nonfinite=skip", "optim.grad_clip=0")


@dataclass(frozen=True)
class DryRun:
    """One rank's bytes by role: `measured` (None with --predict-only) and `predicted`, plus the
    prediction's unmeasured terms and the device it must fit."""

    rank: int
    world: int
    measured: dict[str, float] | None
    predicted: dict[str, float]  # ROLES + host
    buffers: float  # predicted, unmeasured: gathered weights
    overhead: float  # predicted, unmeasured: the cluster preset's runtime overhead
    hbm_bytes: float
    node_host_bytes: float  # the cluster preset's host memory per node
    ranks_per_node: int

    @property
    def device_total(self) -> float:
        """Predicted device bytes at the peak: the measured roles' prediction + buffers + overhead."""
        return self.predicted["peak"] + self.buffers + self.overhead

    @property
    def node_host(self) -> float:
        """Predicted host bytes of a node: every rank's offloaded optimizer states and activations."""
        return self.predicted["host"] * self.ranks_per_node

    @property
    def fits(self) -> bool:
        """The device peak within the device's memory and the node's offloaded bytes within its host's."""
        return self.device_total <= self.hbm_bytes and self.node_host <= self.node_host_bytes

    def ratios(self) -> dict[str, float]:
        """measured / predicted per role (1.0 where both are 0)."""
        if self.measured is None:
            return {}
        out = {}
        for role in (*ROLES, "host"):
            got, want = self.measured[role], self.predicted[role]
            out[role] = 1.0 if got == want == 0 else (got / want if want else float("inf"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "measured": self.measured, "predicted": self.predicted,
                "ratio": self.ratios(), "buffers_predicted": self.buffers, "overhead": self.overhead,
                "device_total_predicted": self.device_total, "hbm_bytes": self.hbm_bytes,
                "node_host_predicted": self.node_host, "node_host_bytes": self.node_host_bytes, "fits": self.fits}


def check_plan(cfg: RunConfig) -> None:
    """The layout must be fully fixed and valid for the batch (the same check `axon train` makes)."""
    if cfg.auto_plan:
        raise ConfigError("axon dry-run builds one rank of a fixed layout, not parallel=auto: run `axon tune ... "
                          "--out FILE.yaml` and pass its parallel.* overrides (or parallel=<name>)")
    cfg.plan.check(cfg.model, cfg.plan.world_size, cfg.train.global_batch_size, cfg.train.seq_len)


def predict(cfg: RunConfig, device_type: str) -> tuple[dict[str, float], float, float]:
    """(the predicted roles + host, buffers, overhead) on the layout's most loaded rank, in the
    compute dtype the trainer picks for train.dtype on `device_type` (parallel/precision.py:
    auto is bf16 on GPUs, fp32 on the CPU) rather than the cluster preset's.

    Every role is the performance model's `Memory` (perfmodel/memory.py, as `axon tune` reports
    it): under activation offload its device and host activations come from the runtime's own
    offload plan, simulated (perfmodel/pipeline.py `schedule_cost`)."""
    import torch

    from parallel.precision import policy
    from perfmodel.estimate import evaluate

    itemsize = policy(cfg.train.dtype, torch.device(device_type)).compute.itemsize
    cluster = replace(cfg.cluster, dtype_bytes=itemsize)
    mem = evaluate(cfg.model, cfg.plan, cluster, cfg.train.global_batch_size, cfg.train.seq_len).memory
    roles = {r: float(getattr(mem, r)) for r in ROLES[:-2]}
    roles["activations"], roles["host"] = float(mem.activations), float(mem.host)
    roles["peak"] = sum(roles[r] for r in ROLES[:-1])
    return roles, float(mem.buffers), float(mem.overhead)


def measure(cfg: RunConfig, rank: int) -> dict[str, float]:
    """Bytes by role on `rank` of the plan's world after one trainer step over the fake process
    group (tests/distributed/test_memory_roles.py measures rank 0 of 8-rank layouts the same way)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from axon import memory, trainer
    from launch.grid import Grid

    if dist.is_initialized():
        raise ConfigError("axon dry-run needs a process without a process group (it creates a fake one); "
                          "run it as its own command, not under axon train's launcher")
    world = cfg.plan.world_size
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        t = trainer.Trainer(cfg, Grid.build(cfg.plan, rank, world), torch.device("cpu"))
        try:
            t.step(0)
            t.engine.create_states()  # creates Adam states a skipped step left uncreated (fake data can overflow)
            got = {"params": 0, "grads": 0, "optimizer": 0, "host": 0,
                   **memory.model_state_bytes(t.engine.state_tensors())}
            got["host"] += t.pipe.last_memory.peak_host_bytes  # + offloaded activations
            got["activations"] = t.pipe.last_memory.peak_device_bytes
        finally:
            t.engine.remove()
    finally:
        dist.destroy_process_group()
    out = {r: float(got[r]) for r in (*ROLES[:-1], "host")}
    out["peak"] = sum(out[r] for r in ROLES[:-1])
    return out


def _chunks_per_rank(plan: Plan) -> int:
    """Pipeline chunks per rank, as parallel/pipeline.py `_virtual` reads them from the plan."""
    from perfmodel import schedules

    return plan.virtual_stages if plan.schedule == "interleaved" else schedules.chunks_per_rank(plan.schedule)


def most_loaded_rank(cfg: RunConfig) -> int:
    """The rank the prediction describes: coordinate 0 on every axis but pp, and there the
    pipeline rank holding the most layers of the runtime's split (perfmodel/split.py over the
    schedule's chunk placement, as parallel/pipeline.py `apply` builds it); at a tie the one
    holding the head (its logits), else the first."""
    from launch.grid import rank_of
    from perfmodel import schedules
    from perfmodel.split import split_layers

    plan = cfg.plan
    place = schedules.placement(plan.schedule, plan.pp, _chunks_per_rank(plan))  # chunk -> pp rank
    layers = split_layers(cfg.model, len(place), cfg.train.seq_len, plan.micro_batch_size)
    held = [sum(len(layers[c]) for c, r in enumerate(place) if r == pp) for pp in range(plan.pp)]
    head = place[-1]
    pp = max(range(plan.pp), key=lambda r: (held[r], r == head, -r))
    return rank_of(plan, {**{axis: 0 for axis in ("tp_col", "tp_row", "tp_depth", "cp", "dp")}, "pp": pp})


def dry_run(cfg: RunConfig, rank: int | None = None, build: bool = True) -> DryRun:
    """Measure (when `build`) and predict rank `rank` (default `most_loaded_rank`) of `cfg`'s layout."""
    check_plan(cfg)
    world = cfg.plan.world_size
    rank = most_loaded_rank(cfg) if rank is None else rank
    if not 0 <= rank < world:
        raise ConfigError(f"--rank {rank} is outside the layout's {world} ranks; pick 0..{world - 1}")
    predicted, buffers, overhead = predict(cfg, "cpu" if build else "cuda")
    measured = measure(cfg, rank) if build else None
    c = cfg.cluster
    return DryRun(rank, world, measured, predicted, buffers, overhead, float(c.hbm_bytes), float(c.host_bytes),
                  min(c.gpus_per_node, world))


def report(d: DryRun, title: str) -> str:
    """The table of measured / predicted bytes by role and the fit against the device."""
    lines = [title, f"{'role':<12} {'measured MiB':>14} {'predicted MiB':>14} {'ratio':>7}"]
    ratios = d.ratios()
    for role in (*ROLES, "host"):
        got = "-" if d.measured is None else f"{d.measured[role] / 2**20:.2f}"
        ratio = f"{ratios[role]:.3f}" if ratios else "-"
        lines.append(f"{role:<12} {got:>14} {d.predicted[role] / 2**20:>14.2f} {ratio:>7}")
    lines.append(f"predicted device peak {d.device_total / GiB:.2f} GiB = peak {d.predicted['peak'] / GiB:.2f} + buffers "
                 f"{d.buffers / GiB:.2f} (gathered weights) + overhead {d.overhead / GiB:.2f}; device "
                 f"{d.hbm_bytes / GiB:.2f} GiB: {_verdict(d.device_total, d.hbm_bytes)}")
    lines.append(f"predicted host per node {d.node_host / GiB:.2f} GiB = host {d.predicted['host'] / GiB:.2f} x "
                 f"{d.ranks_per_node} ranks; node {d.node_host_bytes / GiB:.2f} GiB: "
                 f"{_verdict(d.node_host, d.node_host_bytes)}")
    return "\n".join(lines)


def _verdict(need: float, have: float) -> str:
    return f"{'fits' if need <= have else 'DOES NOT FIT'} ({(have - need) / GiB:+.2f} GiB)"


def _parser() -> argparse.ArgumentParser:
    ap = Parser(prog="axon dry-run", description=__doc__.split("\n\n")[0] + " Settings as for axon train.",
                usage="axon dry-run [options] [key=value ...]")
    ap.add_argument("--rank", type=int, default=None, help="which rank of the layout to build (default: the "
                                                           "pipeline rank holding the most layers)")
    ap.add_argument("--predict-only", action="store_true", help="print the prediction and the fit; build nothing")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return ap


def main(argv: list[str]) -> int:
    return guarded("axon dry-run", _main, argv)


def _main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option(s) {' '.join(bad)}; see axon dry-run --help")
    with tempfile.TemporaryDirectory(prefix="axon-dry-run-") as tmp:
        cfg = freeze(load([*DEFAULTS, *overrides, f"run.dir={Path(tmp) / 'run'}"]))
        d = dry_run(cfg, args.rank, build=not args.predict_only)
    if args.json:
        print(json.dumps(d.to_dict(), indent=2))
    else:
        title = (f"{cfg.raw['model']['name']} ({cfg.model.n_layers} layers, width {cfg.model.d_model}), rank {d.rank} "
                 f"of {d.world} on {cfg.cluster.name}, {cfg.train.dtype}, batch {cfg.train.global_batch_size} x "
                 f"{cfg.train.seq_len}")
        print(report(d, title))
    return 0 if d.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
