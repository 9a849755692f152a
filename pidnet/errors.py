"""Error types that the scripts turn into exit codes (see ``pidnet.cli``)."""
from __future__ import annotations


class InputError(Exception):
    """Bad user input (config, hooks, data, checkpoint): exit code 2, one line, no traceback."""


class ConfigError(InputError):
    """The config file or a ``--set`` override is wrong."""


class HooksError(InputError):
    """The hooks file is missing, or a hook is missing or has the wrong signature."""


class DataError(InputError):
    """A data path does not exist or does not hold a dataset in a known layout."""


class CheckpointError(InputError):
    """A file is not a checkpoint this toolkit can load, or does not fit the model."""


class QualityGateError(Exception):
    """A quality gate was missed (tolerance not reached, ``--fail-below``): exit code 3."""


class TrainingError(Exception):
    """Training cannot go on (for instance a non-finite loss): exit code 1."""


class NonFiniteError(TrainingError):
    """NaN or Inf met in activations (statistics or evaluation): exit code 1, naming the first
    layer that produced them."""


class OutputError(Exception):
    """A file of the run could not be written (disk full, read-only, permission): exit code 1,
    one line naming the path; the file it would have replaced is intact."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises ``KeyboardInterrupt``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
