"""One error style for every command and every rank: one line naming the setting and the fix,
exit code 2 for bad input (1 for anything else), the traceback only with `--debug`.

    return guarded("axon tune", _main, argv)    # each command's main(argv)
"""
from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Callable

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from axon.config import ConfigError
from perfmodel.specs import PlanError

DEBUG_FLAG = "--debug"
# bad input: a setting, a file or a layout the user can change (ConfigError and PlanError are ValueErrors)
BAD_INPUT = (ValueError, HydraException, OmegaConfBaseException, FileNotFoundError, NotADirectoryError,
             IsADirectoryError, PermissionError)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (exit code 3); the message says which and what to do."""


class UsageError(ValueError):
    """A command-line option a command does not take, or a missing argument."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (UsageError, exit code 2 through `guarded`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see {self.prog} --help")


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug`, and whether it was there."""
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def guarded(prog: str, body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run `body(argv)`; an error becomes one line on stderr (the traceback too with --debug)."""
    argv, debug = split_debug(argv)
    try:
        return int(body(argv) or 0)
    except BAD_INPUT as e:
        return report(prog, e, debug, code=2)
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: still one line unless --debug
        return report(prog, e, debug, code=1)


def report(prog: str, e: BaseException, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    bug = code == 1  # not bad input (2) nor an unusable checkpoint (3): name the exception's type
    text = f"{type(e).__name__}: {one_line(str(e))}" if bug else message(e)
    hint = f" (rerun with {DEBUG_FLAG} for the traceback)" if bug and not debug else ""
    print(f"{prog}: {text}{hint}", file=sys.stderr, flush=True)
    return code


def one_line(text: str) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (no grammar link, no caret line)."""
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("See https://", "^"))
            and not re.match(r"(full_key|reference_type|object_type|provider)=?", ln.strip())]
    return "; ".join(keep) or text.strip()


def message(e: BaseException) -> str:
    """One line naming the setting and the fix."""
    if isinstance(e, (ConfigError, PlanError)):
        return one_line(str(e))
    if isinstance(e, MissingConfigException):
        return _missing_preset(str(e))
    if isinstance(e, OverrideParseException):
        m = re.search(r"override '([^']*)'", str(e))
        what = m.group(1) if m else str(e).splitlines()[0]
        return (f"{what!r} is not an override: write key=value or group=preset (axon train --help lists them)")
    if isinstance(e, ConfigCompositionException) and isinstance(e.__cause__, OmegaConfBaseException):
        m = re.search(r"override (\S+)", str(e))
        cause = str(e.__cause__).splitlines()[0]
        return f"{m.group(1) if m else 'an override'}: {cause}; axon train --help lists each setting's type"
    return one_line(str(e))


def _missing_preset(text: str) -> str:
    from axon.help import presets, suggest

    m = re.search(r"Could not (?:find|load) '([\w-]+)/([^']+)'", text)
    if m is None:
        return one_line(text.split("\n\n")[0])
    group, name = m.groups()
    known = presets(group)
    close = suggest(name, known)
    fix = f"did you mean {group}={close}?" if close else f"the {group} presets are {', '.join(known)}"
    return f"{group}={name} is not a preset (configs/{group}/{name}.yaml); {fix}"
