"""The error raised when a data file does not follow its format."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file (index, record file, pickle, list) whose content does not match its format.

    The message names the file, what was found there and how to fix it, for example
    ``train.idx line 3: expected '<key>\\t<offset>' with two integers, found 'abc'; regenerate the .idx``.

    Attributes:
        path: the offending file.
        problem: what was found and what was expected.
        fix: what the user can do about it.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}; {fix}")
