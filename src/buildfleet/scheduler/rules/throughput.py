"""How many jobs finished in each slot of the last minutes: the throughput chart of
the fleet's web page.

The embedded strategy notes each job as it finishes; the replicated one replaces
the whole series once per housekeeping tick with the grid's counts from the
database (every replica then shows the whole grid).  Pure: times are passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SLOT = 10.0  # seconds per bar of the chart
WINDOW = 900.0  # seconds shown: the last 15 minutes


def slot_of(when: float, slot: float = SLOT) -> int:
    return math.floor(when / slot)


@dataclass
class Throughput:
    slot: float = SLOT
    window: float = WINDOW
    counts: dict[int, int] = field(default_factory=dict)  # slot number -> jobs finished

    def note(self, when: float) -> None:
        """A job finished at `when` (wall clock)."""
        number = slot_of(when, self.slot)
        self.counts[number] = self.counts.get(number, 0) + 1
        if len(self.counts) > 2 * self.window / self.slot:
            self._trim(when)

    def replace(self, counts: dict[int, int]) -> None:
        """The whole series at once (slot number -> count), as a database counted it."""
        self.counts = dict(counts)

    def _trim(self, now: float) -> None:
        first = slot_of(now - self.window, self.slot)
        self.counts = {n: c for n, c in self.counts.items() if n > first}

    def series(self, now: float) -> list[tuple[float, int]]:
        """(slot start, jobs finished) for each slot of the window, oldest first and
        ending with the slot `now` is in (which is still filling)."""
        last = slot_of(now, self.slot)
        slots = int(self.window / self.slot)
        return [(n * self.slot, self.counts.get(n, 0)) for n in range(last - slots + 1, last + 1)]
