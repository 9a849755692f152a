"""Shared command-line plumbing: common arguments, logging, signals and exit codes.

Exit codes: 0 done; 2 bad input (``error: ...`` on stderr, no traceback); 3 a quality gate
missed; 1 anything else (a non-finite value, a failed write: one line too); 130 / 143 stopped
by SIGINT / SIGTERM, with one line saying what was saved and how to continue.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import InputError, Interrupted, OutputError, QualityGateError, TrainingError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_GATE = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
EXIT_INTERRUPTED = (EXIT_SIGINT, EXIT_SIGTERM)


@dataclass
class Progress:
    """What a run has saved so far and the command that continues it: the line an interrupt
    prints. Scripts update it as they save (``args.progress``)."""

    command: str
    saved: str = "nothing was saved"
    resume_flag: bool = False      # continuing needs --resume (training)

    def resume_command(self) -> str:
        if self.resume_flag and " --resume" not in f" {self.command} ":
            return f"{self.command} --resume"
        return self.command


def base_parser(description: str,
                force_help: str = "overwrite an output_dir that already holds results",
                prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments every script takes: --config, --set, -v, and --force (what overwriting
    means for this script is ``force_help``). ``prog``: the script's file name, as the user
    runs it (also when ``main`` is called in-process)."""
    parser = argparse.ArgumentParser(description=description, prog=prog)
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


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` where the process is, as Ctrl-C raises
    ``KeyboardInterrupt``: ``finally`` blocks and atomic writes clean up as for Ctrl-C. A no-op
    outside the main thread (signal handlers can only be set there)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The shell command that ran ``prog`` with ``argv`` (under torchrun, as torchrun)."""
    launcher = "python"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}"
    return f"{launcher} {prog} {shlex.join(argv)}".rstrip()


def _say(line: str) -> None:
    """One line on stderr, from one process (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def run_cli(body: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``body`` and map its outcome to an exit code and, for anything but
    success, one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.progress = Progress(command_line(parser.prog, argv))
    setup_logging(args.verbose)
    try:
        with stop_on_sigterm():
            body(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except QualityGateError as exc:
        print(f"quality gate missed: {exc}", file=sys.stderr)
        return EXIT_GATE
    except (TrainingError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.filename is None:    # not about a file: a bug or a fault worth its traceback
            raise
        print(f"error: cannot write or read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        progress: Progress = args.progress
        _say(f"stopped by {signal.Signals(signum).name}: {progress.saved}; continue with: "
             f"{progress.resume_command()}")
        return 128 + signum
    return EXIT_OK
