"""The checks of benchmarks/gpu_smoke.py, one function each; every one runs in a fresh process.

A check returns a dict of figures (pass), raises `Skip(reason)` when it cannot run here, or raises
any other exception (fail). `Ctx` carries the mode: on GPU the device is cuda:0, bf16 and sizes
that take seconds on an H100/H200; with --cpu the device is the CPU, fp32 and small sizes.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F


class Skip(Exception):
    """The check cannot run in this mode; the message says why."""


@dataclass(frozen=True)
class Ctx:
    cpu: bool
    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16 on GPU, fp32 on CPU
    work: Path  # this check's scratch directory

    @classmethod
    def make(cls, cpu: bool, work: Path) -> "Ctx":
        device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        if not cpu:
            torch.cuda.set_device(device)
        return cls(cpu, device, torch.float32 if cpu else torch.bfloat16, work)

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize(self.device)


def run(name: str, ctx: Ctx) -> dict[str, Any]:
    from benchmarks import gpu_smoke_kernels, gpu_smoke_train

    table: dict[str, Callable[[Ctx], dict[str, Any]]] = {
        "versions": versions, "nccl_init": nccl_init, "sdpa_flash": sdpa_flash, "ring_attention": ring_attention,
        "activation_offload": activation_offload, "optimizer_offload": gpu_smoke_train.optimizer_offload,
        "checkpoint_resume": gpu_smoke_train.checkpoint_resume, "llama_step": gpu_smoke_train.llama_step,
        "fake_zero3_dp8": gpu_smoke_train.fake_zero3_dp8, "fake_pp4_1f1b": gpu_smoke_train.fake_pp4_1f1b,
        "gemm_tuning": gemm_tuning, "triton_kernels": gpu_smoke_kernels.triton_kernels}
    return table[name](ctx)


def timed(ctx: Ctx, fn: Callable[[], Any], iters: int) -> float:
    """Mean seconds of `fn` after one warm-up call."""
    fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / iters


def versions(ctx: Ctx) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "hip": getattr(torch.version, "hip", None), "python": platform.python_version()}
    if ctx.cpu:
        return {**info, "device": platform.processor() or platform.machine(), "bf16": True}
    p = torch.cuda.get_device_properties(ctx.device)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                bf16=torch.cuda.is_bf16_supported(), flash=torch.backends.cuda.is_flash_attention_available())
    if torch.version.cuda:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    if not info["bf16"]:
        raise RuntimeError(f"{p.name} has no bf16 support: train.dtype=auto would fall back; use train.dtype=fp32")
    return info


def nccl_init(ctx: Ctx) -> dict[str, Any]:
    """The default group through launch.dist (NCCL bound to the device on GPU, gloo on CPU), one
    all-reduce and a barrier on it, and a Grid's subgroups with the job's timeout."""
    import torch.distributed as dist

    from launch import dist as launch_dist
    from launch.env import detect
    from launch.grid import Grid
    from perfmodel.specs import Plan

    env = detect({})  # one process, world size 1
    backend = launch_dist.init(env, "gloo" if ctx.cpu else "nccl", None)
    try:
        timeout_s = launch_dist.timeout_for(backend, None)
        x = torch.ones(1 << 20, device=ctx.device)
        dist.all_reduce(x)
        dist.barrier()
        grid = Grid.build(Plan(), 0, 1, timeout_s=timeout_s)
        y = torch.full((8,), 2.0, device=ctx.device)
        dist.all_reduce(y, group=grid.group("dp", "cp").group)
        ctx.sync()
        if x.sum().item() != x.numel() or y.sum().item() != 16.0:
            raise RuntimeError("all-reduce over one rank changed the data")
        return {"backend": backend, "timeout_s": timeout_s, "device": str(ctx.device)}
    finally:
        launch_dist.shutdown()


def _qkv(ctx: Ctx, b: int, h: int, s: int, d: int, hkv: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(b, h, s, d), (b, hkv or h, s, d), (b, hkv or h, s, d)]
    return [torch.randn(sh, generator=g).to(ctx.device, ctx.dtype).requires_grad_() for sh in shapes]


def _fwd_bwd(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in tensors]


def _tolerance(ctx: Ctx) -> float:
    """Relative error allowed against the fp32 math kernel. fp32: 1e-4, since tiled online softmax
    sums in another order than the math kernel and lands at 1e-6..2e-5 depending on the CPU's SIMD
    width (a wrong mask or scale gives 1e-1); bf16: 2e-2 (8 mantissa bits)."""
    return 1e-4 if ctx.dtype == torch.float32 else 2e-2


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def sdpa_flash(ctx: Ctx) -> dict[str, Any]:
    """Causal SDPA forced onto the flash kernel, forward and backward, against the math kernel in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = (2, 4, 256, 64) if ctx.cpu else (4, 16, 4096, 128)
    q, k, v = _qkv(ctx, b, h, s, d)
    dout = torch.randn_like(q)

    def flash(*t: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*t, is_causal=True)

    got = _fwd_bwd(flash, [q, k, v], dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = _fwd_bwd(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), ref_in, dout.float())
    errs = {n: _rel_err(a, r) for n, a, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    tol = _tolerance(ctx)
    if max(errs.values()) > tol:
        raise RuntimeError(f"flash attention vs math: relative errors {errs} exceed {tol}")
    sec = timed(ctx, lambda: _fwd_bwd(flash, [q, k, v], dout), 3 if ctx.cpu else 10)
    flops = 4 * b * h * s * s * d / 2 * 3.5  # causal: half the square; fwd + bwd = 3.5 x fwd matmuls
    return {**{f"err_{n}": e for n, e in errs.items()}, "ms": sec * 1e3, "tflops": flops / sec / 1e12,
            "shape": f"{b}x{h}x{s}x{d} {str(ctx.dtype).removeprefix('torch.')}"}


def ring_attention(ctx: Ctx) -> dict[str, Any]:
    """parallel/ring_attention.py on one device (cp=1: its block math, merge and backward, no
    exchange) against SDPA: error against the fp32 math kernel and time against SDPA's best
    kernel. Multi-rank parity is tests/distributed/test_context.py's."""
    from parallel.ring_attention import Ring, RingAttention

    b, hq, hkv, s, d = (2, 4, 2, 256, 32) if ctx.cpu else (2, 16, 4, 4096, 128)
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in _qkv(ctx, b, hq, s, d, hkv))  # [B, S, H, hd]
    dout = torch.randn_like(q)
    ring = Ring(1, 0, (0,), None)
    got = _fwd_bwd(lambda *t: RingAttention.apply(*t, ring), [q, k, v], dout)

    def sdpa(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        rep = hq // hkv
        kk, vv = (x.repeat_interleave(rep, dim=2) for x in (kk, vv))
        out = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = _fwd_bwd(sdpa, ref_in, dout.float())
    errs = {n: _rel_err(a, r) for n, a, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    tol = _tolerance(ctx)
    if max(errs.values()) > tol:
        raise RuntimeError(f"ring attention vs SDPA: relative errors {errs} exceed {tol}")
    iters = 2 if ctx.cpu else 5
    t_ring = timed(ctx, lambda: _fwd_bwd(lambda *t: RingAttention.apply(*t, ring), [q, k, v], dout), iters)
    t_sdpa = timed(ctx, lambda: _fwd_bwd(sdpa, [q, k, v], dout), iters)
    return {**{f"err_{n}": e for n, e in errs.items()}, "ring_ms": t_ring * 1e3, "sdpa_ms": t_sdpa * 1e3,
            "ring_vs_sdpa": t_ring / t_sdpa}


def gemm_tuning(ctx: Ctx) -> dict[str, Any]:
    """GEMM layout tuning (kernels/gemm.py, kernels/gemm_tuning.py): the 8 formulations of the forward, input- and
    weight-gradient GEMMs of a Llama-3-8B layer's Linear shapes (d 4096, d_ff 14336, 8 KV heads;
    2048 and 8192 tokens) timed in bf16; the decisions with their speed-ups over torch's layouts
    (`decisions`, where the layout differs: "role MxNxK form speed-up"), the layer's GEMM time
    torch's / chosen, and a Linear
    computing with the table checked against F.linear. --cpu: two small shapes, fp32."""
    from kernels import gemm, gemm_tuning

    if ctx.cpu:
        shapes = {(256, 96, 64), (64, 200, 48)}
        counts = dict.fromkeys(shapes, 1)
    else:
        layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
        counts = {}
        for m in (2048, 8192):
            for n, k in layer:
                counts[(m, n, k)] = counts.get((m, n, k), 0) + 1
    table = gemm_tuning.GemmTable(gemm_tuning.device_key(ctx.device))
    t0 = time.perf_counter()
    table.tune(counts, ctx.device, ctx.dtype, warmup=2 if ctx.cpu else 3, reps=5 if ctx.cpu else 10)
    tune_s = time.perf_counter() - t0
    decided, differ, ours, torchs = table.decisions(), [], 0.0, 0.0
    for (role, m, n, k, dt), form in sorted(decided.items()):
        times = table.times[(table.device, table.version, (role, m, n, k, dt))]
        default = times[gemm.DEFAULT[role]]
        if form != gemm.DEFAULT[role]:
            differ.append(f"{role} {m}x{n}x{k} {form} {default / times[form]:.2f}")
        ours, torchs = ours + counts[(m, n, k)] * times[form], torchs + counts[(m, n, k)] * default
    m, n, k = min(counts)
    x = torch.randn(m, k, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    w = torch.randn(n, k, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(m, n, device=ctx.device, dtype=ctx.dtype)
    got = _fwd_bwd(lambda a, b: gemm.linear(a, b, None, table), [x, w], dy)
    ref = _fwd_bwd(F.linear, [x, w], dy)
    errs = {name: _rel_err(a, r) for name, a, r in zip(("y", "dx", "dw"), got, ref)}
    if max(errs.values()) > _tolerance(ctx):
        raise RuntimeError(f"tuned Linear vs F.linear: relative errors {errs} exceed {_tolerance(ctx)}")
    return {"device_key": table.device, "tune_s": tune_s, "decided": len(decided), "differ": len(differ),
            "gemm_time_torch_over_chosen": torchs / ours, **{f"err_{k}": v for k, v in errs.items()},
            "decisions": differ}


def activation_offload(ctx: Ctx) -> dict[str, Any]:
    """PipeOffload's store: gradients with the saved activations moved to the host, the freed
    device memory filled with NaN, and reloaded, must equal (bitwise) those without offload."""
    torch.manual_seed(0)
    d, n = (64, 32) if ctx.cpu else (2048, 4096)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                                      torch.nn.Linear(4 * d, d)) for _ in range(4)])
    model = model.to(ctx.device, ctx.dtype)
    x = torch.randn(n, d, device=ctx.device, dtype=ctx.dtype)
    plain, _ = _grads_with_store(ctx, model, x, offload=False)
    offloaded, stats = _grads_with_store(ctx, model, x, offload=True)
    same = all(torch.equal(a, b) for a, b in zip(plain, offloaded))
    finite = all(bool(torch.isfinite(g).all()) for g in offloaded)
    if not (same and finite):
        raise RuntimeError(f"offloaded gradients differ from plain ones (bitwise equal: {same}, finite: {finite})")
    if stats.offloaded_bytes == 0:
        raise RuntimeError("nothing was offloaded: the saved-tensor hooks did not see the activations")
    return {"offloaded_mib": stats.offloaded_bytes / 2**20, "bitwise_equal": same}


def _grads_with_store(ctx: Ctx, model: torch.nn.Module, x: torch.Tensor, offload: bool) -> tuple[list, Any]:
    from parallel.activation_offload import ActivationStore

    params = list(model.parameters())
    for p in params:
        p.grad = None
    store = ActivationStore(ctx.device, params)
    key = (0, 0)
    with store.saving(key):
        loss = model(x).float().pow(2).mean()
    if offload:
        sizes = [s.nbytes for s in store._entries.get(key, [])]  # what the offload frees on the device
        store.offload(key)
        _poison(ctx, sizes)
        store.reload(key)
    loss.backward()
    store.release(key)
    return [p.grad.clone() for p in params], store.stats


def _poison(ctx: Ctx, sizes: list[int]) -> None:
    """Fill memory blocks of the freed sizes with NaN and free them again: the caching allocator
    hands the same blocks to the reload buffers, so a reload that is read before its copy lands
    shows NaN in the gradients."""
    ctx.sync()
    junk = [torch.full((max(1, n // 4),), math.nan, device=ctx.device, dtype=torch.float32) for n in sizes]
    ctx.sync()
    del junk


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
