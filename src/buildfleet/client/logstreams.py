"""How a bot learns where to stream the output of its leases (a buildfleet extension
of UpdateBotSession; other servers and bots ignore it).

A bot that streams sends the request header `WANTED` on UpdateBotSession; the
answer's trailing metadata `KEY` then holds, for each lease new to the bot, the
write names of the lease's stdout and stderr log streams, as JSON
``{lease id: [stdout write name, stderr write name]}``.
"""

from __future__ import annotations

import json

WANTED = "buildfleet-logstreams"
KEY = "buildfleet-logstreams-bin"


def encode(streams: dict[str, tuple[str, str]]) -> bytes:
    return json.dumps({lease: list(names) for lease, names in streams.items()}).encode()


def decode(value: bytes | str) -> dict[str, tuple[str, str]]:
    """The write names in a `KEY` value; ValueError when it is not one."""
    try:
        given = json.loads(value)
        return {str(lease): (str(names[0]), str(names[1])) for lease, names in given.items()}
    except (TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"not a map of lease ids to two names: {error}") from None
