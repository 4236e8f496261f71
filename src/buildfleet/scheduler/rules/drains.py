"""Drains: bots that finish what they run and take nothing new.

A drain is a pattern, stored per instance, that matches bots by id or by property:

- ``linux-7`` or ``spot-*``: a glob on the bot id;
- ``pool=spot`` or ``zone=eu-*``: a property name and a glob on its value (a bot
  with several values of the property is drained when one matches).

It holds for bots that register later too, until it is removed.  A drained bot
keeps its leases and reports them as usual; it is simply never offered new work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import Properties

MAX_PATTERN = 256


@dataclass(frozen=True, slots=True)
class Drain:
    pattern: str
    created_at: float  # wall clock


def check_pattern(pattern: str) -> str:
    """The pattern, stripped; InvalidArgument saying what is wrong with a bad one."""
    text = pattern.strip()
    if not text:
        raise InvalidArgument("a drain pattern is a bot id glob (linux-*) or "
                              "PROPERTY=VALUE-GLOB (pool=spot); it is empty")
    if len(text) > MAX_PATTERN:
        raise InvalidArgument(f"drain pattern is {len(text)} characters long; at most "
                              f"{MAX_PATTERN}")
    if any(ord(c) < 32 or ord(c) == 127 or c.isspace() for c in text):
        raise InvalidArgument(f"drain pattern {text!r} contains spaces or control "
                              "characters")
    name, equals, _ = text.partition("=")
    if equals and not name:
        raise InvalidArgument(f"drain pattern {text!r} names no property before '='")
    return text


def matches(pattern: str, bot_id: str, properties: Properties) -> bool:
    name, equals, value = pattern.partition("=")
    if not equals:
        return fnmatchcase(bot_id, pattern)
    return any(key == name and fnmatchcase(item, value) for key, item in properties)


def drained(bot_id: str, properties: Properties, patterns: Iterable[str]) -> bool:
    """Whether any of `patterns` drains the bot."""
    return any(matches(pattern, bot_id, properties) for pattern in patterns)
