"""User-facing errors. ``str(err)`` is the message; the CLI prints it as ``error:``/``hint:`` lines."""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Mark:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a spec: where, which value, what is wrong, and how to fix it."""

    message: str
    mark: Mark | None = None
    path: str = "$"
    hint: str | None = None
    rule: str = "schema"
    severity: str = "error"  # error | warning

    def render(self) -> str:
        where = f"{self.mark}: " if self.mark else ""
        # a problem with the file itself (no position, no value) is not about `$`
        text = f"{where}{self.path}: {self.message}" if self.mark or self.path != "$" else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def sort_key(self):
        m = self.mark
        return (m.file if m else "", m.line if m else 0, m.col if m else 0, self.path, self.message)


class StorycError(Exception):
    """An error the user can act on; never shown with a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(StorycError):
    """A wrong command line (exit 64, as argparse's own usage errors)."""


class SpecError(StorycError):
    """A spec with one or more problems; carries every diagnostic found in one pass."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        n = len(self.diagnostics)
        body = "\n".join(d.render() for d in self.diagnostics)
        super().__init__(f"{body}\n{n} problem{'s' if n != 1 else ''} found")


class StageError(StorycError):
    """A stage failed; finished outputs are kept and the next build resumes."""

    def __init__(self, stage: str, message: str, hint: str | None = None):
        super().__init__(f"stage {stage}: {message}", hint)
        self.stage = stage


def did_you_mean(word: str, options) -> str | None:
    """A "did you mean" hint for a likely typo, or None."""
    match = difflib.get_close_matches(str(word), sorted(set(map(str, options))), n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else None
