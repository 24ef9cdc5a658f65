"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class LabelscanError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it, on one line."""
