"""The one exception type users see: the CLI turns it into a single line on stderr and exit 1."""


class TinygenError(Exception):
    """A user-facing problem (bad file, bad flag value, ...). The message should say how to fix it."""
