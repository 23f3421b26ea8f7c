"""The pipeline's activation store (parallel/activation_offload.py) counts a storage saved as several
views once, moves it to the host and back once, and rebuilds every view on the reloaded storage:
the gradients equal those of a run without the store."""
from __future__ import annotations

import torch

from parallel.activation_offload import ActivationStore


def _forward(x: torch.Tensor) -> torch.Tensor:
    y = x * 2  # [4, 6], a fresh storage; saved below as three different views
    return y.reshape(24).sin().sum() + y.t().cos().sum() + y[1:3].exp().sum()


def test_views_of_one_storage_count_and_move_once():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    _forward(x).backward()
    want, x.grad = x.grad, None
    store = ActivationStore(torch.device("cpu"), [])
    key = (0, 0)
    with store.saving(key):
        loss = _forward(x)
    y_bytes = 4 * 6 * 8
    exp_out = 2 * 6 * 8  # exp saves its output, a storage of its own
    assert store.device_bytes == y_bytes + exp_out
    store.offload(key)
    assert (store.device_bytes, store.host_bytes) == (0, y_bytes + exp_out)
    assert store.stats.offloaded_bytes == y_bytes + exp_out
    store.reload(key)
    assert (store.device_bytes, store.host_bytes) == (y_bytes + exp_out, 0)
    loss.backward()
    store.release(key)
    assert store.device_bytes == 0
    assert torch.equal(x.grad, want)
