"""Start several real processes at once and wait for all of them (not a test module: test files
import it). A process's start is mostly one core importing torch, so side by side on two cores
a module's processes take about half the time they take one after another."""
from __future__ import annotations

import subprocess
from typing import Any, Hashable


def run_together(cmds: dict[Hashable, list[str]], timeout: float, **popen: Any
                 ) -> dict[Hashable, subprocess.CompletedProcess]:
    """key -> the finished process (returncode, stdout, stderr as text) of each command, all
    started before any is waited for; every process still running is killed on the way out
    (a timeout raises subprocess.TimeoutExpired). `popen`: Popen's keyword arguments (cwd, env)."""
    procs = {key: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for key, cmd in cmds.items()}
    done = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done
