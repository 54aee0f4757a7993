"""User-facing errors.

Anything the user can fix (a config key, a path, a checkpoint, a model that does not trace) raises a subclass of
`UserError`. `ptq_main.py` turns it into a single line on stderr and exit status 2; everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, out of range or points at a missing file."""

    def __init__(self, key: str, expected: str, actual=None, *, show_actual: bool = True):
        self.key, self.expected, self.actual = key, expected, actual
        msg = f"config key '{key}': expected {expected}"
        if show_actual:
            msg += f", got {actual!r}"
        super().__init__(msg)


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match the model."""


class DataError(UserError):
    """A dataset folder is missing or does not have the ImageFolder layout."""


class TraceError(UserError):
    """torch.fx could not trace the model."""


class NumericalError(UserError):
    """A loss became NaN or infinite during optimisation."""
