"""`Shard`: which piece of a full parameter a rank holds, as the mechanisms describe it and
`axon.init.materialize` reads it (so initial values never depend on the layout)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Shard:
    """rows x cols of the parameter's 2D view [shape[0], prod(shape[1:])], then optionally a
    `flat` slice of that piece flattened (weights sharded again over tp_depth)."""

    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))
    flat: Optional[slice] = None
