"""`axon submit [--dry] [overrides]`: render a Slurm batch script for a training job and sbatch it.

    axon submit cluster=perlmutter slurm.nodes=16 slurm.account=m1234 model=llama3-8b parallel=auto
    axon submit --dry cluster=frontier slurm.nodes=2 slurm.account=abc123 model=tiny parallel.dp=16

The script comes from `slurm/<template>.sbatch.j2` (`slurm.template`, else the cluster preset's
own template, else `generic`); per-cluster launch details (modules, NCCL/RCCL/libfabric variables,
srun binding) live in those templates, not here. The job runs `srun <this python> -m axon.train
<the overrides> run.dir=<absolute> checkpoint.resume=auto` from the submitting directory, so a
requeued job (preemption, time limit) resumes from its last checkpoint. Every value is
shell-quoted; values on `#SBATCH` lines may not contain line breaks. The layout is checked (or,
for `parallel=auto`, chosen by the performance model) before anything is queued, and the chosen
plan is written into the script as explicit `parallel.*` overrides. `<run.dir>` receives the
script (`submit.sbatch`), `submit.json` (job id, plan, settings) and the log `slurm-<job id>.out`;
`--dry` writes the script and submit.json (job id null) and queues nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import jinja2
from omegaconf import DictConfig

from axon.config import freeze, load
from axon.errors import Parser, guarded
from perfmodel.specs import Plan

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SubmitError(ValueError):
    """A setting `axon submit` cannot turn into a valid job; the message names it."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything a template needs, validated; `overrides` are the trainer's, not yet quoted."""

    template: str
    run_name: str
    run_dir: str  # absolute
    workdir: str  # absolute; the job starts here (the submitting directory)
    python: str  # the interpreter that runs axon.train
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    account: Optional[str]
    partition: Optional[str]
    qos: Optional[str]
    constraint: Optional[str]
    extra_sbatch: tuple[str, ...]
    setup: tuple[str, ...]
    signal_s: int
    requeue: bool
    overrides: tuple[str, ...]
    plan: dict[str, Any]
    estimate: Optional[dict[str, Any]]  # the performance model's estimate when parallel=auto
    site: Any = None  # axon.slurm_site.Site: backend and centre settings (None: gloo, no centre settings)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def time_limit_s(value: str) -> int:
    """Seconds in a Slurm time limit such as '30', '1:30:00' or '2-00:00:00'."""
    m = _TIME.match(value.strip())
    if m is None:
        raise SubmitError(f"slurm.time={value!r} is not a Slurm time limit (e.g. 30, 01:30:00, 1-12:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def template_name(cfg: DictConfig) -> str:
    """`slurm.template`, else the template named after the cluster preset, else `generic`."""
    if cfg.slurm.template:
        name = str(cfg.slurm.template)
        if not (TEMPLATE_DIR / f"{name}.sbatch.j2").is_file():
            known = sorted(p.name.removesuffix(".sbatch.j2") for p in TEMPLATE_DIR.glob("*.sbatch.j2")
                           if p.name != "base.sbatch.j2")
            raise SubmitError(f"slurm.template={name!r} has no slurm/{name}.sbatch.j2; known: {known}")
        return name
    cluster = str(cfg.cluster.name)
    return cluster if (TEMPLATE_DIR / f"{cluster}.sbatch.j2").is_file() else "generic"


def build_job(cfg: DictConfig, overrides: list[str], python: str, workdir: Path) -> SlurmJob:
    """Validate the job's settings and resolve its layout (the same way `axon train` will)."""
    from axon.train import resolve_plan  # imports torch; kept out of `import axon.submit`

    s = cfg.slurm
    for key in ("nodes", "signal_s"):
        if int(s[key]) < 1:
            raise SubmitError(f"slurm.{key}={s[key]} must be >= 1")
    gpus = int(cfg.cluster.gpus_per_node if s.gpus_per_node is None else s.gpus_per_node)
    tasks = int(gpus if s.tasks_per_node is None else s.tasks_per_node)
    if tasks < 1:
        raise SubmitError(f"{tasks} tasks per node: set slurm.tasks_per_node (CPU jobs) or slurm.gpus_per_node")
    if s.signal_s >= time_limit_s(str(s.time)):
        raise SubmitError(f"slurm.signal_s={s.signal_s} must be shorter than slurm.time={s.time} "
                          "so the job can checkpoint before its time limit")
    if cfg.checkpoint.resume != "auto":
        raise SubmitError(f"checkpoint.resume={cfg.checkpoint.resume} cannot be used with axon submit: the job "
                          "always resumes from its own run.dir (checkpoint.resume=auto) so a requeue continues "
                          "it; copy the checkpoint into <run.dir>/checkpoints/ instead")
    run_dir = Path(cfg.run.dir or Path("runs") / cfg.run.name)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    if re.search(r"['\\$]", str(run_dir)):
        raise SubmitError(f"run.dir={str(run_dir)!r} contains a quote, backslash or '$', which the trainer's "
                          "command line cannot carry unchanged; choose another run.dir (or run.name)")
    run_cfg = replace(freeze(cfg), run_dir=run_dir)
    run_cfg, plan_info = resolve_plan(run_cfg, tasks * int(s.nodes), overrides)
    trainer_overrides = [o for o in overrides if not _consumed_here(o, run_cfg.auto_plan)]
    if run_cfg.auto_plan:
        trainer_overrides += plan_overrides(run_cfg.plan)
    from axon.slurm_site import backend_override, site_of, torch_hip

    site = site_of(s, str(cfg.cluster.name), str(cfg.launch.backend), template_name(cfg), int(s.nodes), torch_hip())
    trainer_overrides += backend_override(site, trainer_overrides)  # a GPU preset runs NCCL/RCCL, never gloo
    job = SlurmJob(
        template=template_name(cfg), run_name=str(cfg.run.name), run_dir=str(run_dir), workdir=str(workdir),
        python=python, nodes=int(s.nodes), tasks_per_node=tasks, gpus_per_node=gpus, time=str(s.time),
        account=s.account, partition=s.partition, qos=s.qos, constraint=s.constraint,
        extra_sbatch=tuple(str(x) for x in s.extra_sbatch), setup=tuple(str(x) for x in s.setup),
        signal_s=int(s.signal_s), requeue=bool(s.requeue), overrides=tuple(trainer_overrides),
        plan=run_cfg.plan.to_dict(), estimate=plan_info.get("estimate"), site=site)
    _check_header_values(job)
    return job


def _consumed_here(override: str, auto: bool) -> bool:
    """Overrides the script does not pass on: slurm.*, run.dir and checkpoint.resume (the script
    sets both), and with parallel=auto every parallel setting (replaced by the chosen plan)."""
    key = override.lstrip("+~").partition("=")[0]
    return (key.startswith("slurm.") or key in ("slurm", "run.dir", "checkpoint.resume")
            or (auto and (key == "parallel" or key.startswith("parallel."))))


def plan_overrides(plan: Plan) -> list[str]:
    """The plan as explicit `parallel.*` overrides (auto off), so the job runs exactly this layout."""
    flat = {k: v for k, v in plan.to_dict().items() if k != "offload"}
    flat.update({f"offload.{k}": v for k, v in plan.to_dict()["offload"].items()})
    return [f"parallel.{k}={_hydra_value(v)}" for k, v in flat.items()]


def hydra_quote(value: str) -> str:
    """`value` as a Hydra override value that parses back to itself (quoted when it must be)."""
    if re.fullmatch(r"[\w./:@%+-]+", value):
        return value
    return f"'{value}'"


def _hydra_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_header_values(job: SlurmJob) -> None:
    """Values on `#SBATCH` lines are quoted, but a line break would end the header and start shell
    code, so none may contain one."""
    fields = {"run.name": job.run_name, "run.dir": job.run_dir, "working directory": job.workdir,
              "slurm.time": job.time, "slurm.account": job.account, "slurm.partition": job.partition,
              "slurm.qos": job.qos, "slurm.constraint": job.constraint,
              **{f"slurm.extra_sbatch[{i}]": line for i, line in enumerate(job.extra_sbatch)}}
    for name, value in fields.items():
        if value is not None and re.search(r"[\r\n\0]", value):
            raise SubmitError(f"{name}={value!r} contains a line break, which would end the #SBATCH header")
    for i, line in enumerate(job.extra_sbatch):
        if not line.startswith("-"):
            raise SubmitError(f"slurm.extra_sbatch[{i}]={line!r} must be an sbatch option such as "
                              "'--mail-type=END' (the '#SBATCH ' prefix is added)")


def render(job: SlurmJob) -> str:
    """The batch script for `job`."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
                             autoescape=False)
    q = shlex.quote
    values = {**asdict(job),
              "run_name": q(job.run_name), "run_dir": q(job.run_dir), "workdir": q(job.workdir),
              "python": q(job.python), "account": job.account and q(job.account),
              "partition": job.partition and q(job.partition), "qos": job.qos and q(job.qos),
              "constraint": job.constraint and q(job.constraint),
              "overrides": [q(o) for o in job.overrides],
              "run_dir_override": q(f"run.dir={hydra_quote(job.run_dir)}"),
              "site": job.site.quoted() if job.site is not None else {}}
    return env.get_template(f"{job.template}.sbatch.j2").render(**values)


def submit(job: SlurmJob, script: str) -> str:
    """Write the script and submit.json into run.dir, sbatch the script; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch is not on PATH: run axon submit on a Slurm login node "
                          "(or `axon submit --dry ...` to only print the script)")
    path = write_files(job, script, None)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused the job (script kept at {path}): {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    write_files(job, script, job_id)
    return job_id


def write_files(job: SlurmJob, script: str, job_id: Optional[str]) -> Path:
    """<run.dir>/submit.sbatch and submit.json (job_id null for --dry); returns the script's path."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens the log there before the job starts
    path = run_dir / "submit.sbatch"
    path.write_text(script)
    log = str(run_dir / f"slurm-{job_id}.out") if job_id else None
    record = {"job_id": job_id, "script": str(path), "log": log, **asdict(job)}
    (run_dir / "submit.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def main(argv: list[str]) -> int:
    return guarded("axon submit", _main, argv)


def _main(argv: list[str]) -> int:
    parser = Parser(prog="axon submit", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings as for axon train (axon train --help lists them, slurm.* included).")
    parser.add_argument("--dry", action="store_true", help="print the batch script and write it with submit.json "
                        "into run.dir instead of submitting it")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for axon train")
    args = parser.parse_args(argv)
    cfg = load(args.overrides)
    job = build_job(cfg, args.overrides, python=sys.executable, workdir=Path.cwd())
    check_job(cfg, job)
    script = render(job)
    if args.dry:
        print(script, end="")
        path = write_files(job, script, None)
        print(f"axon submit: dry run, nothing queued; wrote {path} and {path.with_name('submit.json')}\n"
              f"{pick_summary(job)}", file=sys.stderr)
        return 0
    job_id = submit(job, script)
    print(job_id)
    print(f"axon submit: job {job_id}; log {job.run_dir}/slurm-{job_id}.out\n{pick_summary(job)}", file=sys.stderr)
    return 0


def check_job(cfg: DictConfig, job: SlurmJob) -> None:
    """What `axon train` checks before it starts (axon/preflight.py: run.name and run.dir, the data
    files, the checkpoint it would resume, memory), on this machine's file system, before anything
    is written or queued; a CPU node's memory is the cluster preset's cluster.host_bytes."""
    from axon import preflight

    run_cfg = replace(freeze(cfg), run_dir=Path(job.run_dir), plan=Plan.from_dict(job.plan))
    preflight.check(run_cfg, job.world_size, job.estimate, local_ranks=job.tasks_per_node,
                    host_bytes=run_cfg.cluster.host_bytes)


def pick_summary(job: SlurmJob) -> str:
    """The job and its layout (the performance model's pick for parallel=auto) in a few lines."""
    from axon.tune import knobs, layout_name

    plan = Plan.from_dict(job.plan)
    lines = [f"  job:    {job.nodes} node(s) x {job.tasks_per_node} tasks = {job.world_size} ranks, "
             f"time {job.time}, template {job.template}",
             f"  plan:   {layout_name(plan)} | {knobs(plan)}"]
    if job.estimate:
        e = job.estimate
        mem = (e.get("memory") or {}).get("total", 0) / 2**30
        lines.append(f"  model's estimate: {e['step_time_s']:.3f} s/step, {e['tokens_per_s']:,.0f} tokens/s, "
                     f"MFU {e['mfu']:.1%}, {mem:.2f} GiB per device")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
