"""Layout-independent parameter initialization.

Every parameter's values are a function of (seed, parameter name, full shape) only, so any
parallel layout materializes exactly the numbers a single process would. The full tensor is
viewed as 2D [rows, cols] and generated in row blocks, each from its own seeded generator; a
rank materializes only the blocks that intersect its shard, so a 405B-sized tensor is never
built whole on one device.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Optional

import torch
from torch import nn

from parallel.layout import ParamLayout
from parallel.shard import Shard
from perfmodel.specs import ModelSpec

BLOCK_ELEMS = 1 << 22  # elements per generator block (16 MiB of fp32)


def _seed_for(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, math.prod(shape[1:]) if len(shape) > 1 else 1


def normal_shard(name: str, shape: tuple[int, ...], shard: Shard, std: float, seed: int) -> torch.Tensor:
    """Values of `shard` of a N(0, std) tensor of full `shape`, identical for every sharding."""
    rows, cols = _as_2d(shape)
    r0, r1, _ = shard.rows.indices(rows)
    rows_per_block = max(1, BLOCK_ELEMS // cols)
    pieces = []
    for block in range(r0 // rows_per_block, (r1 - 1) // rows_per_block + 1 if r1 > r0 else 0):
        b0 = block * rows_per_block
        b1 = min(rows, b0 + rows_per_block)
        g = torch.Generator().manual_seed(_seed_for(seed, name, block))
        vals = torch.randn(b1 - b0, cols, generator=g) * std  # [block rows, cols]
        pieces.append(vals[max(r0, b0) - b0:min(r1, b1) - b0, shard.cols])
    if not pieces:
        raise ValueError(f"empty shard {shard} of {name} {shape}")
    out = torch.cat(pieces)  # [shard rows, shard cols]
    return out.reshape(-1)[shard.flat] if shard.flat is not None else out


def param_std(spec: ModelSpec, name: str) -> Optional[float]:
    """Init std by parameter role; None means a constant (norm weights 1, biases 0)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or "norm" in name:
        return None
    if name.endswith(("wo.weight", "w_down.weight")):  # residual projections, GPT-2 scaling
        return spec.init_std / math.sqrt(2 * spec.n_layers)
    return spec.init_std


def materialize(model: nn.Module, spec: ModelSpec, seed: int, device: torch.device,
                layouts: Optional[Mapping[str, ParamLayout]] = None) -> None:
    """Allocate a meta-device model on `device` and fill each parameter with its shard's values.

    `layouts` come from the parallel mechanisms (keyed by the parameter's layout-independent
    name: the full shape and this rank's `shard` of it); parameters not listed are whole.
    """
    layouts = layouts or {}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            layout = layouts.get(name)
            shard = layout.shard if layout is not None else Shard()
            shape = layout.full_shape if layout is not None else tuple(p.shape)
            std = param_std(spec, name)
            if std is None:
                fill = 0.0 if name.endswith("bias") else 1.0
                p.fill_(fill)
            else:
                p.copy_(normal_shard(name, shape, shard, std, seed).reshape(p.shape).to(p.dtype))
        for module in model.modules():
            reset = getattr(module, "reset_buffers", None)
            if reset is not None:
                reset()
