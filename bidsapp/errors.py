"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class UserError(Exception):
    """A problem with what the user gave (a path, a label, a file): the message names it."""
