"""The principal of the call being served, for the services (set by the
authentication interceptor, `buildfleet.server.auth`; None when authentication is
not configured)."""

from __future__ import annotations

import contextvars
import logging

from buildfleet.auth.principal import Principal
from buildfleet.config.security import Role
from buildfleet.scheduler.rules.ownership import Caller

audit = logging.getLogger("buildfleet.audit")

PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "buildfleet_principal", default=None)


def current() -> Principal | None:
    return PRINCIPAL.get()


def owner() -> str:
    """The name operations and bot sessions made by this call belong to."""
    principal = PRINCIPAL.get()
    return "" if principal is None else principal.name


def caller_on(instance: str) -> Caller | None:
    """The caller as the scheduler sees it on `instance` (None: anyone may do anything)."""
    principal = PRINCIPAL.get()
    if principal is None:
        return None
    return Caller(principal.name, admin=principal.may(Role.ADMIN, instance))


def note_admin(what: str, of: str) -> None:
    """Log what an admin does to another principal's work (the audit log)."""
    principal = PRINCIPAL.get()
    if principal is not None and of != principal.name:
        audit.warning("admin %s %s (of principal %r)", principal.name, what, of or "")
