"""One progress display for a build: a rich bar on a terminal, plain log lines otherwise (CI, pipes)."""
from __future__ import annotations

import sys
import time


class Reporter:
    def __init__(self, quiet: bool = False, live: bool | None = None):
        self.quiet = quiet
        self.live = sys.stderr.isatty() if live is None else live
        self._progress = None
        self._task = None
        self._last = 0.0

    def line(self, msg: str) -> None:
        if self._progress is not None:
            self._progress.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.line(msg)

    def start(self, name: str, reasons: list[str]) -> None:
        self.info(f"run  {name}: {'; '.join(reasons)}")
        if self.live and not self.quiet:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(name, total=None, info="")

    def update(self, done: int, total: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, info=info)
        elif not self.quiet and (time.monotonic() - self._last > 10 or done == total):
            self._last = time.monotonic()
            self.line(f"     {done}/{total} {info}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def done(self, name: str, seconds: float, note: str = "") -> None:
        self.stop()
        self.info(f"done {name} in {seconds:.1f}s{' - ' + note if note else ''}")
