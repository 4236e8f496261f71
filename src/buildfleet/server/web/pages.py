"""The fleet's web page: server-rendered HTML over the Admin API (`calls`), with a
little JavaScript (`static/app.js`) that refreshes each page's live part in place
and sends the buttons' changes.

Security: with authentication configured, every page and change needs the
credentials the same gRPC call would need (a bearer token given once on the login
page and kept in an HttpOnly, SameSite=Strict cookie, or a verified client
certificate); changes are POSTs that must carry the page's own request header and,
when the browser sends one, a matching Origin (no other site can make them); with
authentication off, only loopback host names are answered (no DNS rebinding).
Every page is sent with a Content-Security-Policy that allows only the package's
own script and style.
"""

from __future__ import annotations

import ipaddress
import math
import shlex
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import grpc
import jinja2
from aiohttp import web
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet.auth.principal import Principal
from buildfleet.config.security import Role
from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, NotFound
from buildfleet.server.execution.service import instance_of_operation
from buildfleet.server.instance import Instances
from buildfleet.server.logstream.store import LogStreams, parse_log_name
from buildfleet.server.web.calls import AdminCalls, CallFailed, Credentials, certificate_context

COOKIE = "buildfleet_token"
FRAGMENT_HEADER = "X-Buildfleet-Fragment"  # asks for a page's live part only
REQUEST_HEADER = "X-Buildfleet-Request"  # every change the page sends carries it
PAGE_SIZE = 50
BOTS_SHOWN = 500  # bots listed on the bots page at most (the filter finds the others)
BLOB_SHOWN = 8 * 1024 * 1024  # the largest stdout/stderr blob the page shows
OUTPUT_CHUNK = 256 * 1024  # the most of a running action's output one poll fetches
STATUSES = ("OK", "UNHEALTHY", "HOST_REBOOTING", "BOT_TERMINATING", "INITIALIZING")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
}


# ------------------------------------------------------------------ formatting
def age(value: Duration | float) -> str:
    """A duration as people read it: 850 ms, 42 s, 3 min 5 s, 2 h 10 min."""
    seconds = value.ToNanoseconds() / 1e9 if isinstance(value, Duration) else value
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def when(stamp: Timestamp) -> str:
    """A timestamp in UTC to the second ('' when unset)."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp.seconds)) + " UTC"


def properties(items: Iterable[admin_pb2.Property]) -> str:
    return ", ".join(f"{p.name}={p.value}" for p in items) or "any platform"


def digest_text(digest: re_pb2.Digest) -> str:
    return f"{digest.hash}/{digest.size_bytes}" if digest.hash else ""


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("buildfleet.server.web", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    environment.filters.update(age=age, when=when, properties=properties,
                               digest=digest_text)
    environment.globals["query"] = lambda **values: urlencode(
        {k: v for k, v in values.items() if v not in (None, "")})
    return environment


# ----------------------------------------------------------------------- chart
@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Chart:
    """The throughput chart of an instance: one bar per slot, as SVG geometry."""

    bars: list[Bar]
    peak: int  # jobs in the busiest slot
    last_minute: int
    per_minute: float  # the average of the window
    window_minutes: int
    width: int = 600
    height: int = 80


def chart(finished: Iterable[admin_pb2.FinishedSlot], width: int = 600, height: int = 80
          ) -> Chart:
    slots = list(finished)
    peak = max((slot.jobs for slot in slots), default=0)
    step = width / max(1, len(slots))
    bars = []
    for index, slot in enumerate(slots):
        tall = 0.0 if not peak else max(1.0, height * slot.jobs / peak) if slot.jobs else 0.0
        bars.append(Bar(x=round(index * step, 2), y=round(height - tall, 2),
                        width=round(max(1.0, step - 1), 2), height=round(tall, 2),
                        title=f"{when(slot.start)}: {slot.jobs} finished"))
    length = slots[0].length.ToNanoseconds() / 1e9 if slots else 10.0
    per_minute_slots = max(1, round(60 / length))
    window = len(slots) * length
    total = sum(slot.jobs for slot in slots)
    return Chart(bars=bars, peak=peak,
                 last_minute=sum(slot.jobs for slot in slots[-per_minute_slots:]),
                 per_minute=total / (window / 60) if window else 0.0,
                 window_minutes=math.ceil(window / 60), width=width, height=height)


# ----------------------------------------------------------------------- pages
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a request learns once about its visitor (see Pages.credentials, _visitor).
CREDENTIALS = web.RequestKey("credentials", Credentials)
VISITOR: web.RequestKey[Principal | None] = web.RequestKey("visitor")


class Pages:
    """The web application of one server."""

    def __init__(self, instances: Instances, calls: AdminCalls,
                 logs: LogStreams | None = None) -> None:
        self.instances = instances
        self.calls = calls
        self.logs = logs  # the live output of running actions, where it is streamed
        self.templates = _environment()
        self.names = [i.name for i in instances if i.scheduler is not None]
        self.app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        self.app.add_routes([
            web.get("/", self.overview), web.get("/bots", self.bots),
            web.get("/bot", self.bot), web.get("/queues", self.queues),
            web.get("/operations", self.operations), web.get("/operation", self.operation),
            web.get("/blob", self.blob), web.get("/output", self.output),
            web.get("/login", self.login_page),
            web.post("/login", self.login), web.post("/logout", self.logout),
            web.post("/api/drain", self.drain), web.post("/api/undrain", self.undrain),
            web.post("/api/cancel", self.cancel),
            web.get("/static/{name}", self.static),
        ])

    # ------------------------------------------------------------- plumbing
    @staticmethod
    def credentials(request: web.Request) -> Credentials:
        """The visitor's credentials (read once per request)."""
        known = request.get(CREDENTIALS)
        if known is None:
            known = request[CREDENTIALS] = Pages._read_credentials(request)
        return known

    @staticmethod
    def _read_credentials(request: web.Request) -> Credentials:
        der = None
        transport = request.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
        peer = request.remote or ""
        return Credentials(token=request.cookies.get(COOKIE) or None,
                           certificate=certificate_context(der), peer=f"web:{peer}")

    async def call(self, request: web.Request, method: str, message: Any) -> Any:
        return await self.calls.call(method, message, self.credentials(request))

    def _host_allowed(self, request: web.Request) -> bool:
        """With authentication off, only loopback names: a page of another site that
        rebinds its DNS name to this machine must not reach the fleet."""
        return self.calls.authenticating or is_loopback_host(request.host)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._host_allowed(request):
            response: web.StreamResponse = web.Response(
                status=421, text=f"this page answers only on loopback host names, not "
                                 f"{request.host!r}: authentication is off")
        elif request.method == "POST" and not self._same_origin(request):
            response = web.json_response(
                {"error": "refused: the request did not come from this page"}, status=403)
        else:
            try:
                response = await handler(request)
            except CallFailed as failure:
                response = self._failure(request, failure)
            except web.HTTPException as error:  # raised by a handler: sent as it is
                response = web.Response(status=error.status, text=error.text,
                                        headers=error.headers)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return False
        if request.path.startswith("/api/"):
            return request.headers.get(REQUEST_HEADER) == "page"
        return True

    def _failure(self, request: web.Request, failure: CallFailed) -> web.StreamResponse:
        status = HTTP_STATUS.get(failure.code, 500)
        if request.path.startswith("/api/") or request.headers.get(FRAGMENT_HEADER):
            return web.json_response({"error": failure.message, "code": failure.code.name},
                                     status=status)
        if failure.code == grpc.StatusCode.UNAUTHENTICATED:
            target = request.path_qs
            raise web.HTTPSeeOther("/login?" + urlencode({"next": target}))
        return self.render(request, "error.html", status=status, title="Error", live=False,
                           code=failure.code.name, message=failure.message)

    def render(self, request: web.Request, template: str, *, status: int = 200,
               **values: Any) -> web.Response:
        fragment = bool(request.headers.get(FRAGMENT_HEADER))
        principal = self._visitor(request)
        values.setdefault("instance", self._instance(request))
        html = self.templates.get_template(template).render(
            fragment=fragment, path=request.path, instances=self.names,
            principal=principal, authenticating=self.calls.authenticating,
            page_request=REQUEST_HEADER, **values)
        return web.Response(text=html, status=status, content_type="text/html")

    def _instance(self, request: web.Request) -> str:
        name = request.query.get("instance")
        if name is None:
            return self.names[0] if self.names else ""
        return name

    def _visitor(self, request: web.Request) -> Principal | None:
        """Who the visitor is, for what the page shows (authenticated once per
        request; None when authentication is off or the credentials are not valid)."""
        if not self.calls.authenticating:
            return None
        if VISITOR not in request:
            visitor: Principal | None
            try:
                visitor = self.calls.principal(self.credentials(request))
            except CallFailed:
                visitor = None
            request[VISITOR] = visitor
        return request[VISITOR]

    def may_admin(self, request: web.Request, instance: str) -> bool:
        """Whether to show the visitor buttons that change things (the calls are
        checked again when made)."""
        if not self.calls.authenticating:
            return True
        principal = self._visitor(request)
        return principal is not None and principal.may(Role.ADMIN, instance)

    # ---------------------------------------------------------------- pages
    async def overview(self, request: web.Request) -> web.Response:
        shown = []
        for name in self.names:
            try:
                bots = await self.call(request, "ListBots",
                                       admin_pb2.ListBotsRequest(instance_name=name))
                queues = await self.call(request, "ListQueues",
                                         admin_pb2.ListQueuesRequest(instance_name=name))
            except CallFailed as failure:
                if failure.code != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                continue  # an instance the visitor may not see
            counts = Counter(bot.status for bot in bots.bots)
            shown.append({
                "name": name, "bots": len(bots.bots),
                "statuses": [(status, counts.get(status, 0)) for status in STATUSES]
                + [(status, n) for status, n in sorted(counts.items()) if status not in STATUSES],
                "draining": sum(1 for bot in bots.bots if bot.draining),
                "running": sum(bot.running for bot in bots.bots),
                "capacity": sum(bot.capacity for bot in bots.bots),
                "queued": sum(queue.queued for queue in queues.queues),
                "executing": queues.executing, "queues": list(queues.queues),
                "chart": chart(queues.finished)})
        return self.render(request, "overview.html", title="Overview", shown=shown)

    async def bots(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        pattern = request.query.get("q", "").strip()
        bots = await self.call(request, "ListBots", admin_pb2.ListBotsRequest(
            instance_name=instance, bot_id_pattern=pattern or "*"))
        drains = await self.call(request, "ListDrains",
                                 admin_pb2.ListDrainsRequest(instance_name=instance))
        drained_by: dict[str, list[str]] = {}
        for drain in drains.drains:
            for bot_id in drain.bot_ids:
                drained_by.setdefault(bot_id, []).append(drain.pattern)
        return self.render(request, "bots.html", title="Bots", q=pattern,
                           bots=list(bots.bots[:BOTS_SHOWN]), total=len(bots.bots),
                           drains=list(drains.drains),
                           drained_by=drained_by, admin=self.may_admin(request, instance))

    async def bot(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        bot_id = request.query.get("id", "")
        bot = await self.call(request, "GetBot",
                              admin_pb2.GetBotRequest(instance_name=instance, bot_id=bot_id))
        drains = await self.call(request, "ListDrains",
                                 admin_pb2.ListDrainsRequest(instance_name=instance))
        return self.render(request, "bot.html", title=f"Bot {bot_id}", bot=bot,
                           drained_by=[d.pattern for d in drains.drains
                                       if bot_id in d.bot_ids],
                           admin=self.may_admin(request, instance))

    async def queues(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        queues = await self.call(request, "ListQueues",
                                 admin_pb2.ListQueuesRequest(instance_name=instance))
        return self.render(request, "queues.html", title="Queues",
                           queues=list(queues.queues), executing=queues.executing,
                           chart=chart(queues.finished))

    async def operations(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        filters = {key: request.query.get(key, "").strip()
                   for key in ("stage", "bot", "submitter", "action", "invocation", "page")}
        answer = await self.call(request, "ListOperations", admin_pb2.ListOperationsRequest(
            instance_name=instance, stage=filters["stage"], bot_id=filters["bot"],
            submitter=filters["submitter"], action_hash=filters["action"],
            invocation=filters["invocation"], page_size=PAGE_SIZE, page_token=filters["page"]))
        return self.render(request, "operations.html", title="Operations", filters=filters,
                           operations=list(answer.operations),
                           next_page=answer.next_page_token,
                           admin=self.may_admin(request, instance))

    async def operation(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        detail = await self.call(request, "GetOperation",
                                 admin_pb2.GetOperationRequest(name=name))
        instance = instance_of_operation(name)
        return self.render(request, "operation.html", title="Operation", instance=instance,
                           detail=detail, summary=detail.summary,
                           command=shlex.join(detail.arguments),
                           timeline=_timeline(detail.execution_metadata),
                           admin=self.may_admin(request, instance),
                           streamed=self.logs is not None)

    async def output(self, request: web.Request) -> web.Response:
        """What a running action has printed from `offset` (plain text, at most
        OUTPUT_CHUNK bytes); headers say where the next read starts and whether the
        output is complete.  Only for a visitor who may see the operation."""
        name = request.query.get("name", "")
        which = request.query.get("stream", "stdout")
        offset = request.query.get("offset", "0")
        detail = await self.call(request, "GetOperation",
                                 admin_pb2.GetOperationRequest(name=name))
        if which not in ("stdout", "stderr") or not offset.isdigit():
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             "stream must be stdout or stderr, offset a whole number")
        summary = detail.summary
        data, finished = b"", True
        if self.logs is not None and summary.stage != "QUEUED":
            digest = summary.action_digest
            action = f"{digest.hash}/{digest.size_bytes}"
            instance = instance_of_operation(name)
            # while it runs, its streams; once it is done, those of its last run (the
            # end of the output may come after the operation is done)
            output = self.logs.for_action(instance, action) if summary.stage == "EXECUTING" \
                else self.logs.latest(instance, action)
            if output is not None:
                read_name = output.stdout[0] if which == "stdout" else output.stderr[0]
                try:
                    data, finished = self.logs.snapshot(parse_log_name(read_name),
                                                        int(offset), OUTPUT_CHUNK)
                except NotFound:  # gone meanwhile: the result has the output
                    data, finished = b"", True
                except BuildfleetError as error:
                    raise CallFailed(error.code, error.message) from None
        return web.Response(body=data, content_type="text/plain", charset="utf-8",
                            headers={"X-Output-Next": str(int(offset) + len(data)),
                                     "X-Output-Complete": "1" if finished else "0",
                                     "Cache-Control": "no-store"})

    async def blob(self, request: web.Request) -> web.Response:
        """A stdout or stderr blob as plain text (never rendered as HTML)."""
        instance_name = request.query.get("instance", "")
        self.calls.admit(
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
            re_pb2.BatchReadBlobsRequest(instance_name=instance_name),
            self.credentials(request))
        try:
            instance = self.instances.get(instance_name)
            hash_, _, size = request.query.get("digest", "").partition("/")
            digest = Digest.parse(hash_, int(size) if size.isdigit() else -1, "blob")
        except BuildfleetError as error:
            raise CallFailed(error.code, error.message) from None
        if digest.size_bytes > BLOB_SHOWN:
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"blob {digest} is {digest.size_bytes} bytes, more than the "
                             f"{BLOB_SHOWN} this page shows: read it with ByteStream")
        try:
            data = await instance.cas.get(digest)
        except BuildfleetError as error:
            raise CallFailed(error.code, error.message) from None
        if data is None:
            raise CallFailed(grpc.StatusCode.NOT_FOUND,
                             f"blob {digest} is not in the CAS of instance {instance_name!r}")
        return web.Response(body=data, content_type="text/plain", charset="utf-8",
                            headers={"Content-Disposition": "inline"})

    # --------------------------------------------------------------- login
    async def login_page(self, request: web.Request) -> web.Response:
        if not self.calls.authenticating:
            raise web.HTTPSeeOther("/")
        return self.render(request, "login.html", title="Log in", error="", live=False,
                           next=_local(request.query.get("next", "/")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("token", "")).strip()
        target = _local(str(form.get("next", "/")))
        if not self.calls.authenticating:
            raise web.HTTPSeeOther(target)
        try:
            self.calls.principal(Credentials(token=token or None))
        except CallFailed as failure:
            return self.render(request, "login.html", status=401, title="Log in", live=False,
                               error=failure.message, next=target)
        response = _redirect(target)
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                            secure=request.secure, path="/")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = _redirect("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    # ------------------------------------------------------------- changes
    async def _body(self, request: web.Request) -> dict[str, str]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             "the request body is not a JSON object")
        return {str(key): str(value) for key, value in body.items()}

    async def drain(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        drain = await self.call(request, "AddDrain", admin_pb2.AddDrainRequest(
            instance_name=body.get("instance", ""), pattern=body.get("pattern", "")))
        return web.json_response({"message": f"drained {drain.pattern}: "
                                  f"{len(drain.bot_ids)} live bot(s) match"})

    async def undrain(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        drain = await self.call(request, "RemoveDrain", admin_pb2.RemoveDrainRequest(
            instance_name=body.get("instance", ""), pattern=body.get("pattern", "")))
        return web.json_response({"message": f"removed the drain {drain.pattern}"})

    async def cancel(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        detail = await self.call(request, "CancelOperation",
                                 admin_pb2.CancelOperationRequest(name=body.get("name", "")))
        return web.json_response({"message": f"cancelled {detail.summary.name}"})

    # -------------------------------------------------------------- static
    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        from importlib.resources import files

        data = (files("buildfleet.server.web") / "static" / name).read_bytes()
        return web.Response(body=data, content_type=types[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback: `localhost`, an address
    in 127.0.0.0/8 or ::1, with or without a port (names that merely begin like one,
    `localhost.example.com`, do not)."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1] or [::1]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _redirect(target: str) -> web.Response:
    return web.Response(status=303, headers={"Location": target})


def _local(target: str) -> str:
    """A redirect target on this site only (no open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


TIMELINE = (
    ("queued", "queued_timestamp"),
    ("a bot took it", "worker_start_timestamp"),
    ("input fetch started", "input_fetch_start_timestamp"),
    ("inputs fetched", "input_fetch_completed_timestamp"),
    ("command started", "execution_start_timestamp"),
    ("command ended", "execution_completed_timestamp"),
    ("output upload started", "output_upload_start_timestamp"),
    ("outputs uploaded", "output_upload_completed_timestamp"),
    ("result reported", "worker_completed_timestamp"),
)


def _timeline(metadata: re_pb2.ExecutedActionMetadata) -> list[tuple[str, str, str]]:
    """(what, when, how long after it was queued) for each time the bot reported."""
    start = metadata.queued_timestamp.ToNanoseconds()
    found = []
    for label, field in TIMELINE:
        stamp: Timestamp = getattr(metadata, field)
        if stamp.ToNanoseconds():
            offset = "" if not start else "+" + age((stamp.ToNanoseconds() - start) / 1e9)
            found.append((label, when(stamp), offset))
    return found
