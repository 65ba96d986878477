"""One exception type for mistakes a user can make.

The CLI catches `UserError` and prints its message as a single line with a
non-zero exit, so bad input never ends in a traceback.
"""


class UserError(Exception):
    """A problem with the user's input: message names the file/field/flag and the fix."""
