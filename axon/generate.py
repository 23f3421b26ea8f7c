"""Greedy generation and checkpoint loading for a single process (no parallelism).

    model = load_model(checkpoint_dir)                       # the plain GPT, weights from a run
    out = greedy(model, prompts, n_new)                      # prompts [N, P] -> [N, n_new]

`load_model` reads the model shape from the checkpoint's axon.json and the weights from its DCP
shards by parameter name, so a checkpoint written under any layout loads here. `greedy` re-runs
the forward over the whole (cropped) sequence for each new token: simple and exactly the
training forward; a KV cache (or sampling, tensor parallelism) can replace the loop body later
without changing the interface.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from axon import checkpoint as ckpt
from axon.init import materialize
from axon.model import GPT, build
from perfmodel.specs import ModelSpec


def load_model(path: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """The whole model of the checkpoint `path` (a step_* directory, or a checkpoints/ or run
    directory: its newest checkpoint), in eval mode on `device`."""
    found = ckpt.resolve(str(path), Path(path))
    if found is None and (Path(path) / "checkpoints").is_dir():
        found = ckpt.resolve(str(Path(path) / "checkpoints"), Path(path) / "checkpoints")
    meta = ckpt.read_meta(found)
    spec = ModelSpec(**meta["model"])
    model = build(spec)
    materialize(model, spec, 0, device)
    state = dict(model.named_parameters())
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=str(found))
    except Exception as e:  # noqa: BLE001 - DCP raises a BaseException subclass too; all mean unusable
        raise ckpt.CheckpointError(f"could not load the model of checkpoint {found}: {type(e).__name__}: "
                                   f"{str(e)[:300]}") from e
    return model.eval()


@torch.no_grad()
def greedy(model: GPT, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """The `n_new` most likely next tokens, one at a time: prompts [N, P] -> [N, n_new]. The
    context is cropped to the model's last max_seq_len tokens."""
    window = model.spec.max_seq_len
    seq = prompts  # [N, P + t]
    for _ in range(n_new):
        ctx = seq[:, -window:]  # [N, <= window]
        logits = model(ctx)[:, -1]  # [N, V]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq[:, prompts.shape[1]:]
