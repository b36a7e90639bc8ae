"""Errors caused by the user's configuration or files, reported as one line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


class ConfigurationError(ValueError):
    """A configuration value that cannot work, with the key and the fix in the message."""


#: Exceptions whose message alone tells the user what to fix. Set LVLRFR_DEBUG=1 to see the traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, ImportError)


def exit_with_error(error: BaseException) -> NoReturn:
    """Print ``lvlrfr: error: <message>`` on stderr and exit with status 2 (traceback with LVLRFR_DEBUG=1)."""
    if os.environ.get("LVLRFR_DEBUG"):
        raise error
    logging.getLogger("lvlrfr").debug("Stopping on a user error", exc_info=error)
    message = str(error)
    cause = error.__cause__ or error.__context__
    # jsonargparse wraps errors raised while instantiating classes; show the original message.
    while cause is not None and type(error).__name__ in ("ArgumentError",) and str(cause) and str(cause) not in message:
        message = f"{message}: {cause}"
        cause = cause.__cause__
    print(f"lvlrfr: error: {message}", file=sys.stderr)
    print("lvlrfr: set LVLRFR_DEBUG=1 to see the traceback", file=sys.stderr)
    raise SystemExit(2)
