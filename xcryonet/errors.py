"""The one error type for bad user input: it names the file and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input that the user can fix. ``str(err)`` is ``"<path>: <problem>"`` on one line.

    The CLI prints it and exits with code 2; nothing else (no traceback) is shown.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        # Control characters in a name (a newline, say) would break the one-line promise.
        self.path = "".join(ch if ch.isprintable() else "?" for ch in str(path))
        # One line, always: collapse any newlines coming from library messages.
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str]]:
        # Lets the error cross process boundaries (parallel extraction) intact.
        return (type(self), (self.path, self.problem))
