"""Tensor-parallel peers of `axon train` built from PyTorch's DTensor tensor parallelism
(torch.distributed.tensor.parallel; benchmarks/e2e_vs_torch.py).

    .venv/bin/python -m benchmarks.e2e_peers.tensor_parallel --variant tp --world 4 --out /tmp/tp.json

Variants (1D tensor parallelism over all W ranks, torchtitan's plan on Axon's model and init;
every rank reads the whole global batch of Axon's sampler, in micro-batches of shape.micro_batch):
    tp      ColwiseParallel (wq, wk, wv, w_gate, w_up, head), RowwiseParallel (wo, w_down,
            embedding), loss_parallel (vocabulary-parallel cross-entropy on the sharded logits)
    tp_sp   the same plus sequence parallelism: SequenceParallel norms, PrepareModuleInput
            gathers before attention and MLP, reduce-scattered outputs
Then loss / global tokens backward per micro-batch, global-norm clip (DTensor norms), Axon's AdamW.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.e2e_peers.common import Batches, Shape, main, model, optimizer, set_lr, timed_loop

VARIANTS = ("tp", "tp_sp")


def _layer_plan(prefix: str, sp: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    seq = Shard(1) if sp else Replicate()
    plan = {prefix + "attn.wq": ColwiseParallel(), prefix + "attn.wk": ColwiseParallel(),
            prefix + "attn.wv": ColwiseParallel(), prefix + "attn.wo": RowwiseParallel(output_layouts=seq),
            prefix + "mlp.w_gate": ColwiseParallel(), prefix + "mlp.w_up": ColwiseParallel(),
            prefix + "mlp.w_down": RowwiseParallel(output_layouts=seq)}
    if sp:
        plan.update({prefix + "attn_norm": SequenceParallel(), prefix + "mlp_norm": SequenceParallel(),
                     prefix + "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                         desired_input_layouts=(Replicate(), None, None)),
                     prefix + "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),))})
    return plan


def _parallel_model(shape: Shape, sp: bool) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = model(shape)
    parallelize_module(net, mesh, tp_plan(net, sp))
    return net


def tp_plan(net: torch.nn.Module, sp: bool) -> dict[str, Any]:
    """torch.distributed.tensor.parallel's plan for Axon's GPT (axon/model.py): Megatron's 1D
    column / row split of every layer, the vocabulary split of the embedding and the head (the
    loss under `loss_parallel`), and with `sp` sequence parallelism (also benchmarks/tp_vs_torch.py)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    seq = Shard(1) if sp else Replicate()
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            "head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)}
    if sp:
        plan["norm"] = SequenceParallel()
    for i in net.layers:
        plan.update(_layer_plan(f"layers.{i}.", sp))
    return plan


def _clip(params: list, max_norm: float) -> None:
    """Global-norm clipping over sharded (DTensor) and replicated (plain: norm weights without
    sequence parallelism, the same on every rank) gradients."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros(())
    if sharded:
        sq += torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2
    if plain:
        sq += torch.nn.utils.get_total_norm(plain) ** 2
    coef = min(1.0, max_norm / (sq.sqrt().item() + 1e-6))
    for g in grads:
        g.mul_(coef)


def rank(variant: str, shape: Shape) -> dict[str, list[float]]:
    from torch.distributed.tensor.parallel import loss_parallel

    net = _parallel_model(shape, variant == "tp_sp")
    opt = optimizer(dict(net.named_parameters()), shape)
    params = [p for p in net.parameters() if p.requires_grad]
    data = Batches(shape)

    def step(k: int) -> float:
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for mb in data.local(k).split(shape.micro_batch):  # every rank: the whole global batch
            logits = net(mb[:, :-1])  # DTensor [mbs, S, V] sharded over the vocabulary
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
                (loss / shape.global_tokens).backward()
            loss_sum += loss.detach().full_tensor()
        dist.barrier()  # the step's sync point (the loss is already the same on every rank)
        if shape.grad_clip > 0:
            _clip(params, shape.grad_clip)
        set_lr(opt, shape, k)
        opt.step()
        return loss_sum.item() / shape.global_tokens
    return timed_loop(step, shape)


if __name__ == "__main__":
    main(rank, VARIANTS, __doc__)
