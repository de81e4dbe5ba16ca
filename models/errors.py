"""The exception hierarchy shared by every layer.

Every message names the offending file, field or value, so a user can fix the input
without reading a traceback.
"""

from __future__ import annotations

from pathlib import Path


class RectuneError(Exception):
    """Base class for every error rectune raises on purpose."""


class RectuneWarning(RuntimeWarning):
    """Something about the data or the cache a user should know, which does not stop the work;
    the command line shows it as one `warning:` line."""


class DataError(RectuneError):
    """A data file is missing, unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(RectuneError):
    """A setting, parameter or command-line value is invalid."""


class InvalidProposal(RectuneError):
    """Proposed parameter values break the search space; `problems` lists every violation."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class GroupError(RectuneError):
    """A user-group specification cannot be applied to a dataset."""


class DownloadError(RectuneError):
    """A public source cannot be fetched, or what arrived is not what was expected."""

    def __init__(self, url: str, message: str):
        self.url = url
        super().__init__(message)
