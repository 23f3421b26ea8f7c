"""`axon generate`: text from a trained run, a checkpoint or a Hugging Face Llama directory.

    axon generate runs/<name> --prompt "Once upon a time" [--prompt ...] --max-new-tokens 64
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--tokenizer byte|tokenizer.json]
    axon generate hf:/models/llama-3.1-8b --prompt "..."                # no conversion needed
    axon generate hf:/models/llama-3.1-70b --tp 8 --prompt "..."        # tensor-parallel over 8 local ranks

One process, or with `--tp N` tensor-parallel over N ranks (axon/generate.py): started here as N
local workers (launch/spawn.py, as `axon train launch.nproc_per_node=N` does; each reads only its
shards), or, when this process is already one rank of a launched world (torchrun, srun: WORLD_SIZE
set), over that world, which must have N ranks. Each rank uses its GPU when the launcher gives it
one (launch/dist.py), else the CPU over gloo. Every rank generates the same tokens; rank 0 prints.
The tokenizer is the run's (`data.tokenizer` in
its config.yaml), the Hugging Face directory's tokenizer.json, or `--tokenizer`; generation of a
prompt stops at the tokenizer's end-of-document token. Temperature 0 is greedy; `--seed` makes
sampling repeatable. Each completion is printed after its prompt, separated by a blank line
(`--json`: a list of {prompt, completion}).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from axon import hf_load
from axon.errors import Parser, guarded
from axon.generate import Sampling, load_hf_model, load_model, load_tensor_parallel, sample
from axon.tokenizer import Tokenizer, load_tokenizer


def main(argv: list[str]) -> int:
    return guarded("axon generate", _main, argv)


def _parser() -> Parser:
    p = Parser(prog="axon generate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run directory, its checkpoints/ or one step_* checkpoint, or hf:<directory>")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--tokenizer", default=None, help="byte or a tokenizer.json (default: the run's or the HF dir's)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (tp_col; default 1: one process)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return p


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.tp < 1:
        raise ValueError(f"--tp {args.tp} must be >= 1 (tensor-parallel ranks)")
    how = Sampling(args.temperature, args.top_k, args.top_p)
    hf_dir = hf_load.init_dir(args.source) if args.source.startswith(hf_load.PREFIX) else None
    tok = load_tokenizer(args.tokenizer or _default_tokenizer(args.source, hf_dir))  # before any worker starts
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        from launch.spawn import run_local

        return run_local(args.tp, argv, module="axon.generate_cmd")
    if args.tp > 1:
        return _parallel(args, tok, how)
    model = load_hf_model(hf_dir) if hf_dir is not None else load_model(Path(args.source))
    _print(args, _results(model, tok, args, how, torch.device("cpu")))
    return 0


def _results(model, tok: Tokenizer, args, how: Sampling, device: torch.device) -> list[dict[str, str]]:
    if tok.vocab_size > model.spec.vocab_size:
        raise ValueError(f"--tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{model.spec.vocab_size}; give the tokenizer the model was trained with")
    generator = torch.Generator(device=device).manual_seed(args.seed)  # draws on the logits' device
    return [{"prompt": text, "completion": _complete(model, tok, text, args.max_new_tokens, how, generator, device)}
            for text in args.prompt]


def _print(args, results: list[dict[str, str]]) -> None:
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(r["prompt"] + r["completion"] for r in results))


def _parallel(args, tok: Tokenizer, how: Sampling) -> int:
    """One rank of a launched world of --tp ranks: load this rank's shards, generate, rank 0 prints."""
    from launch import dist as launch_dist
    from launch.env import detect
    from launch.grid import Grid
    from perfmodel.specs import Plan

    env = detect(os.environ)
    if env.world_size != args.tp:
        raise ValueError(f"--tp {args.tp} but this launch has {env.world_size} ranks (WORLD_SIZE); start --tp "
                         "ranks, or leave WORLD_SIZE unset and axon generate starts them")
    backend = launch_dist.init(env, "auto", None)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        plan = Plan(tp_col=args.tp)
        model = load_tensor_parallel(args.source, plan, Grid.build(plan, env.rank, env.world_size), device)
        results = _results(model, tok, args, how, device)
    finally:
        launch_dist.shutdown()
    if env.rank == 0:
        _print(args, results)
    return 0


def _complete(model, tok: Tokenizer, text: str, n_new: int, how: Sampling, generator: torch.Generator,
              device: torch.device) -> str:
    ids = torch.as_tensor(tok.encode(text).astype("int64"))[None].to(device)  # [1, P]
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty; give at least one character of text")
    out = sample(model, ids, n_new, how, generator, stop_id=tok.eot_id)[0]  # [n_new]
    if tok.eot_id is not None and (out == tok.eot_id).any():
        out = out[:int((out == tok.eot_id).nonzero()[0])]
    return tok.decode(out.cpu().numpy())


def _default_tokenizer(source: str, hf_dir: Optional[Path]) -> str:
    """The HF directory's tokenizer.json, the run's data.tokenizer, else the byte tokenizer."""
    if hf_dir is not None:
        path = hf_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; give --tokenizer <path of one>")
        return str(path)
    here = Path(source).resolve()
    for run in (here, *here.parents[:3]):  # the run dir, from the run, checkpoints/ or step_* dir
        if (run / "config.yaml").is_file():
            raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
            return str((raw.get("data") or {}).get("tokenizer") or "byte")
    return "byte"


if __name__ == "__main__":  # a worker of `axon generate --tp N` (launch/spawn.py runs python -m axon.generate_cmd)
    sys.exit(main(sys.argv[1:]))
