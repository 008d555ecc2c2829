"""The base class of the errors a user is expected to meet (bad config, missing file, offline name).

The command line prints such an error as one line on stderr and exits with status 2; anything
else is a bug and keeps its traceback. ``UserError`` is a ``ValueError``, so code that catches
``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """An expected failure caused by the user's input or environment; the message names what to fix."""
