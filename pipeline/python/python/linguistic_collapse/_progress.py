"""Progress bars for stages run in process.

The engine's bars live in Rust; :class:`Bars` is called about ten times a
second with their state, ``(id, message, position, length, unit, finished)``
per live bar, and draws them with ``tqdm.auto`` (a widget in a notebook, a
bar in a terminal). Without tqdm it writes one plain line per bar to stderr,
at most every few seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Tuple

BarState = Tuple[int, str, int, Optional[int], str, bool]


def _tqdm_class() -> Any:
    """tqdm.auto's bar, or None without tqdm (`pip install
    linguistic-collapse[progress]`). Imported when a run first shows
    progress: it takes longer to import than this package."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class _PlainBar:
    """A stand-in for tqdm: a line on stderr every few seconds and at the end."""

    EVERY = 5.0

    def __init__(self, desc: str, total: Optional[int], unit: str) -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.shown = 0.0

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.shown < self.EVERY:
            return
        self.shown = now
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"{self.desc}: {self.n}{of} {self.unit}\n")
        sys.stderr.flush()

    def update(self, k: int) -> None:
        self.n += k
        self.show()

    def close(self) -> None:
        self.show(force=True)


class _NoBar:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(desc: str, total: Optional[int], unit: str, quiet: bool = False) -> Any:
    """One bar for work driven from Python (tqdm's, a plain line, or none
    with ``quiet``): ``update(k)`` and ``close()``."""
    if quiet:
        return _NoBar()
    tqdm = _tqdm_class()
    if tqdm is None:
        return _PlainBar(desc, total, unit)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)


class Bars:
    """Draws the engine's live bars; forgets (closes) bars that ended."""

    def __init__(self) -> None:
        self._tqdm = _tqdm_class()
        self._bars: Dict[int, Any] = {}
        self._done: set = set()

    def _open(self, message: str, length: Optional[int], unit: str) -> Any:
        if self._tqdm is None:
            return _PlainBar(message, length, unit)
        return self._tqdm(
            total=length,
            desc=message,
            unit=unit,
            unit_scale=True,
            unit_divisor=1024 if unit == "B" else 1000,
            leave=True,
            dynamic_ncols=True,
        )

    def __call__(self, states: List[BarState]) -> None:
        seen = set()
        for bar_id, message, position, length, unit, finished in states:
            if bar_id in self._done:
                continue
            seen.add(bar_id)
            bar = self._bars.get(bar_id)
            if bar is None:
                bar = self._bars[bar_id] = self._open(message, length, unit)
            if self._tqdm is None:
                bar.desc, bar.total, bar.n = message, length, position
                bar.show()
            else:
                if bar.total != length:
                    bar.total = length
                if bar.desc != message:
                    bar.set_description_str(message, refresh=False)
                bar.update(position - bar.n)
            if finished:
                self._close(bar_id, fill=False)
        # A bar that is gone while the run goes on ended between two polls
        # (the engine drops a bar when its work is done): draw it full.
        for bar_id in [b for b in self._bars if b not in seen]:
            self._close(bar_id, fill=True)

    def _close(self, bar_id: int, fill: bool) -> None:
        bar = self._bars.pop(bar_id, None)
        self._done.add(bar_id)
        if bar is None:
            return
        if fill and bar.total:
            if self._tqdm is None:
                bar.n = bar.total
            else:
                bar.update(bar.total - bar.n)
        bar.close()

    def close(self) -> None:
        """At the end of a run: bars still open stay where the work stopped."""
        for bar_id in list(self._bars):
            self._close(bar_id, fill=False)
