"""Context parallelism: the cp-sharded attention cores (ring and Ulysses) against single-process
full-sequence causal attention (`axon.model.attention_core`), forward and q/k/v gradients."""
import pytest
import torch
import torch.distributed as dist

from axon.model import attention_core
from kernels import flash_attention
from launch.grid import Grid
from parallel.context import RingCore, UlyssesCore, zigzag_positions
from parallel.ring_attention import Ring
from perfmodel.specs import Plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _attention_parity(mode: str, n_heads: int, n_kv_heads: int, chunk: int, q_tile: int) -> dict[str, float]:
    """On every cp rank: the local shard's output and gradients vs the full reference's slice."""
    default_tile, flash_attention.Q_TILE = flash_attention.Q_TILE, q_tile  # this worker only, restored below
    try:
        return _attention_errors(mode, n_heads, n_kv_heads, chunk)
    finally:
        flash_attention.Q_TILE = default_tile


def _attention_errors(mode: str, n_heads: int, n_kv_heads: int, chunk: int) -> dict[str, float]:
    cp, rank = dist.get_world_size(), dist.get_rank()
    grid = Grid.build(Plan(cp=cp, cp_mode=mode), rank, cp)
    axis = grid.axis("cp")
    B, S, hd = 2, 2 * cp * chunk, 8
    g = torch.Generator().manual_seed(7)  # the same full tensors on every rank
    q, dout = (torch.randn(B, S, n_heads, hd, generator=g) for _ in range(2))
    k, v = (torch.randn(B, S, n_kv_heads, hd, generator=g) for _ in range(2))

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_core(*full)
    ref.backward(dout)

    pos = zigzag_positions(S, cp, axis.coord)
    local = [t[:, pos].clone().requires_grad_() for t in (q, k, v)]
    core = RingCore(Ring(axis.size, axis.coord, axis.ranks, axis.group)) if mode == "ring" \
        else UlyssesCore(attention_core, cp, axis.group)
    out = core(*local)
    out.backward(dout[:, pos])
    errs = {"out": _rel(out, ref[:, pos])}
    for name, t, f in zip("qkv", local, full):
        errs["d" + name] = _rel(t.grad, f.grad[:, pos])
    return errs


CASES = [  # (mode, cp, n_heads, n_kv_heads, query rows per score tile)
    ("ring", 2, 3, 3, 256), ("ring", 2, 6, 2, 256), ("ring", 4, 3, 3, 256), ("ring", 4, 6, 2, 256),
    ("ring", 4, 4, 1, 256), ("ring", 3, 3, 3, 256),
    ("ring", 2, 6, 2, 4), ("ring", 4, 3, 3, 4),  # 6 local rows in tiles of 4 + 2
    ("ulysses", 2, 6, 2, 256), ("ulysses", 2, 4, 4, 256), ("ulysses", 2, 2, 1, 256),  # 1 kv head: repeated to 2
    ("ulysses", 4, 8, 2, 256), ("ulysses", 4, 4, 4, 256), ("ulysses", 3, 3, 3, 256), ("ulysses", 3, 6, 2, 256),
]


@pytest.mark.parametrize("mode,cp,n_heads,n_kv_heads,q_tile", CASES)
def test_attention_matches_full_sequence(dist_pools, mode, cp, n_heads, n_kv_heads, q_tile):
    for errs in dist_pools.run(cp, _attention_parity, mode, n_heads, n_kv_heads, chunk=3, q_tile=q_tile):
        assert max(errs.values()) < 1e-5, errs


def test_zigzag_covers_sequence_and_balances_causal_work():
    S, cp = 24, 4
    shards = [zigzag_positions(S, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(S))
    work = {int((p + 1).sum()) for p in shards}  # keys each rank's queries see under the mask
    assert len(work) == 1
    assert torch.equal(zigzag_positions(7, 1, 0), torch.arange(7))  # cp=1: any length, in order
