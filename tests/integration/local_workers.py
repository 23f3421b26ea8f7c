"""Finding the workers a local `axon train launch.nproc_per_node=N` started, for tests that signal
or kill one rank (not a test module: test files import it)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the local workers started by `parent` (read from each child's RANK=)."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # exited between pgrep and the read
        ranks.update({int(item[5:]): pid for item in env if item.startswith(b"RANK=")})
    return ranks
