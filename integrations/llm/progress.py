"""Progress of a run's sweep and parts: one line per finished run with the time so far and an estimate of the time
left, and on a terminal a bar (tqdm, where installed) that shows the run under way and the time left.

    with Progress(9, "sweep") as bar:           # prints "sweep: 9 runs to go"
        for lr in rates:
            bar.begin(f"nli/tl6/r8 lr {lr:g}")  # the bar names the run under way
            ...
            bar.done("nli/tl6/r8 lr 0.003: accuracy 41.0 (52s)")
            # "[1/9] nli/tl6/r8 lr 0.003: accuracy 41.0 (52s); 52s elapsed, about 6m56s left"

Off a terminal (CI, a log file) there is no bar, only those lines. The estimate is the mean time of the runs finished
so far times the runs left.
"""

from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """``seconds`` as ``42s``, ``3m05s`` or ``2h07m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _bar(total: int, what: str):
    """A tqdm bar on stderr where stderr is a terminal and tqdm is installed (the bench extra); else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=what, unit="run", file=sys.stderr, dynamic_ncols=True)


class Progress:
    """Runs of a known number (``grow`` adds or removes some): a header line, one line per finished run with the
    elapsed time and the time left, and on a terminal a bar. A context manager; ``close`` ends the bar."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.n = total, what, 0
        self.start = time.perf_counter()
        self.bar = None
        if total:
            print(f"{what}: {total} run{'s' if total != 1 else ''} to go", flush=True)
            self.bar = _bar(total, what)

    def grow(self, n: int) -> None:
        """``n`` runs more (fewer, if negative) than announced."""
        self.total += n
        if self.bar is not None and n:
            self.bar.total = self.total
            self.bar.refresh()

    def begin(self, label: str) -> None:
        """A run starts: on a terminal the bar names it."""
        if self.bar is not None:
            self.bar.set_description(f"{self.what}: {label}")

    def done(self, line: str) -> None:
        """A run finished: print ``line`` with the count, the elapsed time and the time left."""
        self.n += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.n * max(0, self.total - self.n)
        text = f"[{self.n}/{self.total}] {line}; {clock(elapsed)} elapsed" + (
            f", about {clock(left)} left" if self.n < self.total else "")
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.update(1)
            self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        """End the bar (a no-op without one)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
