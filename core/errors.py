"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class SlimnasError(Exception):
    """Bad input or a failed step whose message is fit to show the user as it is."""


def first_line(error: BaseException) -> str:
    """A library error reduced to one line for a user-facing message (its type when it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The whole message of an error joined onto one line (records and the CLI's last line)."""
    return " ".join(str(error).split()) or type(error).__name__
