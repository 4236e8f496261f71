"""The audit log: refused calls (once per principal and reason within a window, so
that a misconfigured client cannot flood the log) and administrative actions."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("buildfleet.audit")

WINDOW = 60.0  # seconds during which the same refusal is logged once
MEMORY = 10_000  # refusals remembered


class Audit:
    def __init__(self, *, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._logged: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def refused(self, who: str, reason: str, method: str, peer: str) -> None:
        """Log a refused call, unless the same one was logged within the window (the
        next line says how many were left out)."""
        key = (who, reason)
        now = self._clock()
        last = self._logged.get(key)
        if last is not None and now - last[0] < self.window:
            self._logged[key] = (last[0], last[1] + 1)
            return
        skipped = f" ({last[1]} more like it in the last {self.window:g}s)" if last and last[1] \
            else ""
        log.warning("refused %s from %s (%s): %s%s", method, who, peer, reason, skipped)
        self._logged[key] = (now, 0)
        self._logged.move_to_end(key)
        while len(self._logged) > MEMORY:
            self._logged.popitem(last=False)

    def admin(self, principal: str, action: str) -> None:
        log.warning("admin %s: %s", principal, action)
