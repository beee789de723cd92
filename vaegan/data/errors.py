"""The data layer's error and warning types.

Kept in their own tiny module so the CLI can catch `DataError` without importing torch or
WebDataset.
"""

from vaegan.errors import UserError


class DataError(UserError, ValueError):
    """Bad data input: a missing source, an unwritable or unreachable destination, shards
    that cannot be read, or too many corrupt samples. The message names the bad value."""


class DataWarning(UserWarning):
    """Something was skipped but the work goes on (an unreadable image, a corrupt shard)."""
