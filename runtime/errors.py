"""The one exception type users see for bad input.

The CLI prints a MixsparseError as a single line naming the cause; any other exception is a bug
and keeps its traceback.
"""


class MixsparseError(Exception):
    """Bad input or an unusable artifact/model, with a message that names the thing at fault."""
