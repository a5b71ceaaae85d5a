"""User-facing errors.

Everything a user can get wrong (a missing data file, an unknown name, an invalid config value)
raises a subclass of :class:`MarginlabError` with a one-line message that names the problem and,
where possible, the fix. The CLI prints such errors as one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class MarginlabError(Exception):
    """Base class of errors caused by user input; the message is a single line."""


class DataError(MarginlabError):
    """A dataset is missing, corrupt, truncated, or asked for by an unknown name."""


class ConfigError(MarginlabError):
    """A config file, override, CLI argument or hyperparameter is invalid."""


class RunDirError(MarginlabError):
    """A run directory cannot be created, resumed or read (finished, locked, incomplete)."""


class NotSeparableError(MarginlabError):
    """The data are not linearly separable, so a hard-margin SVM does not exist."""
