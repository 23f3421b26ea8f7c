"""Which torch build to install (cpu | cuda | rocm) and from which package index.

Standard library only: scripts/setup.sh runs it with the interpreter of a fresh virtual
environment, before torch exists:

    python -m launch.torch_build --request "$AXON_TORCH" --rocm "$AXON_ROCM"   # prints: build index reason

`choose` is pure (the hardware arrives as a `Probe`), so the decision is tested with mocked
probes; `probe` reads this node. Set-up inputs (README, "Set-up"): AXON_TORCH=cpu|cuda|rocm
(empty = detect from this node's GPUs) and AXON_ROCM=X.Y (the ROCm of the cluster's `rocm`
module; default: the version installed under ROCM_PATH or /opt/rocm). Detection only sees GPUs
where set-up runs: on a login node, say which build the compute nodes need.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

BUILDS = ("cpu", "cuda", "rocm")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROCM_INDEX = "https://download.pytorch.org/whl/rocm{version}"
PYPI = "pypi"  # PyPI's default torch: the CUDA build on Linux x86_64 and aarch64 (GH200)


@dataclass(frozen=True)
class Probe:
    """What this node shows: its architecture, NVIDIA GPUs (nvidia-smi -L), AMD GPUs (rocm-smi or
    /dev/kfd) and the installed ROCm version (X.Y, None if unknown)."""

    machine: str
    nvidia_gpus: int
    amd_gpu: bool
    rocm_version: Optional[str]


@dataclass(frozen=True)
class Choice:
    build: str  # cpu | cuda | rocm
    index: str  # a package index URL, or PYPI
    reason: str


def choose(probe: Probe, request: str = "", rocm: str = "") -> Choice:
    """The build for `request` ('' = detect) on `probe`'s node; ValueError naming the fix."""
    request = request.strip().lower()
    if request and request not in BUILDS:
        raise ValueError(f"AXON_TORCH={request!r} is not one of {'|'.join(BUILDS)} (or empty to detect)")
    if request == "" and probe.nvidia_gpus > 0:
        request, why = "cuda", f"{probe.nvidia_gpus} NVIDIA GPU(s) visible (nvidia-smi)"
    elif request == "" and probe.amd_gpu:
        request, why = "rocm", "an AMD GPU visible (rocm-smi or /dev/kfd)"
    elif request == "":
        request, why = "cpu", ("no GPU visible on this node; on a login node set AXON_TORCH=cuda "
                               "(or rocm) for the compute nodes")
    else:
        why = f"AXON_TORCH={request}"
    if request == "cpu":
        return Choice("cpu", CPU_INDEX, why)
    if probe.machine not in ("x86_64", "aarch64"):
        raise ValueError(f"AXON_TORCH={request}: PyTorch publishes GPU builds for Linux x86_64 and aarch64, "
                         f"not {probe.machine}; use AXON_TORCH=cpu")
    if request == "cuda":
        return Choice("cuda", PYPI, f"{why}; PyPI's CUDA build for {probe.machine}")
    version = (rocm or probe.rocm_version or "").strip()
    if not re.fullmatch(r"\d+\.\d+", version):
        raise ValueError("AXON_TORCH=rocm needs the cluster's ROCm version: set AXON_ROCM=X.Y to the version "
                         "of the rocm module the jobs load (e.g. AXON_ROCM=6.4)"
                         + (f"; got {version!r}" if version else ""))
    if probe.machine != "x86_64":
        raise ValueError(f"AXON_TORCH=rocm: PyTorch publishes ROCm builds for x86_64 only, not {probe.machine}")
    return Choice("rocm", ROCM_INDEX.format(version=version), f"{why}; ROCm {version}")


def probe() -> Probe:
    """This node's hardware, read from nvidia-smi, rocm-smi, /dev/kfd and the ROCm install."""
    return Probe(platform.machine(), _nvidia_gpus(), _amd_gpu(), _rocm_version())


def _run(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _nvidia_gpus() -> int:
    out = _run(["nvidia-smi", "-L"])
    return sum(1 for line in (out or "").splitlines() if line.startswith("GPU "))


def _amd_gpu() -> bool:
    return os.path.exists("/dev/kfd") or _run(["rocm-smi", "--showid"]) is not None


def _rocm_version() -> Optional[str]:
    roots = [os.environ.get("ROCM_PATH", ""), "/opt/rocm"] + sorted(glob.glob("/opt/rocm-*"), reverse=True)
    for root in filter(None, roots):
        try:
            with open(os.path.join(root, ".info", "version")) as f:
                m = re.match(r"(\d+\.\d+)", f.read().strip())
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.torch_build", description=__doc__.split("\n")[0])
    parser.add_argument("--request", default="", help="cpu | cuda | rocm; empty = detect (AXON_TORCH)")
    parser.add_argument("--rocm", default="", help="ROCm version X.Y for the rocm build (AXON_ROCM)")
    args = parser.parse_args(argv)
    try:
        c = choose(probe(), args.request, args.rocm)
    except ValueError as e:
        print(f"[setup] {e}", file=sys.stderr)
        return 2
    print(c.build, c.index, c.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
