"""The flags every script shares, logging set-up, and the one way to report a user error.

Scripts build their parser with :func:`make_parser` so ``--help`` always shows defaults and the
common flags are spelled the same everywhere (``--data-dir``, ``--device``, ``--k``, ``--seed``,
``--workers``, ``--batch-size``, ``--log-level``, ``--no-progress``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

log = logging.getLogger("paintsim")


class UserError(Exception):
    """A problem with the user's input or environment: printed as one clear line, no traceback."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    parser.add_argument("--data-dir", default="data",
                        help="directory holding every artifact of the pipeline (see docs/artifacts.md)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to compute: auto picks CUDA when a GPU is present")


def add_k_arg(parser: argparse.ArgumentParser, default: int = 10) -> None:
    parser.add_argument("--k", type=int, default=default, help="neighbours per painting")


def resolve_device(name: str) -> str:
    """Map ``auto|cpu|cuda`` to a torch device string, failing clearly when CUDA is asked but absent."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available "
                        "(use --device cpu or --device auto)")
    return name


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_main(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse, set up logging, run; a :class:`UserError` (or a missing file) exits 2 with its message."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(main(args) or 0)
    except (UserError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and a rerun resumes from it")
        return 130
