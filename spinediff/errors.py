"""The one exception type for errors a user can cause (bad input, missing paths, wrong flags).

The CLI prints its message without a traceback and exits with status 2. Messages should name
the file, say what is wrong and how to fix it.
"""

from __future__ import annotations


class SpineDiffError(Exception):
    """A user-caused error: bad input files, a missing environment variable, invalid settings."""

    exit_code = 2
