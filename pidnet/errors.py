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
