"""The one exception type for bad user input.

Anything the user can fix (a missing file, a missing column, a mistyped key, a sequence longer than
the model's context) raises `UserError` with a message that names the problem. The entry point
prints that message alone and exits with status 2, instead of a traceback from deep inside torch.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message must name the file, column, key or shape."""
