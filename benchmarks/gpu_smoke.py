"""Check a GPU node in minutes: every GPU path of Axon once, each check in its own subprocess.

    .venv/bin/python benchmarks/gpu_smoke.py                    # one GPU, under 8 minutes
    .venv/bin/python benchmarks/gpu_smoke.py --cpu              # the same checks on CPU, small sizes
    .venv/bin/python benchmarks/gpu_smoke.py --cpu --shared-process   # ... all in one child process (CI)
    .venv/bin/python benchmarks/gpu_smoke.py --only sdpa_flash,ring_attention --out smoke.jsonl

A check that fails, crashes or hangs (`--timeout`) fails alone; the others still run. Each result
is one JSON line in `--out` (default runs/gpu_smoke/<date>.jsonl) and a row of the summary table:
pass | fail | skip (with the reason) | crash | timeout. Exit code 0 when nothing failed. Checks:
versions and bf16/flash support; NCCL init through `launch` (world size 1); SDPA flash attention
forward/backward; ring attention error and speed against SDPA; activation offload with the freed
device memory poisoned (NaN) before reload, gradients bitwise equal to no offload; optimizer
offload parity (ZeRO offload vs plain); checkpoint save/resume; a small Llama bf16 step (tokens/s,
MFU, allocator peak vs perfmodel); one rank of ZeRO-3 dp=8 and pp=4 1F1B over torch's fake
process group, measured memory vs predicted; GEMM layout tuning of a Llama-3-8B layer's shapes
(decisions and speed-ups over torch's layouts); every Triton kernel against its torch path, timed
against it eager, under torch.compile and against Liger-Kernel (benchmarks/gpu_smoke_kernels.py).
The model-level checks live in benchmarks/gpu_smoke_checks.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARK = "GPU_SMOKE_RESULT "  # the child's result line on stdout
CHECKS = ("versions", "nccl_init", "sdpa_flash", "ring_attention", "activation_offload", "optimizer_offload",
          "checkpoint_resume", "llama_step", "fake_zero3_dp8", "fake_pp4_1f1b", "gemm_tuning", "triton_kernels")


def run_all(names: list[str], cpu: bool, timeout_s: float, out: Path, shared: bool = False) -> list[dict]:
    """Run each check in a subprocess (`shared`: all of them in one, which saves a process start
    per check; CI on CPU); append each record to `out`; return the records."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        for group in [names] if shared else [[n] for n in names]:
            for record in _run_group(group, cpu, timeout_s * len(group), Path(tmp)):
                records.append(record)
                with out.open("a") as f:
                    f.write(json.dumps(record, default=str) + "\n")
                print(f"[gpu_smoke] {record['check']}: {record['status']} ({record['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
    return records


def _run_group(names: list[str], cpu: bool, timeout_s: float, tmp: Path) -> list[dict]:
    """The checks `names` one after another in one child process: a record per check, from its
    result line; a check without one crashed or timed out (with it, those after it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--check", ",".join(names), "--work", str(tmp)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    base = {"mode": "cpu" if cpu else "gpu", "time": datetime.datetime.now().isoformat()}
    try:
        done = subprocess.run(cmd + ["--cpu"] * cpu, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        stdout, stderr = done.stdout, done.stderr
        missing = {"status": "crash", "reason": f"exit code {done.returncode}, no result"}
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout or b""), _text(e.stderr or b"")
        missing = {"status": "timeout", "reason": f"no result within --timeout {timeout_s:g} s"}
    results = dict(json.loads(ln[len(MARK):]) for ln in stdout.splitlines() if ln.startswith(MARK))
    records = []
    for name in names:
        result = results.get(name)
        if result is None:
            result = {**missing, "seconds": time.monotonic() - t0, "stderr_tail": stderr[-2000:]}
        elif result["status"] == "fail":
            result["stderr_tail"] = stderr[-2000:]
        records.append({"check": name, **base, **result})
    return records


def _text(data: bytes | str) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def table(records: list[dict]) -> str:
    """The summary: one row per check with its status and its key figures or reason."""
    rows = [("check", "status", "s", "result")]
    for r in records:
        detail = r.get("reason") or ", ".join(f"{k}={_fmt(v)}" for k, v in (r.get("details") or {}).items())
        rows.append((r["check"], r["status"], f"{r['seconds']:.1f}", detail))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}  {d}" for a, b, c, d in rows)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def child(names: list[str], cpu: bool, work: Path) -> int:
    """Run the checks in this process, one after another, each printing its result line
    (`MARK` [name, result])."""
    from benchmarks import gpu_smoke_checks as checks

    for name in names:
        t0 = time.monotonic()
        (work / name).mkdir(parents=True)
        try:
            details = checks.run(name, checks.Ctx.make(cpu, work / name))
            result = {"status": "pass", "details": details}
        except checks.Skip as e:
            result = {"status": "skip", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - the check failed; report why, the parent goes on
            import traceback

            traceback.print_exc()
            result = {"status": "fail", "reason": f"{type(e).__name__}: {e}"[:500]}
        result["seconds"] = time.monotonic() - t0
        print(MARK + json.dumps([name, result], default=str), flush=True)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo and small sizes (CI)")
    p.add_argument("--only", default="", help=f"comma-separated checks (default: all of {', '.join(CHECKS)})")
    p.add_argument("--out", type=Path, default=None, help="JSON-lines results file (appended)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds one check may take")
    p.add_argument("--shared-process", action="store_true",
                   help="run every check in one child process (saves a process start per check; a crash "
                        "or hang ends the checks after it too, and memory peaks are the process's so far)")
    p.add_argument("--check", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check:
        return child(args.check.split(","), args.cpu, args.work)
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"--only: unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    if not args.cpu and not _gpu_visible():
        print("gpu_smoke: no GPU visible to torch: run on a GPU node with the GPU build (AXON_TORCH=cuda bash "
              "scripts/setup.sh), or pass --cpu", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "runs" / "gpu_smoke" / f"{stamp}-{'cpu' if args.cpu else 'gpu'}.jsonl"
    records = run_all(names, args.cpu, args.timeout, out, args.shared_process)
    print(table(records))
    print(f"results: {out}", file=sys.stderr)
    return 0 if all(r["status"] in ("pass", "skip") for r in records) else 1


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
