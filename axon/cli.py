"""The `axon` command: `axon <train|tune|submit|prepare-data> [args]`; each subcommand lives in
its own module with a `main(argv) -> int`."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

COMMANDS = {
    "train": ("axon.train", "train a model: axon train model=tiny parallel.dp=4 ..."),
    "tune": ("axon.tune", "predict and rank layouts: axon tune model=llama3-8b cluster=perlmutter ..."),
    "submit": ("axon.submit", "submit a Slurm job: axon submit cluster=perlmutter slurm.nodes=4 ..."),
    "prepare-data": ("axon.prepare_data", "tokenize text/JSONL into a .bin token file"),
}


def usage() -> str:
    lines = ["usage: axon <command> [args]", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"axon: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
