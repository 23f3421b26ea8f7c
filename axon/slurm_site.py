"""What a centre's Slurm template needs beyond the generic job (`axon submit`): the backend the job
must run (NCCL/RCCL on a GPU cluster preset, so it never falls back to gloo inside a GPU
allocation), Frontier's rocm module pinned to torch's ROCm and its aws-ofi-rccl plugin, Alps's
uenv or container that provides aws-ofi-nccl. Checked before anything is queued; every error
names the setting to change.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any, Optional

from launch.dist import CPU_CLUSTERS, check_cluster

GPU_TEMPLATES = ("perlmutter", "frontier", "alps")
OLCF_RCCL_PLUGIN = "https://docs.olcf.ornl.gov/software/python/pytorch_frontier.html#aws-ofi-rccl-plugin"


class SiteError(ValueError):
    """A centre setting that cannot work; the message names it and the fix."""


@dataclass(frozen=True)
class Site:
    backend: str  # the job's launch.backend: nccl (RCCL on ROCm) on GPU presets, else as configured
    rocm: Optional[str] = None
    net_plugin: Optional[str] = None
    uenv: Optional[str] = None
    uenv_view: Optional[str] = None
    container: Optional[str] = None

    def quoted(self) -> dict[str, Any]:
        """The values shell-quoted, for the templates."""
        return {k: v if v is None else shlex.quote(str(v)) for k, v in asdict(self).items()}


def site_of(slurm: Any, cluster: str, backend: str, template: str, nodes: int, hip: Optional[str]) -> Site:
    """The checked site settings; `slurm` is the config's slurm node, `hip` torch.version.hip here."""
    gpu = cluster not in CPU_CLUSTERS
    if template in GPU_TEMPLATES and not gpu:
        raise SiteError(f"slurm.template={template} runs on GPU nodes but cluster={cluster} describes CPUs: "
                        f"set cluster={template}")
    backend = ("nccl" if gpu else "gloo") if backend == "auto" else backend
    check_cluster(backend, cluster)
    site = Site(backend, slurm.rocm, slurm.net_plugin, slurm.uenv, slurm.uenv_view, slurm.container)
    if template == "frontier":
        _check_frontier(site, nodes, hip)
    if site.uenv and site.container:
        raise SiteError("slurm.uenv and slurm.container both set: the job runs in one of them; unset one")
    if (site.uenv or site.container) and template != "alps":
        raise SiteError(f"slurm.uenv / slurm.container are for the alps template, not {template}: "
                        "use slurm.setup for other environments")
    return site


def _check_frontier(site: Site, nodes: int, hip: Optional[str]) -> None:
    if site.rocm is None or not re.fullmatch(r"\d+\.\d+(\.\d+)?", site.rocm):
        have = f" (torch here is built for ROCm {_major_minor(hip)})" if hip else ""
        raise SiteError(f"slurm.rocm={site.rocm}: set the version of Frontier's rocm module the job loads "
                        f"(`module avail rocm`), with the same X.Y as torch's ROCm{have}, e.g. slurm.rocm=6.2.4")
    if hip and _major_minor(site.rocm) != _major_minor(hip):
        raise SiteError(f"slurm.rocm={site.rocm} but torch here is built for ROCm {_major_minor(hip)}: load the "
                        f"matching module (slurm.rocm={_major_minor(hip)}.x) or reinstall torch with "
                        f"AXON_TORCH=rocm AXON_ROCM={_major_minor(site.rocm)} bash scripts/setup.sh")
    if nodes > 1 and not site.net_plugin:
        raise SiteError("slurm.net_plugin is unset: between Frontier nodes RCCL needs the aws-ofi-rccl plugin "
                        f"(else it falls back to TCP sockets); build it as OLCF documents ({OLCF_RCCL_PLUGIN}) "
                        "and set slurm.net_plugin=<its lib directory>")


def torch_hip() -> Optional[str]:
    """The ROCm version this process's torch was built for (None: a CUDA or CPU build)."""
    import torch

    return getattr(torch.version, "hip", None)


def _major_minor(version: Optional[str]) -> str:
    return ".".join((version or "").split(".")[:2])


def backend_override(site: Site, overrides: list[str]) -> list[str]:
    """`launch.backend=<site.backend>` for the trainer unless the overrides set it already."""
    if any(o.lstrip("+~").partition("=")[0] == "launch.backend" for o in overrides):
        return []
    return [] if site.backend == "gloo" else [f"launch.backend={site.backend}"]
