"""The one exception type for bad user input found while reading a BIDS dataset.

The CLI catches :class:`BIDSInputError` and prints ``str(err)`` as a single line (no traceback):
every message names the file or folder and the problem, e.g.
``/data/bids: not a BIDS dataset (no dataset_description.json)``.
"""

from __future__ import annotations

from bidsapp.errors import UserError


class BIDSInputError(UserError, ValueError):
    """Bad input that the user can fix: the message is one line and names the file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
