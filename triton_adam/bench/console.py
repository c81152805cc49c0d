"""Tables, console and progress bar: rich when installed, plain text otherwise.

rich is a declared dependency, but the lent GPU machines have no network and only torch and
triton preinstalled, and ``pip install --no-deps`` does not bring rich along; the benchmark must
still print its tables there.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

try:
    from rich.console import Console as _RichConsole
    from rich.table import Table as _RichTable

    HAVE_RICH = True
except ImportError:  # pragma: no cover - exercised by monkeypatching HAVE_RICH
    HAVE_RICH = False

_MARKUP = re.compile(r"\[/?[a-z #0-9]*\]")


class PlainTable:
    """The subset of ``rich.table.Table`` this package uses, rendered as aligned text."""

    def __init__(self, title: str = "", caption: str = "") -> None:
        self.title, self.caption = title, caption
        self.columns: List[str] = []
        self.right: List[bool] = []
        self.rows: List[List[str]] = []

    def add_column(self, header: str, justify: str = "left", **_ignored) -> None:
        self.columns.append(header)
        self.right.append(justify == "right")

    def add_row(self, *cells: str, style: Optional[str] = None) -> None:
        self.rows.append([_MARKUP.sub("", str(c)) for c in cells])

    def __str__(self) -> str:
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.columns)]

        def line(cells: List[str]) -> str:
            return "  ".join(c.rjust(w) if right else c.ljust(w)
                             for c, w, right in zip(cells, widths, self.right)).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in self.rows]
        if self.caption:
            out.append(self.caption)
        return "\n".join(out)


class PlainConsole:
    """``print`` that drops rich markup."""

    def print(self, obj="", **_ignored) -> None:
        print(_MARKUP.sub("", str(obj)), file=sys.stdout, flush=True)


def make_table(title: str = "", caption: str = ""):
    """A rich Table, or a PlainTable without rich."""
    if HAVE_RICH:
        return _RichTable(title=title, caption=caption)
    return PlainTable(title=title, caption=caption)


def make_console():
    """A console for tables and messages; 160 columns when piped so CI logs do not wrap."""
    if not HAVE_RICH:
        return PlainConsole()
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return _RichConsole(width=160 if wide else None)


@contextmanager
def progress_bar(console, total: int) -> Iterator[Callable[[str], None]]:
    """Yields ``tick(description)``, called as each item starts. A rich bar on a terminal;
    without rich, one line per item so long runs still show where they are."""
    if not HAVE_RICH:
        count = {"n": 0}

        def tick_plain(msg: str) -> None:
            count["n"] += 1
            print(f"[{count['n']}/{total}] {msg}", file=sys.stderr, flush=True)

        yield tick_plain
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=total)
        started = {"n": 0}

        def tick(msg: str) -> None:
            # Called when an item starts, so the previous one is complete.
            if started["n"]:
                progress.advance(task)
            started["n"] += 1
            progress.update(task, description=msg)

        yield tick
        progress.update(task, completed=total)


@contextmanager
def job_progress(console) -> Iterator[tuple]:
    """Yields ``(start, done)`` for jobs whose number is known only once they are listed:
    ``start(total, description)`` once, then ``done(description)`` as each job ends (in any
    order). A rich bar on a terminal; without rich, one line per finished job."""
    if not HAVE_RICH:
        state = {"n": 0, "total": 0}

        def start_plain(total: int, msg: str) -> None:
            state["total"] = total
            print(msg, file=sys.stderr, flush=True)

        def done_plain(msg: str) -> None:
            state["n"] += 1
            print(f"[{state['n']}/{state['total']}] {msg}", file=sys.stderr, flush=True)

        yield start_plain, done_plain
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("listing", total=None)

        def start(total: int, msg: str) -> None:
            progress.update(task, total=total, description=msg)

        def done(msg: str) -> None:
            progress.update(task, advance=1, description=msg)

        yield start, done
