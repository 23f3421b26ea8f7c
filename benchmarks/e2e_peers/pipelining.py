"""Pipeline-parallel peers of `axon train` built from torch.distributed.pipelining
(benchmarks/e2e_vs_torch.py).

    .venv/bin/python -m benchmarks.e2e_peers.pipelining --variant 1f1b --world 4 --out /tmp/pp.json

pp = W stages over all ranks; the global batch of Axon's sampler is split by the schedule into
global_batch / micro_batch micro-batches. Chunks are Axon's model pieces (GPT with a range of
layers, the first holding the embedding, the last the final norm and head) with Axon's init;
the layers are split evenly over the chunks (torchtitan's split; Axon balances by cost).
Variants:
    1f1b         Schedule1F1B, one chunk per rank
    interleaved  ScheduleInterleaved1F1B, two chunks per rank (rank r: chunks r and r + pp)
    zbv          ScheduleZBVZeroBubble, two chunks per rank in a V (rank r: chunks r and 2pp-1-r)
The last chunk returns logits; the loss is the summed cross-entropy / global tokens (fp32), no
gradient scaling by the schedule; then a global-norm clip over all stages and Axon's AdamW.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.pp_common import Stage
from benchmarks.e2e_peers.common import Batches, Shape, global_loss, main, model, optimizer, set_lr, timed_loop

VARIANTS = ("1f1b", "interleaved", "zbv")


def my_chunks(variant: str, rank: int, pp: int) -> list[int]:
    if variant == "1f1b":
        return [rank]
    if variant == "interleaved":
        return [rank, rank + pp]
    return [rank, 2 * pp - 1 - rank]  # zbv: the V


def _stages(variant: str, shape: Shape) -> list:
    from torch.distributed.pipelining import PipelineStage

    pp, me = dist.get_world_size(), dist.get_rank()
    n = pp * (1 if variant == "1f1b" else 2)
    stages = []
    for c in my_chunks(variant, me, pp):
        lo, hi = c * shape.n_layers // n, (c + 1) * shape.n_layers // n
        chunk = model(shape, layer_ids=range(lo, hi), has_embedding=c == 0, has_head=c == n - 1)
        stages.append(PipelineStage(Stage(chunk, c == 0, c == n - 1, shape.seq_len), c, n, torch.device("cpu")))
    return stages


def _schedule(variant: str, stages: list, shape: Shape):
    from torch.distributed import pipelining as pl

    m = shape.global_batch // shape.micro_batch
    loss_fn = lambda out, target: F.cross_entropy(  # noqa: E731
        out.float().flatten(0, 1), target.flatten(), reduction="sum") / shape.global_tokens
    if variant == "1f1b":
        return pl.Schedule1F1B(stages[0], m, loss_fn=loss_fn, scale_grads=False)
    cls = pl.ScheduleInterleaved1F1B if variant == "interleaved" else pl.ScheduleZBVZeroBubble
    return cls(stages, m, loss_fn=loss_fn, scale_grads=False)


def _clip(params: list, max_norm: float) -> None:
    """Global-norm clipping: the squared norms of every stage's gradients summed over the ranks."""
    sq = sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None).reshape(1).float()
    dist.all_reduce(sq)
    coef = min(1.0, max_norm / (sq.sqrt().item() + 1e-6))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)


def rank(variant: str, shape: Shape) -> dict[str, list[float]]:
    stages = _stages(variant, shape)
    ids = [s.stage_index for s in stages]
    first, last = 0 in ids, stages[0].num_stages - 1 in ids
    sched = _schedule(variant, stages, shape)
    named = {k: p for s in stages for k, p in s.submod.chunk.named_parameters()}
    opt = optimizer(named, shape)
    params = list(named.values())
    data = Batches(shape)

    def step(k: int) -> float:
        batch = data.local(k)  # [G, S+1]: the schedule splits it into micro-batches
        opt.zero_grad(set_to_none=True)
        losses: list = []
        args = (batch[:, :-1],) if first else ()
        sched.step(*args, target=batch[:, 1:] if last else None, losses=losses if last else None)
        loss_sum = torch.stack(losses).sum() * shape.global_tokens if last else torch.zeros(())
        loss = global_loss(loss_sum, shape)
        if shape.grad_clip > 0:
            _clip(params, shape.grad_clip)
        set_lr(opt, shape, k)
        opt.step()
        return loss
    return timed_loop(step, shape)


if __name__ == "__main__":
    main(rank, VARIANTS, __doc__)
