"""Errors a user can act on.

Every failure the CLI reports without a traceback is a `UserError`: its message names what went
wrong and where (a file, a field path, a store URI). Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input or environment, reported as one clear message."""


class SpecError(UserError):
    """A job file that cannot be loaded; carries every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StoreError(UserError):
    """The object store is unreachable, refuses an operation, or holds a damaged artifact."""


class DataError(UserError):
    """A tenant's training or evaluation data is missing or malformed."""


class BaseSourceError(UserError):
    """A base-model source that does not exist or is not a usable model."""


class AdapterError(UserError):
    """An adapter folder that is not a readable safetensors PEFT adapter."""
