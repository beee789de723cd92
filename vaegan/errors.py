"""The one base of every error a user can fix.

`vaegan` (cli.main) catches `UserError` once and prints its message as one line, with no
traceback; anything else is a bug and keeps its traceback. Each layer subclasses it with
its own name (ConfigError, DataError, ModelError, TrainError, ...), also deriving from the
builtin a caller would expect (ValueError for bad input, RuntimeError for a failed run).
This module imports nothing, so the lightest module can raise a UserError.
"""


class UserError(Exception):
    """Bad input, or a state the user can change; the message names the bad value and what
    is allowed."""
