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
#: OSError covers lvlrfr's own I/O errors (a teacher that cannot be loaded, an unreadable image) and
#: environment failures such as a full disk or a refused permission.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)

#: Package whose modules write the messages that :func:`user_error_to_report` prefers.
PROJECT_PACKAGE = "lvlrfr"

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


def cause_chain(error: BaseException) -> list[BaseException]:
    """Return ``error`` followed by its causes (``__cause__``, else ``__context__``), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def raised_in_project(error: BaseException) -> bool:
    """Return True when the frame that raised ``error`` belongs to a module of the lvlrfr package."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    frame_globals = traceback.tb_frame.f_globals
    # A module run with ``python -m`` is named __main__, but its spec still has the dotted name.
    spec = frame_globals.get("__spec__")
    module = spec.name if spec is not None else frame_globals.get("__name__", "")
    return module == PROJECT_PACKAGE or module.startswith(f"{PROJECT_PACKAGE}.")


def user_error_to_report(error: BaseException) -> BaseException:
    """Pick the exception of ``error``'s cause chain whose message the user should see.

    The outermost user error raised in lvlrfr code wins, because lvlrfr re-raises library errors
    (``from error``) with the option and the fix in its own message. Without one, the innermost user
    error wins, which skips the union-type ``ValueError`` that jsonargparse wraps around an exception
    raised while it instantiates a class. Without any user error, ``error`` itself is returned.
    """
    chain = cause_chain(error)
    user_errors = [exception for exception in chain if isinstance(exception, USER_ERRORS)]
    for exception in user_errors:
        if raised_in_project(exception):
            return exception
    return user_errors[-1] if user_errors else error


def exit_with_error(error: BaseException) -> NoReturn:
    """Print ``lvlrfr: error: <message>`` on stderr and exit with status 2 (traceback with LVLRFR_DEBUG=1)."""
    if os.environ.get("LVLRFR_DEBUG"):
        raise error
    logging.getLogger("lvlrfr").debug("Stopping on a user error", exc_info=error)
    print(f"lvlrfr: error: {user_error_to_report(error)}", file=sys.stderr)
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
