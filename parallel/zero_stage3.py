"""ZeRO-3 parameter residency: when each unit's flat buffer holds the gathered parameters.

    res = Residency(lambda: engine.stats)        # counts gathers and gathered bytes
    hooks = res.register(chunk, blocks, root)    # removable module hook handles
    res.gather([unit]); res.free(unit)

Per Block (a unit list: one unit per gradient-reduction group, gathered together):
- forward: gathered just before its forward, the next Block's gather launched at the same time
  (prefetch in execution order, within the chunk), freed after its forward;
- backward: gathered again when backward reaches the Block's output; the Block before it is
  prefetched when backward leaves this Block's MLP (the gradient of the MLP's input; a Block
  without `mlp` prefetches at its output), so the gather overlaps the attention's backward but
  does not coexist with the MLP's activations and this Block's gradient staging, where the
  step's memory peaks. The engine frees the Block as soon as its gradient is complete (under a
  split backward: at its last W, so it stays gathered from B to W).
A chunk's root units (embeddings, final norm, head) are gathered on first use in a step; the
engine frees them in `finish()`. What is gathered is `Unit.cshard` into `Unit.cfull`: the fp32
shard and buffer, or under mixed precision their bf16 compute copies (parallel/zero.py).
Freeing resizes the flat buffer's storage to zero: parameters (or compute tensors) stay views
of it, so autograd's saved references see the regathered values, and recomputation
(which runs inside the Block's backward) finds the Block gathered.
Under tensor parallelism with tp_depth > 1 a weight's depth gather reads the parameter at its
use, inside the Block's forward or backward, when the Block is gathered; nothing may read it
ahead, so `parallel.parallelize.depth_prefetch` turns the depth prefetch off under ZeRO-3. The
values a regather restores are the ones freed, so gathered depth copies stay valid until the
optimizer step (`TensorParallel.weights_changed`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from parallel.zero_comm import gather

if TYPE_CHECKING:
    from parallel.zero import ZeroStats
    from parallel.zero_build import Unit


class Residency:
    def __init__(self, stats: Callable[[], "ZeroStats"]):
        self.stats = stats

    def gather(self, units: list["Unit"], wait: bool = True) -> None:
        """Gather every free unit of `units` (launched together), and with `wait` finish them."""
        for u in units:
            self._launch(u)
        if wait:
            for u in units:
                self._finish(u)

    def free(self, u: "Unit") -> None:
        self._finish(u)
        u.cfull.untyped_storage().resize_(0)
        u.state = "free"

    def _launch(self, u: "Unit") -> None:
        if u.state != "free":
            return
        full = u.cfull  # the buffer the forward reads: `full`, or its compute-dtype copy (precision.py)
        full.untyped_storage().resize_(full.numel() * full.element_size())
        if u.group.size > 1:
            u.gather = gather(full, u.cshard, u.group)
            self.stats().bytes_gathered += full.numel() * full.element_size()
        else:
            full.copy_(u.cshard)
        u.state = "gathering"
        self.stats().gathers += 1

    def _finish(self, u: "Unit") -> None:
        if u.state == "gathering":
            if u.gather is not None:
                u.gather.wait()
                u.gather = None
            u.state = "ready"

    def register(self, chunk: nn.Module, blocks: list[tuple[nn.Module, list["Unit"]]],
                 root: list["Unit"]) -> list[Any]:
        """Gather / free hooks on one chunk's Blocks and a gather on its other parameter-owning
        modules; returns the hook handles."""
        hooks = []
        for i, (m, units) in enumerate(blocks):
            nxt = blocks[i + 1][1] if i + 1 < len(blocks) else []
            prev = blocks[i - 1][1] if i > 0 else []
            mlp = getattr(m, "mlp", None)
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, units=units, nxt=nxt: self._pre_forward(units, nxt)))
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, units=units, pre=[] if mlp else prev: self._post_forward(units, out, pre)))
            if mlp is not None:
                hooks.append(mlp.register_forward_pre_hook(
                    lambda mod, args, prev=prev: _on_grad_of(args[0], lambda: self.gather(prev, wait=False))))
        if root:
            owned = {id(s.param) for u in root for s in u.layout.slots}
            for m in chunk.modules():
                if any(id(p) in owned for p in m.parameters(recurse=False)):
                    hooks.append(m.register_forward_pre_hook(lambda mod, args: self.gather(root)))
        return hooks

    def _pre_forward(self, units: list["Unit"], nxt: list["Unit"]) -> None:
        self.gather(units)
        self.gather(nxt, wait=False)  # prefetch: overlaps this Block's forward

    def _post_forward(self, units: list["Unit"], out: Any, prefetch: list["Unit"]) -> None:
        def pre_backward() -> None:
            self.gather(units)
            self.gather(prefetch, wait=False)

        _on_grad_of(out, pre_backward)
        for u in units:
            self.free(u)


def _on_grad_of(t: Any, fn: Callable[[], None]) -> None:
    """Call `fn()` when backward has computed the gradient of `t` (a tensor in the graph)."""
    if torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad:
        t.register_hook(lambda grad: fn())
