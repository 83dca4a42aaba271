"""The base of every error a user can fix by changing an input or the configuration.

The CLI turns these into exit code 1 with their message, which always names the file or key at fault.
"""


class UserError(Exception):
    """Bad input or configuration (not a bug): the message says which file or key, and what is wrong."""
