"""Errors a user can cause, reported as one clear line by the CLI."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, file, folder, shape) that the user can fix.

    The message names the thing that is wrong and says what to do; the CLI prints it as one line, without a traceback.
    """
