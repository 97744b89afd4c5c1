"""The one exception type users see: the CLI turns it into a single line on stderr and exit 1."""


class TinygenError(Exception):
    """A user-facing problem (bad file, bad flag value, ...). The message should say how to fix it."""


def one_line(e: Exception) -> str:
    """A library's message folded onto one line, as the CLI promises one line per error (jinja2's
    errors keep theirs in .message)."""
    return " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
