"""Ctrl-C that cannot be lost.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be; when that is a
weakref callback or a __del__ (garbage collection runs them at any moment), the exception is printed
as "Exception ignored in ..." and dropped, and the run would carry on as if nothing was pressed.
The handler here also sets a flag: long loops call `check()` at safe points, and the CLI exits 130
whenever the flag is set, so a swallowed interrupt still stops the work at the next safe point.
"""

import signal

_requested = False


def _on_sigint(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT through the flag; call once from the main thread of the console script."""
    global _requested
    _requested = False
    signal.signal(signal.SIGINT, _on_sigint)


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if its first exception was swallowed."""
    if _requested:
        raise KeyboardInterrupt
