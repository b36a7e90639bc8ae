"""Command-line parsing shared by the ``lvlrfr evaluate`` and ``lvlrfr prepare`` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lvlrfr.utils.errors import make_concise


def parse_function_arguments(function: Callable[..., Any], prog: str, description: str, argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` into the keyword arguments of ``function``, from its signature and an optional ``--config`` YAML.

    Nested dataclass arguments are instantiated; ones given as plain mappings stay dicts for the caller
    to convert. Errors print the concise usage of the command and exit, as with any argparse parser.
    """
    parser = make_concise(ArgumentParser)(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_function_arguments(function)
    config = parser.instantiate(parser.parse_args(argv))
    arguments = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    arguments.pop("config", None)
    return arguments
