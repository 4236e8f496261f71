"""Whose work is whose.

With authentication configured, an operation belongs to the principal that
submitted it (every Execute makes an operation of its own, also when it joins an
identical action in flight), and a bot session to the principal that created it.
A principal sees only its own operations -- any other is answered as if it did
not exist, so that nothing reveals another user's work -- unless it is an admin of
the instance; a bot session is driven only by its owner (or an admin), so no one
can take over a bot's leases.  Without authentication (`caller` None) everyone
may do everything, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from buildfleet.errors import NotFound, PermissionDenied


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    admin: bool = False


def sees(owner: str, caller: Caller | None) -> bool:
    return caller is None or caller.admin or owner == caller.name


def no_such_operation(name: str) -> NotFound:
    return NotFound(f"operation {name!r} does not exist (or has expired)")


def check_operation(name: str, owner: str, caller: Caller | None) -> None:
    """NotFound, as for an operation that does not exist, unless `caller` may see it."""
    if not sees(owner, caller):
        raise no_such_operation(name)


def check_session(name: str, owner: str, caller: Caller | None) -> None:
    """PermissionDenied unless `caller` may drive the bot session."""
    if not sees(owner, caller):
        assert caller is not None
        raise PermissionDenied(f"bot session {name!r} belongs to another principal, not "
                               f"{caller.name!r}; register a session of your own")
