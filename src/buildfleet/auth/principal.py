"""A principal: who made a call, and what its grants let it do."""

from __future__ import annotations

from dataclasses import dataclass

from buildfleet.config.security import INCLUDES, Grant, Role


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    grants: tuple[Grant, ...]
    via: str  # how it was authenticated: "token", "jwt" or "certificate"

    def may(self, role: Role, instance: str, bot_id: str | None = None) -> bool:
        return any(grant.allows(role, instance, bot_id) for grant in self.grants)

    def may_anywhere(self, role: Role) -> bool:
        """Whether some grant gives `role` on some instance."""
        return any(role in INCLUDES[grant.role] for grant in self.grants)


class Unauthenticated(Exception):
    """The credentials presented are missing or not valid (the reason says which)."""
