"""The one exception type for mistakes a user can fix.

Anything raised as UserError is printed by the entry point and the tools as a single line and the
process exits with status 2 (the conventional "usage error" status); no traceback is shown.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, files, models) that they can fix."""

    exit_code = 2
