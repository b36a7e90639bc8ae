"""Errors caused by the user's configuration or files, reported as one message instead of a traceback."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import NoReturn


class ConfigurationError(ValueError):
    """A configuration value that cannot work, with the key and the fix in the message."""


#: Exceptions whose message alone tells the user what to fix. Set LVLRFR_DEBUG=1 to see the traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, ImportError)

# Lines of jsonargparse's union-type reports that repeat the config instead of naming the problem.
_NOISE = re.compile(
    r"^\s*(-\s*)?(Expected a <class 'NoneType'>|Given value( type)?:|Subtypes:|Errors:|"
    r"Does not validate against any of the Union subtypes|Parser key \"model\":)"
)


def condense_parser_message(message: str) -> str:
    """Drop jsonargparse's union-type boilerplate and keep the lines that name the key and the problem."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip() and not _NOISE.match(line)]
    if not lines:
        return message
    return "; ".join(lines).replace(":; ", ": ")


def innermost_user_error(error: BaseException) -> BaseException:
    """Return the deepest exception in the cause chain that is a user error (jsonargparse wraps them)."""
    found = error
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            found = current
        current = current.__cause__ or current.__context__
    return found


def exit_with_error(error: BaseException) -> NoReturn:
    """Print ``lvlrfr: error: <message>`` on stderr and exit with status 2 (traceback with LVLRFR_DEBUG=1)."""
    if os.environ.get("LVLRFR_DEBUG"):
        raise error
    logging.getLogger("lvlrfr").debug("Stopping on a user error", exc_info=error)
    print(f"lvlrfr: error: {innermost_user_error(error)}", file=sys.stderr)
    print("lvlrfr: set LVLRFR_DEBUG=1 to see the traceback", file=sys.stderr)
    raise SystemExit(2)


def concise_parser_error(parser, message: str) -> NoReturn:
    """Print a jsonargparse parse error as two lines (the problem, then where to find the options) and exit 2."""
    print(f"lvlrfr: error: {condense_parser_message(message)}", file=sys.stderr)
    print(f"lvlrfr: run '{parser.prog.replace(' [options]', '')} --help' to list the accepted options", file=sys.stderr)
    raise SystemExit(2)


def make_concise(parser_class: type) -> type:
    """Return a subclass of a jsonargparse parser class whose parse errors use :func:`concise_parser_error`."""

    class ConciseParser(parser_class):
        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("LVLRFR_DEBUG"):
                return super().error(message, ex)
            concise_parser_error(getattr(ex, "subcommand_parser", None) or self, message)

    ConciseParser.__name__ = ConciseParser.__qualname__ = f"Concise{parser_class.__name__}"
    return ConciseParser
