"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class LabelscanError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it, on one line."""


def first_line(exc: BaseException) -> str:
    """A library's message cut to one line for ours; a heading that ends in ':' keeps its first detail."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
