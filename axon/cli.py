"""The `axon` command: `axon <command> [args]` (train, tune, dry-run, submit, prepare-data, convert,
generate, eval, checkpoints); each subcommand lives in its own module with a `main(argv) -> int` (and its own `--help`). `axon --version`; an
unknown command gets the closest one suggested."""
from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

COMMANDS = {
    "train": ("axon.train", "train a model: axon train model=tiny parallel.dp=4 ... (axon train --help: every setting)"),
    "tune": ("axon.tune", "predict and rank layouts: axon tune model=llama3-8b cluster=perlmutter ..."),
    "dry-run": ("axon.dry_run", "build one rank of a layout on the CPU, measured vs predicted memory: axon dry-run ..."),
    "submit": ("axon.submit", "submit a Slurm job: axon submit cluster=perlmutter slurm.nodes=4 ..."),
    "prepare-data": ("axon.prepare_data", "tokenize text/JSONL into a .bin token file"),
    "convert": ("axon.convert", "Hugging Face Llama dir <-> Axon checkpoint: axon convert <src> <dst>"),
    "generate": ("axon.generate_cmd", "text from a run, checkpoint or hf:<dir>: axon generate runs/<name> --prompt ..."),
    "eval": ("axon.eval_memorization", "memorization of training text: axon eval memorization runs/<name> ..."),
    "checkpoints": ("axon.checkpoints_cmd", "list a run's checkpoints, or --inspect one"),
}


def usage() -> str:
    lines = ["usage: axon <command> [args]    (axon <command> --help for each; --debug shows tracebacks)", "",
             "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options:", "  --version     print axon's version", "  --help, -h    this text"]
    return "\n".join(lines)


def axon_version() -> str:
    try:
        return version("axon")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(f"axon {axon_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from difflib import get_close_matches

        close = get_close_matches(name, list(COMMANDS), n=1)
        fix = f"did you mean axon {close[0]}?" if close else f"the commands are {', '.join(COMMANDS)}"
        print(f"axon: unknown command {name!r}; {fix}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
