"""Shared command-line plumbing: common arguments, logging, and exit codes.

Exit codes: 0 done; 2 bad input (``error: ...`` on stderr, no traceback); 3 a quality gate
missed; 1 anything else.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import InputError, QualityGateError, TrainingError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_GATE = 0, 1, 2, 3


def base_parser(description: str,
                force_help: str = "overwrite an output_dir that already holds results"
                ) -> argparse.ArgumentParser:
    """The arguments every script takes: --config, --set, -v, and --force (what overwriting
    means for this script is ``force_help``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config file (default: built-in "
                        "defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.02 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--force", action="store_true", help=force_help)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("modelopt", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(body: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``body`` and map its outcome to an exit code."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        body(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except QualityGateError as exc:
        print(f"quality gate missed: {exc}", file=sys.stderr)
        return EXIT_GATE
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
