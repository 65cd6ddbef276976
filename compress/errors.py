"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class SlimnasError(Exception):
    """Bad input or a failed step whose message is fit to show the user as it is."""
