"""Context parallelism on packed rows (several documents per row, per-sample positions restarting
at 0): the ring and Ulysses cores against single-process attention within documents
(`axon.model.attention_core` with positions, the block-diagonal causal mask), forward and q/k/v
gradients; documents cross the zig-zag chunk boundaries and the score tiles."""
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


def packed_positions(lengths: list[list[int]]) -> torch.Tensor:
    """[B, S] positions restarting at 0 for each document of the given lengths (one list per row)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def _packed_parity(mode: str, n_heads: int, n_kv_heads: int, q_tile: int) -> dict[str, float]:
    default_tile, flash_attention.Q_TILE = flash_attention.Q_TILE, q_tile  # this worker only, restored below
    try:
        cp, rank = dist.get_world_size(), dist.get_rank()
        axis = Grid.build(Plan(cp=cp, cp_mode=mode), rank, cp).axis("cp")
        S, hd = 24, 8
        positions = packed_positions([[5, 1, 11, 7], [24]] if cp != 4 else [[3, 9, 2, 10], [13, 11]])  # [2, S]
        B = positions.shape[0]
        g = torch.Generator().manual_seed(7)  # the same full tensors on every rank
        q, dout = (torch.randn(B, S, n_heads, hd, generator=g) for _ in range(2))
        k, v = (torch.randn(B, S, n_kv_heads, hd, generator=g) for _ in range(2))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention_core(*full, positions)
        ref.backward(dout)
        idx = zigzag_positions(S, cp, axis.coord)
        local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
        core = RingCore(Ring(axis.size, axis.coord, axis.ranks, axis.group)) if mode == "ring" \
            else UlyssesCore(attention_core, cp, axis.group)
        out = core(*local, positions[:, idx])
        out.backward(dout[:, idx])
        errs = {"out": _rel(out, ref[:, idx])}
        for name, t, f in zip("qkv", local, full):
            errs["d" + name] = _rel(t.grad, f.grad[:, idx])
        errs["finite"] = 0.0 if all(t.grad.isfinite().all() for t in local) and out.isfinite().all() else 1.0
        return errs
    finally:
        flash_attention.Q_TILE = default_tile


@pytest.mark.parametrize("mode,cp,n_heads,n_kv_heads,q_tile", [
    ("ring", 2, 6, 2, 256), ("ring", 2, 3, 3, 4), ("ring", 4, 4, 2, 2), ("ulysses", 2, 4, 2, 256),
])
def test_packed_attention_matches_single_process(dist_pools, mode, cp, n_heads, n_kv_heads, q_tile):
    for errs in dist_pools.run(cp, _packed_parity, mode, n_heads, n_kv_heads, q_tile):
        assert max(errs.values()) < 1e-5, errs


def test_reference_is_attention_within_documents():
    """attention_core with positions = each document run alone with is_causal."""
    positions = packed_positions([[5, 1, 11, 7]])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 24, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention_core(q, k, v, positions)
    for a, b in ((0, 5), (5, 6), (6, 17), (17, 24)):
        torch.testing.assert_close(out[:, a:b], attention_core(q[:, a:b], k[:, a:b], v[:, a:b]))
