"""The one error type for mistakes a user can fix (bad file, bad field, impossible budget).

The CLI prints it as a single ``error: ...`` line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, named in one line: what is wrong and where."""
