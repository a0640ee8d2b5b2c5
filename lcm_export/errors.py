"""The one error type users see: a single line that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with code 2."""
