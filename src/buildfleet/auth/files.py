"""A file re-read when it changes, without a stat on every use."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
CHECK_EVERY = 1.0  # seconds between looks at the file


class Watched(Generic[T]):
    """The parsed contents of `path`, parsed again once the file changes (its inode,
    size or change time).  A file that no longer parses keeps the last good contents
    (and is logged), so an edit in progress locks nobody out."""

    def __init__(self, path: Path, parse: Callable[[bytes], T], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._parse = parse
        self._clock = clock
        self._version: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._value = self._load(first=True)

    def get(self) -> T:
        now = self._clock()
        if now - self._checked >= CHECK_EVERY:
            self._checked = now
            try:
                version = self._stat()
            except OSError as error:
                log.error("cannot read %s: %s; keeping what it said before", self.path,
                          error.strerror)
                return self._value
            if version != self._version:
                self._value = self._load(first=False)
        return self._value

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return info.st_ino, info.st_size, info.st_ctime_ns

    def _load(self, *, first: bool) -> T:
        version = self._stat()
        data = self.path.read_bytes()
        try:
            value = self._parse(data)
        except ValueError as error:
            if first:
                raise ValueError(f"{self.path}: {error}") from None
            log.error("%s no longer parses (%s); keeping what it said before", self.path,
                      error)
            self._version = version
            return self._value
        if not first:
            log.info("re-read %s", self.path)
        self._version = version
        return value
