"""The command-line layer: shared flags, flag types with their bounds, and the one error report.

Scripts build their parser with :func:`make_parser` so ``--help`` always shows defaults and the
common flags are spelled the same everywhere (``--data-dir``, ``--device``, ``--k``, ``--seed``,
``--workers``, ``--batch-size``, ``--log-level``, ``--no-progress``). Flags are checked here, by
their argparse type, before any work starts; a value that only the data can refuse comes back
from the library as :class:`~paintsim.errors.BadValue`, and :func:`run_main` names its flag.
A config dataclass is filled from the parsed flags by :func:`config_from_args` (flag dest = field).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DISK_FULL_ERRNOS, BadValue, UserError

__all__ = ["make_parser", "add_device_arg", "add_k_arg", "int_range",
           "float_range", "memory_size", "output_file", "config_from_args", "run_main", "setup_logging"]

log = logging.getLogger("paintsim")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description: str, prog: str | None = None, *, locked: bool = False) -> argparse.ArgumentParser:
    """The parser with the common flags. ``locked``: the stage holds its lock on the data dir
    while it runs (see :mod:`paintsim.locks`), and gets ``--wait-for-lock``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    parser.add_argument("--data-dir", default="data",
                        help="directory holding every artifact of the pipeline (see docs/artifacts.md)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if locked:
        parser.add_argument("--wait-for-lock", action="store_true",
                            help="when another run of this stage works on the same --data-dir, wait for "
                                 "it to finish (by default this run stops at once, naming it)")
    return parser


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to compute: auto picks CUDA when a GPU is present")


def add_k_arg(parser: argparse.ArgumentParser, default: int = 10) -> None:
    parser.add_argument("--k", type=int_range(1), default=default,
                        help="neighbours per painting (at most the collection size - 1)")


# ----------------------------------------------------------------------------------- flag types
def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within ``[lo, hi]`` (either bound may be open)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        _check_range(value, lo, hi)
        return value
    parse.__name__ = "int"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if lo_open and lo is not None and value <= lo:
            raise argparse.ArgumentTypeError(f"must be greater than {lo:g}, got {text}")
        _check_range(value, lo, hi)
        return value
    parse.__name__ = "float"
    return parse


def _check_range(value, lo, hi) -> None:
    if lo is not None and value < lo:
        raise argparse.ArgumentTypeError(f"must be at least {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise argparse.ArgumentTypeError(f"must be at most {hi:g}, got {value:g}")


def memory_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"800000000"`` -> bytes (an argparse type)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512M, 2G)") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"memory size must be positive: {text!r}")
    return int(value)


memory_size.__name__ = "memory size"


def output_file(text: str) -> str:
    """An argparse type for ``--output``: a file path, never an existing folder."""
    if not text or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the path of a file to write")
    return text


output_file.__name__ = "file path"


def config_from_args(cls, args: argparse.Namespace, **overrides: Any):
    """Build the dataclass ``cls`` from the parsed flags whose dest is one of its field names.

    ``progress`` is the opposite of ``--no-progress``; ``overrides`` win over the flags.
    """
    values = vars(args)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.name == "progress" and "no_progress" in values:
            kwargs["progress"] = not values["no_progress"]
    kwargs.update(overrides)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------- running
def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_main(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging, (take the stage's lock,) run. A user error, a bad value or a missing
    file exits 2 with one line."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        if not hasattr(args, "wait_for_lock"):
            return int(main(args) or 0)
        from .locks import stage_lock

        stage = Path(parser.prog).stem
        with stage_lock(args.data_dir, stage, wait=args.wait_for_lock):
            return int(main(args) or 0)
    except BadValue as exc:
        log.debug("bad value", exc_info=True)
        log.error("%s", exc.as_flag())
        return 2
    except (UserError, FileNotFoundError) as exc:
        log.debug("user error", exc_info=True)
        log.error("%s", exc)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        log.debug("disk full", exc_info=True)
        log.error("could not write %s (%s): the disk is full or a file-size limit was hit; what was "
                  "finished is kept: free some space and rerun", exc.filename or "a file", exc.strerror)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and a rerun resumes from it")
        return 130
