"""Generation and model loading, in one process or tensor-parallel over a process group.

    model = load_model(checkpoint_dir)                       # the plain GPT, weights from a run
    model = load_hf_model(hf_dir)                            # or from a Hugging Face Llama directory
    model = load_tensor_parallel(source, Plan(tp_col=2), grid, device)   # this rank's shards (collective)
    out = greedy(model, prompts, n_new)                      # prompts [N, P] -> [N, n_new]
    out = sample(model, prompts, n_new, Sampling(temperature=0.8, top_p=0.95), generator)

`load_model` reads the model shape from the checkpoint's axon.json and the weights from its DCP
shards by parameter name, so a checkpoint written under any layout loads here. Each new token
re-runs the forward over the whole (cropped) sequence: exactly the training forward; a KV cache
can replace the loop body later without changing the interface. `sample` draws from the softmax
at `temperature`, restricted to the `top_k` most likely tokens and to the smallest set whose
probability reaches `top_p`; temperature 0 is greedy. `axon generate` (axon/generate_cmd.py)
is the command.

Tensor-parallel (`load_tensor_parallel`): every rank of the process group builds the model on
the meta device, swaps in the tensor-parallel modules (parallel/tensor.py, the trainer's own),
materializes only its shards and fills them from the checkpoint (DCP reshards: the pieces as
DTensors, parallel/layout_dtensor.py) or from hf:<dir> (only its slices, axon/hf_load.py). Every
rank runs the same loop on the same tokens: the forward's collectives keep the hidden states
equal, the last position's vocab-parallel logits are gathered over tp_col, and the token the
group's first rank picks is broadcast, so every rank continues with it (sampling too: no rank
can drift on a rounding difference). Sequence and context parallelism need a fixed sequence
length and are refused; the sequence grows by one token per step here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from axon import checkpoint as ckpt
from axon import hf_config, hf_load
from axon.init import materialize
from axon.model import GPT, build
from launch.grid import Grid
from perfmodel.specs import ModelSpec, Plan

if TYPE_CHECKING:
    from parallel.tensor import TensorParallel


def load_model(path: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """The whole model of the checkpoint `path` (a step_* directory, or a checkpoints/ or run
    directory: its newest checkpoint), in eval mode on `device`."""
    found = _checkpoint(Path(path))
    meta = ckpt.read_meta(found)
    spec = ModelSpec(**meta["model"])
    model = build(spec)
    materialize(model, spec, 0, device)
    state = dict(model.named_parameters())
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        ckpt.read(found, {"model": state})  # manifest checked first; never runs code from the files
    return model.eval()


def load_hf_model(directory: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """The whole model of a Hugging Face Llama directory (config.json + safetensors), in eval mode."""
    spec = hf_config.spec_from_dir(Path(directory))
    model = build(spec)
    materialize(model, spec, 0, device)
    hf_load.init_from(f"{hf_load.PREFIX}{directory}", dict(model.named_parameters()), {}, spec)
    return model.eval()


class TensorParallelModel:
    """This rank's shards of a tensor-parallel model (`load_tensor_parallel`): `next_logits` gives
    the whole vocabulary's logits of the last position, the same on every rank of the group."""

    def __init__(self, model: GPT, tp: "TensorParallel", grid: Grid):
        self.model, self.tp, self.grid = model, tp, grid
        self.spec = model.spec

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, S] (the same on every rank) -> logits [N, V] of position S - 1."""
        local = self.model(tokens)[:, -1]  # [N, V / tp_col]: this rank's vocabulary slice
        return self.tp.comm.gather_along(local.contiguous(), "tp_col", dim=1)  # [N, V]

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first rank's `tokens` [N] on every rank of the tensor-parallel group."""
        import torch.distributed as dist

        for axis in ("tp_col", "tp_row", "tp_depth"):
            ax = self.grid.axis(axis)
            if ax.size > 1:
                dist.broadcast(tokens, dist.get_global_rank(ax.group, 0), group=ax.group)
        return tokens


def load_tensor_parallel(source: str, plan: Plan, grid: Grid, device: torch.device) -> TensorParallelModel:
    """Collective over the grid's ranks: this rank's shards of the model in `source` (a run, its
    checkpoints/ or a step_* directory, or hf:<dir>) under the tensor-parallel `plan` (tp_col,
    tp_row, tp_depth; every other degree 1), in eval mode on `device`."""
    from parallel import layout, tensor
    from parallel.layout_dtensor import TensorMesh

    others = {k: getattr(plan, k) for k in ("dp", "pp", "cp") if getattr(plan, k) != 1}
    if others or plan.sequence_parallel:
        raise ValueError(f"generation runs tensor-parallel only, got {others or 'sequence_parallel=true'}: "
                         "set the other degrees to 1 and parallel.sequence_parallel=false")
    hf_dir = hf_load.init_dir(source) if source.startswith(hf_load.PREFIX) else None
    found = None
    if hf_dir is not None:
        spec = hf_config.spec_from_dir(hf_dir)
    else:
        found = _checkpoint(Path(source))
        spec = ModelSpec(**ckpt.read_meta(found)["model"])
    model = build(spec)
    tp = tensor.apply(model, spec, plan, grid, prefetch=False)
    materialize(model, spec, 0, device, tp.layouts)
    named = dict(model.named_parameters())
    layouts = layout.complete(tp.layouts, named)
    if hf_dir is not None:
        hf_load.init_from(f"{hf_load.PREFIX}{hf_dir}", named, layouts, spec)  # this rank's slices only
    else:
        mesh = TensorMesh(grid)
        ckpt.read(found, {"model": {name: mesh.to_dtensor(layouts[name], p.data) for name, p in named.items()}})
    tp.weights_changed()  # drop any weight gathered over tp_depth before the load
    return TensorParallelModel(model.eval(), tp, grid)


def _checkpoint(path: Path) -> Path:
    """The checkpoint `path` names: a step_* directory, or a checkpoints/ or run directory's newest."""
    found = ckpt.resolve(str(path), path)
    if found is None and (path / "checkpoints").is_dir():
        found = ckpt.resolve(str(path / "checkpoints"), path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint: give a run directory, its checkpoints/ "
                                "or a step_* directory")
    return found


@dataclass(frozen=True)
class Sampling:
    """How `sample` picks each token; temperature 0 is greedy (the other settings are then moot)."""

    temperature: float = 1.0  # >= 0; divides the logits
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p; in (0, 1]

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1 = no limit)")


GREEDY = Sampling(temperature=0.0)


def filtered_logits(logits: torch.Tensor, how: Sampling) -> torch.Tensor:
    """logits [N, V] / temperature with the tokens outside top-k and top-p set to -inf (the most
    likely token always stays)."""
    x = logits.float() / how.temperature  # [N, V]
    if 0 < how.top_k < x.shape[-1]:
        kth = x.topk(how.top_k, dim=-1).values[:, -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if how.top_p < 1:
        sorted_x, order = x.sort(dim=-1, descending=True)  # [N, V]
        before = sorted_x.softmax(-1).cumsum(-1) - sorted_x.softmax(-1)  # probability of the tokens ahead
        drop = before >= how.top_p  # [N, V]: the set already reached p without this token
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return x


@torch.no_grad()
def sample(model: GPT | TensorParallelModel, prompts: torch.Tensor, n_new: int, how: Sampling = GREEDY,
           generator: Optional[torch.Generator] = None, stop_id: Optional[int] = None) -> torch.Tensor:
    """`n_new` tokens after each prompt: prompts [N, P] -> [N, n_new]. The context is cropped to
    the model's last max_seq_len tokens; after `stop_id` a row repeats it (the caller cuts there).
    A tensor-parallel model is called on every rank of its group with the same arguments."""
    window = model.spec.max_seq_len
    parallel = isinstance(model, TensorParallelModel)
    seq = prompts  # [N, P + t]
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)  # [N]
    for _ in range(n_new):
        ctx = seq[:, -window:]  # [N, <= window]
        logits = model.next_logits(ctx) if parallel else model(ctx)[:, -1]  # [N, V]
        if how.temperature == 0:
            nxt = logits.argmax(-1)  # [N]
        else:
            probs = filtered_logits(logits, how).softmax(-1)  # [N, V]
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [N]
        if parallel:
            nxt = model.agree(nxt)
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done |= nxt == stop_id
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        if stop_id is not None and bool(done.all()):
            break
    out = seq[:, prompts.shape[1]:]  # [N, <= n_new]
    if out.shape[1] < n_new:  # every row stopped early: pad with the stop token
        out = torch.cat((out, out.new_full((out.shape[0], n_new - out.shape[1]), stop_id)), dim=1)
    return out


def greedy(model: GPT | TensorParallelModel, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """The `n_new` most likely next tokens, one at a time: prompts [N, P] -> [N, n_new]."""
    return sample(model, prompts, n_new, GREEDY)
