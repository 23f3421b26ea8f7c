"""Data-parallel peers of `axon train` built from PyTorch's own parallelism (benchmarks/e2e_vs_torch.py).

    .venv/bin/python -m benchmarks.e2e_peers.ddp_fsdp --variant ddp --world 4 --out /tmp/ddp.json

Variants (every rank: Axon's model and init, the rank's contiguous slice of Axon's global batch,
micro-batches of shape.micro_batch accumulated, loss / global tokens, global-norm clip, Axon's AdamW):
    ddp               DistributedDataParallel (defaults), no_sync on all but the last micro-batch
    ddp_zero1         DDP + torch.distributed.optim.ZeroRedundancyOptimizer (ZeRO-1: AdamW states sharded)
    fsdp_noreshard    FSDP2 fully_shard per Block + root, reshard_after_forward=False, gradient
                      reduce-scatter every micro-batch (ZeRO-2: gradients and states sharded, params
                      kept gathered from forward to backward)
    fsdp_noreshard_acc  the same, gradients accumulated unsharded and reduce-scattered once per step
                      (set_requires_gradient_sync on the last micro-batch only: ZeRO-1-like traffic)
    fsdp              FSDP2 defaults (reshard_after_forward=True: ZeRO-3), reduce-scatter every micro-batch
FSDP2 sums gradients (divide factor 1, SUM reductions, as Axon); DDP averages them (the loss is
scaled by the world size so the update is the same).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.e2e_peers.common import Batches, Shape, WithLoss, global_loss, main, model, optimizer, set_lr, timed_loop

VARIANTS = ("ddp", "ddp_zero1", "fsdp_noreshard", "fsdp_noreshard_acc", "fsdp")


def _ddp(shape: Shape, zero1: bool) -> tuple[Any, Any]:
    net = WithLoss(model(shape))
    ddp = DistributedDataParallel(net)
    if not zero1:
        return ddp, optimizer(dict(net.gpt.named_parameters()), shape)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = optimizer(dict(net.gpt.named_parameters()), shape).param_groups  # Axon's decay groups
    first, *rest = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in groups]
    opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW, lr=shape.lr,
                                  parameters_as_bucket_view=True,
                                  betas=(shape.beta1, shape.beta2), eps=shape.eps,
                                  weight_decay=first["weight_decay"])
    for g in rest:
        opt.add_param_group(g)
    return ddp, opt


def _fsdp(shape: Shape, reshard: bool) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = WithLoss(model(shape))
    for block in net.gpt.layers.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard)
    for m in [*net.gpt.layers.values(), net]:  # sum, as Axon does (gloo has no PREMUL_SUM)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return net, optimizer(dict(net.gpt.named_parameters()), shape)


def _sync_context(net: Any, variant: str, last: bool) -> Any:
    """Gradient reduction on this micro-batch or not, as the variant does it."""
    if variant.startswith("ddp"):
        return contextlib.nullcontext() if last else net.no_sync()
    if variant == "fsdp_noreshard_acc":
        net.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip(params: list, max_norm: float, sharded: bool) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if sharded:  # DTensor gradients: the norm over the shards of every rank
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def rank(variant: str, shape: Shape) -> dict[str, list[float]]:
    world, me = dist.get_world_size(), dist.get_rank()
    net, opt = _ddp(shape, variant == "ddp_zero1") if variant.startswith("ddp") else _fsdp(shape, variant == "fsdp")
    params = [p for p in net.parameters() if p.requires_grad]
    scale = world / shape.global_tokens if variant.startswith("ddp") else 1.0 / shape.global_tokens
    data = Batches(shape)

    def step(k: int) -> float:
        micro = data.local(k, me, world).split(shape.micro_batch)  # m x [mbs, S+1]
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for i, mb in enumerate(micro):
            with _sync_context(net, variant, i == len(micro) - 1):
                loss = net(mb[:, :-1], mb[:, 1:])
                (loss * scale).backward()
            loss_sum += loss.detach()
        loss = global_loss(loss_sum, shape)
        if shape.grad_clip > 0:
            _clip(params, shape.grad_clip, variant.startswith("fsdp"))
        set_lr(opt, shape, k)
        opt.step()
        return loss
    return timed_loop(step, shape)


if __name__ == "__main__":
    main(rank, VARIANTS, __doc__)
