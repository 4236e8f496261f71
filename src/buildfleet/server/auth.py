"""Every call authenticated and authorized, in one place: a server interceptor.

When authentication is configured, each call is authenticated first
(UNAUTHENTICATED, saying which credentials the server accepts, when it carries
none that are valid), then checked against `RULES`: the roles that may make it,
on the instance the request names (PERMISSION_DENIED naming the role and the
instance that would be needed).  gRPC health checking stays open; reflection
needs `read` somewhere.  The principal is then available to the services as
`current_principal()` (operations and bot sessions belong to it).  Refusals go to
the audit log, once per principal and reason within a window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from buildfleet.auth.audit import Audit
from buildfleet.auth.authenticator import Authenticator
from buildfleet.auth.principal import Principal, Unauthenticated
from buildfleet.config.security import INCLUDES, Role
from buildfleet.errors import BuildfleetError
from buildfleet.server.bots.service import instance_of_session
from buildfleet.server.bytestream.resource import parse_read, parse_write
from buildfleet.server.execution.service import instance_of_operation
from buildfleet.server.interception import Enter, Interceptor
from buildfleet.server.logstream.store import is_log_name, parse_log_name
from buildfleet.server.principal import PRINCIPAL
from buildfleet.server.rpc import Undecodable


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role]  # any of these, on the request's instance
    instance: Callable[[Any], str] | None  # None: any instance will do
    bot_id: Callable[[Any], str] | None = None
    # the roles for this particular request, when they depend on it (else `roles`)
    roles_of: Callable[[Any], frozenset[Role]] | None = None


READ = frozenset({Role.READ, Role.BOT})  # what bots need of the CAS, they may do
WRITE = frozenset({Role.EXECUTE, Role.BOT})
LOG_WRITE = frozenset({Role.BOT})


def _named(request: Any) -> str:
    return str(request.instance_name)


def _instance_of(name: str, parse_cas_name: Callable[[str], Any]) -> str:
    """The instance of a ByteStream resource: a log stream's, or a CAS name's."""
    parse = parse_log_name if is_log_name(name) else parse_cas_name
    return str(parse(name).instance_name)


def _read_resource(request: Any) -> str:
    return _instance_of(request.resource_name, parse_read)


def _write_resource(request: Any) -> str:
    return _instance_of(request.resource_name, parse_write)


def _write_roles(request: Any) -> frozenset[Role]:
    """Only bots write log streams (the output of the actions they run)."""
    return LOG_WRITE if is_log_name(request.resource_name) else WRITE


def _operation(request: Any) -> str:
    return instance_of_operation(request.name)


_REAPI = "/build.bazel.remote.execution.v2."
RULES: dict[str, Rule] = {
    _REAPI + "Capabilities/GetCapabilities": Rule(READ, _named),
    _REAPI + "ContentAddressableStorage/FindMissingBlobs": Rule(READ, _named),
    _REAPI + "ContentAddressableStorage/BatchReadBlobs": Rule(READ, _named),
    _REAPI + "ContentAddressableStorage/GetTree": Rule(READ, _named),
    _REAPI + "ContentAddressableStorage/BatchUpdateBlobs": Rule(WRITE, _named),
    _REAPI + "ActionCache/GetActionResult": Rule(frozenset({Role.READ}), _named),
    _REAPI + "ActionCache/UpdateActionResult": Rule(frozenset({Role.CACHE_WRITE}), _named),
    _REAPI + "Execution/Execute": Rule(frozenset({Role.EXECUTE}), _named),
    _REAPI + "Execution/WaitExecution": Rule(frozenset({Role.EXECUTE}), _operation),
    "/google.bytestream.ByteStream/Read": Rule(READ, _read_resource),
    "/google.bytestream.ByteStream/Write": Rule(WRITE, _write_resource,
                                                roles_of=_write_roles),
    "/google.bytestream.ByteStream/QueryWriteStatus": Rule(WRITE, _write_resource,
                                                           roles_of=_write_roles),
    "/build.bazel.remote.logstream.v1.LogStreamService/CreateLogStream": Rule(
        LOG_WRITE, lambda request: str(request.parent)),
    **{f"/build.bazel.remote.asset.v1.Fetch/{method}": Rule(frozenset({Role.READ}), _named)
       for method in ("FetchBlob", "FetchDirectory")},
    **{f"/build.bazel.remote.asset.v1.Push/{method}": Rule(frozenset({Role.CACHE_WRITE}),
                                                           _named)
       for method in ("PushBlob", "PushDirectory")},
    "/google.longrunning.Operations/GetOperation": Rule(frozenset({Role.EXECUTE}), _operation),
    "/google.longrunning.Operations/WaitOperation": Rule(frozenset({Role.EXECUTE}), _operation),
    "/google.longrunning.Operations/CancelOperation": Rule(frozenset({Role.EXECUTE}),
                                                           _operation),
    "/google.longrunning.Operations/DeleteOperation": Rule(frozenset({Role.EXECUTE}),
                                                           _operation),
    "/google.longrunning.Operations/ListOperations": Rule(frozenset({Role.EXECUTE}),
                                                          lambda request: str(request.name)),
    "/google.devtools.remoteworkers.v1test2.Bots/CreateBotSession": Rule(
        frozenset({Role.BOT}), lambda request: str(request.parent),
        lambda request: str(request.bot_session.bot_id)),
    "/google.devtools.remoteworkers.v1test2.Bots/UpdateBotSession": Rule(
        frozenset({Role.BOT}), lambda request: instance_of_session(request.name)),
    "/google.devtools.remoteworkers.v1test2.Bots/PostBotEventTemp": Rule(
        frozenset({Role.BOT}), lambda request: instance_of_session(request.name)),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(READ, None),
    **{f"/buildfleet.admin.v1.Admin/{method}": Rule(frozenset({Role.READ}), _named)
       for method in ("ListBots", "GetBot", "ListQueues", "ListDrains", "ListOperations")},
    "/buildfleet.admin.v1.Admin/GetOperation": Rule(frozenset({Role.READ}), _operation),
    "/buildfleet.admin.v1.Admin/CancelOperation": Rule(frozenset({Role.ADMIN}), _operation),
    **{f"/buildfleet.admin.v1.Admin/{method}": Rule(frozenset({Role.ADMIN}), _named)
       for method in ("AddDrain", "RemoveDrain")},
}
OPEN = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class AuthInterceptor(Interceptor):
    """Authenticates and authorizes every call (see the module docstring)."""

    def __init__(self, authenticator: Authenticator, audit: Audit) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.audit = audit

    def enter_for(self, method: str) -> Enter | None:
        if method in OPEN:
            return None
        rule, admit = RULES.get(method), self.admit

        async def enter(request: Any, context: grpc.aio.ServicerContext) -> None:
            await _enter(admit, method, rule, request, context)

        return enter

    def admit(self, method: str, rule: Rule | None, request: Any,
               context: grpc.aio.ServicerContext) -> Principal:
        """The caller's principal; raises the refusal (UNAUTHENTICATED, PERMISSION_DENIED)."""
        try:
            principal = self.authenticator.authenticate(context.invocation_metadata() or (),
                                                        context.auth_context)
        except Unauthenticated as error:
            self.audit.refused("an unauthenticated peer", str(error), method, context.peer())
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           f"{error}; this server accepts {self.authenticator.accepts()}"
                           ) from None
        if rule is None:  # a method with no rule: nobody but an admin
            rule = Rule(frozenset({Role.ADMIN}), None)
        instance = self._instance(rule, request)
        if rule.roles_of is not None and instance is not None:
            rule = Rule(rule.roles_of(request), rule.instance, rule.bot_id)
        bot_id = rule.bot_id(request) if rule.bot_id and instance is not None else None
        if instance is None:
            allowed = any(principal.may_anywhere(role) for role in rule.roles)
        else:
            allowed = any(principal.may(role, instance, bot_id) for role in rule.roles)
        if not allowed:
            needed = ", ".join(sorted(role.value for role in Role
                                      if role is not Role.ADMIN and INCLUDES[role] & rule.roles)
                               ) or Role.ADMIN.value
            where = "any instance" if instance is None else f"instance {instance!r}"
            if bot_id:
                where += f" for bot id {bot_id!r}"
            reason = f"principal {principal.name!r} may not call {method}: it needs one " \
                     f"of the roles {needed} on {where}"
            self.audit.refused(f"principal {principal.name!r}", reason, method, context.peer())
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, reason)
        return principal

    @staticmethod
    def _instance(rule: Rule, request: Any) -> str | None:
        """The instance a request is for; None when it does not say (a malformed or
        undecodable request: the method then answers it, to a principal that holds the
        role somewhere)."""
        if rule.instance is None or request is None or isinstance(request, Undecodable):
            return None
        try:
            return rule.instance(request)
        except (BuildfleetError, AttributeError):
            return None


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _enter(admit: Callable[..., Principal], method: str, rule: Rule | None,
                 request: Any, context: grpc.aio.ServicerContext) -> None:
    """Admit the call or end it with its refusal.  The principal is set in the call's
    own context (each call is served in a task of its own: nothing leaks to others)."""
    try:
        principal = admit(method, rule, request, context)
    except Refusal as refusal:
        await context.abort(refusal.code, refusal.message)
        raise AssertionError("unreachable") from None  # context.abort always raises
    PRINCIPAL.set(principal)
