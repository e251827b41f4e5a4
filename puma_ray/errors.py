"""Errors a user can cause. Each prints as one line naming the file or field and what is expected.

Bugs stay ordinary exceptions with tracebacks; only these are caught and printed briefly by the CLI.
"""


class PumaRayError(Exception):
    """Base class for every error caused by user input (config, files, checkpoints, cluster)."""


class ConfigError(PumaRayError):
    """A config file, override or CLI flag has an unknown key or an impossible value."""


class DataError(PumaRayError):
    """An input file (npz, Parquet shard, dataset manifest) is missing, corrupt or malformed."""


class CheckpointError(PumaRayError):
    """A model checkpoint is missing, corrupt, or does not match the dataset it is used with."""


class RunDirLocked(PumaRayError):
    """Another puma-ray process is writing the same run directory (it holds the run-dir lock)."""


class OutputDirError(PumaRayError):
    """An output directory holds files puma-ray did not write, so it may not be cleared."""
