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

try:  # tqdm is optional: `pip install linguistic-collapse[progress]`
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised where tqdm is absent
    _tqdm = None


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

    def close(self) -> None:
        self.show(force=True)


class Bars:
    """Draws the engine's live bars; forgets (closes) bars that ended."""

    def __init__(self) -> None:
        self._bars: Dict[int, Any] = {}
        self._done: set = set()

    def _open(self, message: str, length: Optional[int], unit: str) -> Any:
        if _tqdm is None:
            return _PlainBar(message, length, unit)
        return _tqdm(
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
            if _tqdm is None:
                bar.desc, bar.total, bar.n = message, length, position
                bar.show()
            else:
                if bar.total != length:
                    bar.total = length
                if bar.desc != message:
                    bar.set_description_str(message, refresh=False)
                bar.update(position - bar.n)
            if finished:
                self._close(bar_id)
        for bar_id in [b for b in self._bars if b not in seen]:
            self._close(bar_id)

    def _close(self, bar_id: int) -> None:
        bar = self._bars.pop(bar_id, None)
        self._done.add(bar_id)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for bar_id in list(self._bars):
            self._close(bar_id)
