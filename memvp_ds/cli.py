"""What every command line tool shares: one ``error: ...`` line per failure, and --help formatting.

A leaf module (imports nothing from memvp_ds), so memvp-train, memvp-eval, memvp-predict, memvp-prep and
memvp-demo all use the same rules.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys
import textwrap
from typing import Callable, List, Optional

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What bad input raises in this project (ConfigError is a ValueError): reported as one line, not a traceback."""
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""OSErrors that are the machine's state, not a bug: no space, quota exceeded, file-size limit (one line too)."""
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
"""Exit code of an interrupted command, as a shell reports it."""
DEBUG_HELP = "show the full traceback of an error (also: MEMVP_DEBUG=1)"


def _is_rank_zero() -> bool:
    """Rank 0 of a deepspeed/torchrun/srun job, or a single process: the one that reports errors."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line (a KeyError's message without the quotes repr adds)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return "error: " + " ".join(str(message).split())


def command(main: Callable[[List[str]], int]) -> Callable[[Optional[List[str]]], int]:
    """Decorate a CLI's ``main(argv) -> exit code``: the project's own errors become one ``error: ...`` line
    on stderr (rank 0 only, so a multi-rank job does not print it once per rank) and exit code 2; so does a
    full disk. Ctrl-C that reaches here (a second one, while a run saves) is ``error: interrupted`` and exit
    code 130. With --debug or MEMVP_DEBUG=1 the exception propagates with its traceback."""

    @functools.wraps(main)
    def run(argv: Optional[List[str]] = None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv or os.environ.get("MEMVP_DEBUG", "0") not in ("", "0")
        try:
            return main(argv)
        except KeyboardInterrupt as err:
            if debug:
                raise
            if _is_rank_zero():
                print(f"error: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT_CODE
        except (*USER_ERRORS, OSError) as err:
            if debug or (not isinstance(err, USER_ERRORS) and err.errno not in DISK_FULL):
                raise
            if _is_rank_zero():
                print(error_line(err), file=sys.stderr, flush=True)
            return 2

    return run


class HelpFormatter(argparse.HelpFormatter):
    """Indented lines of a description (examples) are kept as written, so backslash continuations stay
    copy-pasteable; other lines are filled as paragraphs. Each option's default is shown once: appended
    as ``(default: X)`` unless its help already speaks of it. Flags (off unless given), required options
    and positionals need no default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks: List[str] = []
        paragraph: List[str] = []
        for line in text.splitlines() + [""]:
            if line.strip() and not line[0].isspace():
                paragraph.append(line)
                continue
            if paragraph:
                blocks.append(textwrap.fill(" ".join(paragraph), width, initial_indent=indent,
                                            subsequent_indent=indent))
                paragraph = []
            blocks.append(indent + line if line.strip() else "")
        return "\n".join(blocks).rstrip("\n")

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def parser(prog: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared formatting and the --debug switch."""
    result = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    add_debug_option(result)
    return result


def add_debug_option(target: argparse.ArgumentParser) -> None:
    target.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def llm_path_overrides(llm_path: Optional[str]) -> List[str]:
    """``key=value`` overrides that point an export's config at another local copy of the base LLM (and its
    tokenizer), e.g. on a machine other than the training cluster. User overrides placed after them win."""
    if llm_path is None:
        return []
    return [f"model.llm.path={llm_path}", "model.llm.config=null", f"data.tokenizer={llm_path}"]
