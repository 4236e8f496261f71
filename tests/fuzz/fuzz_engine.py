"""Random requests for every RPC of every buildfleet service, and the harness that sends them.

Used by the property tests (tests/fuzz/test_fuzz_services.py) and by the long run
(bench/fuzz.py); it imports nothing from the test suite.

Requests are generated from the protobuf descriptors: `MessageStrategies` builds
a hypothesis strategy for any message type (every scalar, enum, map, repeated
and nested message field, bounded in size and depth).  A plain random message
rarely gets past the first check of a service (an unknown instance name, a
malformed digest), so a `Pool` of things the server really holds -- instance
names, blobs and their digests, actions, directory trees, operation names, bot
sessions and their leases, page tokens -- is mixed into the fields that name
them, alongside near misses (a known hash with the wrong size, a resource name
with an extra segment, a token cut short).  ByteStream writes come as plausible
streams (a real blob split into chunks, then perturbed).  `junk` gives raw bytes
as request bodies: random bytes or a valid request with bytes flipped or cut.

`Harness` sends requests over one grpc.aio channel on an event loop of its own
(a background thread), so that hypothesis, which is synchronous, can drive it.
Each call gets a deadline; a streaming response is read for a few messages and
then cancelled.  Every answer is classified; `Harness.problems` lists the ones
that break the rule "a defined status code with a clean message": INTERNAL,
UNKNOWN, DATA_LOSS, a traceback in the message, a unary call that ran into its
deadline, or a server that stopped answering.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import random
import re
import threading
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import zstandard
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from hypothesis import strategies as st

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)

T = TypeVar("T")
# Descriptors come from the C (upb) implementation, whose stubs type many attributes
# as Optional; the strategies only walk message types, so they are typed loosely.
Descriptor = Any

MAX_DEPTH = 4  # nesting of message fields below the request
MAX_REPEATED = 3  # elements of a repeated field
STREAM_MESSAGES = 8  # messages read from a streaming response before cancelling it

# Every service buildfleet serves, as (service full name, method descriptor).
SERVICES = [
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"],
    bs_pb2.DESCRIPTOR.services_by_name["ByteStream"],
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"],
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"],
    re_pb2.DESCRIPTOR.services_by_name["Execution"],
    operations_pb2.DESCRIPTOR.services_by_name["Operations"],
    bots_pb2.DESCRIPTOR.services_by_name["Bots"],
]
METHODS: list[MethodDescriptor] = [m for service in SERVICES for m in service.methods]


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# Calls that may legitimately hold until their deadline (long-polls).
LONG_POLLS = {"UpdateBotSession", "WaitOperation"}
# Per-call deadlines, seconds.  A short UpdateBotSession deadline makes the server
# answer at once (it keeps a margin for the reply); WaitOperation holds up to the
# deadline minus a margin.
DEADLINES = {"UpdateBotSession": 0.3, "WaitOperation": 0.6}
DEFAULT_DEADLINE = 20.0
# Lines a server logs for a bug rather than for a client's mistake.
BUG_IN_LOG = re.compile(r"Traceback|unexpected error|Task exception was never retrieved|"
                        r"Future exception was never retrieved|Exception in callback|"
                        r"was never awaited")
# What grpc.aio reports, client side, for a write into a call the server already ended.
CLIENT_WRITE_AFTER_CLOSE = "Internal error from Core"

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


def proto_digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, 0, 1, -1, 2**31 - 1, 2**32, 2**53, -(2**31))
                    if lo <= v <= hi})
    return st.one_of(st.integers(max(lo, -3), min(hi, 64)), st.sampled_from(edges),
                     st.integers(lo, hi))


def _text(max_size: int = 24) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size)


def _weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, picked with the given weights.  (st.one_of draws its
    branches alike and drops repeated ones, so it cannot weigh.)"""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


# -- what the fuzzer knows about the server -------------------------------------------

POOL_LIMIT = 200  # names kept per kind; the oldest harvested ones are dropped


@dataclass
class Pool:
    """Names and digests that exist on the server under test, for realistic requests.

    The lists grow while fuzzing (`Harness` adds the sessions, leases and
    operations the server hands out); strategies read them when they draw.
    """

    instances: list[str] = field(default_factory=lambda: [""])
    blobs: dict[tuple[str, int], bytes] = field(default_factory=dict)  # digest -> content
    large: list[re_pb2.Digest] = field(default_factory=list)  # blobs not kept in memory
    actions: list[re_pb2.Digest] = field(default_factory=list)
    directories: list[re_pb2.Digest] = field(default_factory=list)
    cache_keys: list[re_pb2.Digest] = field(default_factory=list)  # action cache entries
    operations: list[str] = field(default_factory=list)
    bots: list[tuple[str, str]] = field(default_factory=list)  # (session name, bot id)
    leases: list[tuple[str, str]] = field(default_factory=list)  # (session name, lease id)
    page_tokens: list[str] = field(default_factory=list)

    def add_blob(self, data: bytes) -> re_pb2.Digest:
        digest = proto_digest(data)
        self.blobs[(digest.hash, digest.size_bytes)] = data
        return digest

    def digests(self) -> list[re_pb2.Digest]:
        known = [re_pb2.Digest(hash=h, size_bytes=s) for h, s in self.blobs]
        return [*known, *self.large, *self.actions, *self.directories]

    @staticmethod
    def remember(items: list[T], item: T) -> None:
        if item not in items:
            items.append(item)
            del items[:-POOL_LIMIT]


def _live(items: Sequence[T], empty: T) -> st.SearchStrategy[T]:
    """An element of `items` as it is when drawn (the list may grow meanwhile)."""
    return st.integers(0, 2**16).map(lambda i: items[i % len(items)] if items else empty)


def _one_of_known(items: Sequence[T], other: st.SearchStrategy[T], empty: T
                  ) -> st.SearchStrategy[T]:
    """Mostly something known, sometimes `other`."""
    known = _live(items, empty)
    return _weighted((3, known), (1, other))


def _mangled(names: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Names and near misses: cut, extended, with `..`, another instance prefix."""
    return _weighted((4, names), (1, st.one_of(
        st.tuples(names, st.integers(0, 40)).map(lambda p: p[0][:p[1]]),
        st.tuples(names, st.sampled_from(["/x", "/..", "/", "x", "/../..", "\x00",
                                          "/operations"])).map("".join),
        st.tuples(st.sampled_from(["other/", "../", "/", "a/b/", "operations/",
                                   "cache-only/"]), names).map("".join),
        _text(),
    )))


class MessageStrategies:
    """Hypothesis strategies for protobuf messages, with hints from a `Pool`.

    `hints[(message full name, field name)]` replaces the generic strategy of a
    field (`field_hints[field name]` does so in every message);
    `message_hints[message full name]` is mixed in with the generic strategy of
    a whole message.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._cache: dict[tuple[str, int, str], st.SearchStrategy[Any]] = {}
        self.hints: dict[tuple[str, str], st.SearchStrategy[Any]] = {}
        self.field_hints: dict[str, st.SearchStrategy[Any]] = {}
        self.message_hints: dict[str, st.SearchStrategy[Any]] = {}
        self._install_hints()

    # -- generic -----------------------------------------------------------------

    def message(self, descriptor: Descriptor, depth: int = 0,
                context: str = "") -> st.SearchStrategy[Message]:
        """Random messages of a type, `depth` levels below the request."""
        key = (descriptor.full_name, depth, context)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        strategy: st.SearchStrategy[Any] = st.deferred(
            lambda: self._build(descriptor, depth, context))
        hint = self.message_hints.get(f"{context}{descriptor.full_name}")
        if hint is None:
            hint = self.message_hints.get(descriptor.full_name)
        if hint is not None:
            strategy = _weighted((2, hint), (1, strategy))
        self._cache[key] = strategy
        return strategy

    def _build(self, descriptor: Descriptor, depth: int, context: str
               ) -> st.SearchStrategy[Message]:
        cls = message_class(descriptor)
        fields: list[tuple[Any, st.SearchStrategy[Any], int]] = []
        for fd in descriptor.fields:
            strategy = self._field(descriptor, fd, depth, context)
            if strategy is not None:
                # A third of the fields stay unset; a sixth of those with a hint.
                skip = 5 if self._hint(descriptor, fd, context) is not None else 2
                fields.append((fd, strategy, skip))

        @st.composite
        def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
            message = cls()
            for fd, strategy, skip in fields:
                if draw(st.integers(0, skip)) == skip:  # hypothesis favours 0: "set"
                    continue
                _assign(message, fd, draw(strategy))
            return message

        return build()

    def _hint(self, owner: Descriptor, fd: Any,
              context: str) -> st.SearchStrategy[Any] | None:
        hint = self.hints.get((f"{context}{owner.full_name}", fd.name))
        if hint is None:
            hint = self.hints.get((owner.full_name, fd.name))
        if hint is None:
            hint = self.field_hints.get(fd.name)
        return hint

    def _field(self, owner: Descriptor, fd: Any, depth: int,
               context: str) -> st.SearchStrategy[Any] | None:
        hint = self._hint(owner, fd, context)
        if hint is not None:
            single = hint
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                return None
            if _is_map(fd):
                key_fd = fd.message_type.fields_by_name["key"]
                value_fd = fd.message_type.fields_by_name["value"]
                value = self._scalar_or_message(value_fd, depth + 1)
                if value is None:
                    return None
                return st.dictionaries(self._scalar(key_fd), value, max_size=MAX_REPEATED)
            single = self.message(fd.message_type, depth + 1)
        else:
            single = self._scalar(fd)
        if _is_repeated(fd):
            limit = MAX_REPEATED if depth < MAX_DEPTH - 1 else 1
            return st.lists(single, max_size=limit)
        return single

    def _scalar_or_message(self, fd: Any,
                           depth: int) -> st.SearchStrategy[Any] | None:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            return None if depth >= MAX_DEPTH else self.message(fd.message_type, depth)
        return self._scalar(fd)

    @staticmethod
    def _scalar(fd: Any) -> st.SearchStrategy[Any]:
        kind = fd.type
        if kind in _INT_RANGES:
            return _integers(*_INT_RANGES[kind])
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_STRING:
            return _text()
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=48)
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return st.floats()
        if kind == FieldDescriptor.TYPE_FLOAT:
            return st.floats(width=32)
        if kind == FieldDescriptor.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values]
            return st.one_of(st.sampled_from(numbers), st.sampled_from(numbers),
                             st.integers(-3, 64))
        raise TypeError(f"field {fd.full_name} has unexpected type {kind}")

    # -- what the pool knows ------------------------------------------------------

    def known_blobs(self) -> st.SearchStrategy[bytes]:
        """The content of a known blob (drawn by key: a short repr in hypothesis reports)."""
        blobs = self.pool.blobs or {("", 0): b""}
        return st.sampled_from(sorted(blobs)).map(lambda key: blobs[key])

    def _install_hints(self) -> None:
        pool = self.pool
        known = pool.digests() or [proto_digest(b"")]
        hashes = sorted({d.hash for d in known})
        near_miss = st.one_of(
            st.builds(lambda d, delta: re_pb2.Digest(hash=d.hash,
                                                     size_bytes=max(0, d.size_bytes + delta)),
                      st.sampled_from(known), st.integers(-2, 2)),
            st.builds(lambda h: re_pb2.Digest(hash=h.upper(), size_bytes=1),
                      st.sampled_from(hashes)),
            st.builds(lambda n: re_pb2.Digest(hash=hashlib.sha256(n).hexdigest(),
                                              size_bytes=len(n)), st.binary(max_size=8)),
        )
        digests = _one_of_known(known, near_miss, known[0])
        self.message_hints[re_pb2.Digest.DESCRIPTOR.full_name] = digests
        self.message_hints[any_pb2.Any.DESCRIPTOR.full_name] = self._anys()
        self.message_hints[re_pb2.BatchUpdateBlobsRequest.Request.DESCRIPTOR.full_name] = \
            self._batch_entries()

        instances = _one_of_known(pool.instances, _text(12), "")
        self.field_hints["instance_name"] = instances
        self.field_hints["digest_function"] = _weighted(
            (4, st.just(0)), (1, st.just(re_pb2.DigestFunction.SHA256)), (1, st.integers(-1, 12)))
        self.hints[(operations_pb2.ListOperationsRequest.DESCRIPTOR.full_name, "name")] = \
            instances
        self.hints[(bots_pb2.CreateBotSessionRequest.DESCRIPTOR.full_name, "parent")] = \
            instances

        operation_names = _mangled(_live(pool.operations, "operations/none"))
        for owner in [re_pb2.WaitExecutionRequest, operations_pb2.GetOperationRequest,
                      operations_pb2.DeleteOperationRequest,
                      operations_pb2.CancelOperationRequest, operations_pb2.WaitOperationRequest]:
            self.hints[(owner.DESCRIPTOR.full_name, "name")] = operation_names
        session_names = _mangled(_live(pool.bots, ("none", "")).map(lambda b: b[0]))
        self.hints[(bots_pb2.PostBotEventTempRequest.DESCRIPTOR.full_name, "name")] = \
            session_names
        session = bots_pb2.BotSession.DESCRIPTOR.full_name
        self.hints[(session, "name")] = session_names
        bot_ids = _live(pool.bots, ("", "")).map(lambda b: b[1])
        self.hints[(session, "bot_id")] = _weighted((3, bot_ids), (1, _text(12)))
        self.hints[(session, "status")] = st.integers(-1, 6)
        self.hints[(session, "version")] = st.one_of(st.just(""), st.integers(0, 99).map(str),
                                                    _text(6))
        lease = bots_pb2.Lease.DESCRIPTOR.full_name
        self.hints[(lease, "id")] = _mangled(_live(pool.leases, ("", "none")).map(
            lambda pair: pair[1]))
        self.hints[(lease, "state")] = st.integers(-1, 6)
        self.hints[(lease, "status")] = self._lease_statuses()
        self.hints[(worker_pb2.Worker.DESCRIPTOR.full_name, "configs")] = st.builds(
            lambda key, value: worker_pb2.Worker.Config(key=key, value=value),
            st.sampled_from(["capacity", "capacity", "priority", ""]),
            st.one_of(st.sampled_from(["1", "2", "0", "-1", "x", " 3 ", "",
                                       "99999999999999999999"]), _text(4)))
        self.message_hints[bots_pb2.UpdateBotSessionRequest.DESCRIPTOR.full_name] = \
            self._updates()
        self.message_hints[bots_pb2.CreateBotSessionRequest.DESCRIPTOR.full_name] = \
            self._creates()

        tokens = _mangled(_live(pool.page_tokens, ""))
        self.hints[(re_pb2.GetTreeRequest.DESCRIPTOR.full_name, "page_token")] = tokens
        self.hints[(operations_pb2.ListOperationsRequest.DESCRIPTOR.full_name, "page_token")] = \
            tokens
        other_digest = self.message(re_pb2.Digest.DESCRIPTOR, 1)
        self.hints[(re_pb2.GetTreeRequest.DESCRIPTOR.full_name, "root_digest")] = \
            _one_of_known(pool.directories, other_digest, known[0])
        self.hints[(re_pb2.ExecuteRequest.DESCRIPTOR.full_name, "action_digest")] = \
            _one_of_known(pool.actions, other_digest, known[0])
        for owner in (re_pb2.GetActionResultRequest, re_pb2.UpdateActionResultRequest):
            self.hints[(owner.DESCRIPTOR.full_name, "action_digest")] = _one_of_known(
                pool.cache_keys + pool.actions, other_digest, known[0])
        self.hints[(operations_pb2.ListOperationsRequest.DESCRIPTOR.full_name, "filter")] = \
            _weighted((3, st.sampled_from(["", "stage=QUEUED", "done=true", "stage=bogus",
                                       "done = false", "stage=COMPLETED"])), (1, _text(12)))
        small64 = _weighted((4, st.just(0)), (2, st.integers(-2, 70)),
                            (1, _integers(-2**63, 2**63 - 1)))
        for name in ("read_offset", "read_limit"):
            self.hints[(bs_pb2.ReadRequest.DESCRIPTOR.full_name, name)] = small64
        small32 = _weighted((4, st.just(0)), (2, st.integers(-2, 70)),
                            (1, _integers(-2**31, 2**31 - 1)))
        self.hints[(re_pb2.GetTreeRequest.DESCRIPTOR.full_name, "page_size")] = small32
        self.hints[(operations_pb2.ListOperationsRequest.DESCRIPTOR.full_name, "page_size")] = \
            small32
        self.hints[(bs_pb2.ReadRequest.DESCRIPTOR.full_name, "resource_name")] = \
            self.resource_names(upload=False)
        self.hints[(bs_pb2.QueryWriteStatusRequest.DESCRIPTOR.full_name, "resource_name")] = \
            self.resource_names(upload=True)
        self.hints[(bs_pb2.WriteRequest.DESCRIPTOR.full_name, "resource_name")] = \
            self.resource_names(upload=True)

    def _lease_statuses(self) -> st.SearchStrategy[status_pb2.Status]:
        codes = _weighted((4, st.sampled_from([0, 0, 0, 13, 14, 9, 4, 1])),
                          (1, st.integers(-2, 40)))
        return st.builds(lambda code, message: status_pb2.Status(code=code, message=message),
                         codes, _text(20))

    def _anys(self) -> st.SearchStrategy[any_pb2.Any]:
        def packed(message: Message) -> any_pb2.Any:
            value = any_pb2.Any()
            value.Pack(message)
            return value

        packable = st.one_of(
            st.deferred(lambda: self.message(re_pb2.ActionResult.DESCRIPTOR, MAX_DEPTH - 2)),
            st.deferred(lambda: self.message(re_pb2.ActionResult.DESCRIPTOR, MAX_DEPTH - 2)),
            st.deferred(lambda: self.message(re_pb2.Action.DESCRIPTOR, MAX_DEPTH - 2)),
            st.deferred(lambda: self.message(re_pb2.Digest.DESCRIPTOR, MAX_DEPTH - 1)),
        )
        raw = st.builds(
            lambda url, value: any_pb2.Any(type_url=url, value=value),
            st.one_of(st.sampled_from([
                "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult",
                "type.googleapis.com/build.bazel.remote.execution.v2.Action",
                "type.googleapis.com/build.bazel.remote.execution.v2.Digest",
                "build.bazel.remote.execution.v2.ActionResult", ""]), _text(30)),
            st.binary(max_size=40))
        return _weighted((2, packable.map(packed)), (1, raw))

    def _updates(self) -> st.SearchStrategy[bots_pb2.UpdateBotSessionRequest]:
        """UpdateBotSession of a known session reporting its leases, perturbed."""
        pool = self.pool
        statuses = self._lease_statuses()
        results = self._anys()
        worker = self.message(worker_pb2.Worker.DESCRIPTOR, 2)

        @st.composite
        def update(draw: Callable[[st.SearchStrategy[Any]], Any]
                   ) -> bots_pb2.UpdateBotSessionRequest:
            name, bot_id = draw(_live(pool.bots, ("none", "none")))
            body = bots_pb2.BotSession(name=name, bot_id=draw(st.sampled_from(
                [bot_id, bot_id, bot_id, "", "someone-else"])))
            body.status = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 4, 5, 7]))
            mine = [lease for owner, lease in pool.leases if owner == name]
            others = [lease for owner, lease in pool.leases if owner != name]
            choices = mine * 3 + others[-5:] + ["never-offered"]
            # Indices, not sampled_from: the choices change as the pool grows, and
            # hypothesis wants the same kind of draws for the same example.
            picks = draw(st.lists(st.integers(0, 2**16), max_size=3))
            for lease_id in (choices[i % len(choices)] for i in picks):
                lease = body.leases.add(id=lease_id)
                lease.state = draw(st.sampled_from([2, 2, 4, 4, 4, 1, 5, 0, 9]))
                if draw(st.booleans()):
                    lease.status.CopyFrom(draw(statuses))
                if draw(st.booleans()):
                    lease.result.CopyFrom(draw(results))
            if draw(st.integers(0, 3)) == 0:
                body.worker.CopyFrom(draw(worker))
            if draw(st.booleans()):
                body.version = draw(st.sampled_from(["", "1", "junk", "-5"]))
            request_name = name if draw(st.integers(0, 5)) else draw(_mangled(st.just(name)))
            return bots_pb2.UpdateBotSessionRequest(name=request_name, bot_session=body)

        return update()

    def _creates(self) -> st.SearchStrategy[bots_pb2.CreateBotSessionRequest]:
        """CreateBotSession of a new bot (a known bot id would close that bot's session)."""
        instances = _one_of_known(self.pool.instances, _text(6), "")
        worker = self.message(worker_pb2.Worker.DESCRIPTOR, 2)

        @st.composite
        def create(draw: Callable[[st.SearchStrategy[Any]], Any]
                   ) -> bots_pb2.CreateBotSessionRequest:
            body = bots_pb2.BotSession(bot_id=f"fuzz-bot-{uuid.uuid4().hex[:12]}")
            body.status = draw(st.sampled_from([0, 0, 1, 2, 5, 9]))
            if draw(st.booleans()):
                body.worker.CopyFrom(draw(worker))
            return bots_pb2.CreateBotSessionRequest(parent=draw(instances), bot_session=body)

        return create()

    def resource_names(self, *, upload: bool) -> st.SearchStrategy[str]:
        """ByteStream resource names: real ones for known blobs, and mangled ones."""
        known = self.pool.digests() or [proto_digest(b"x")]

        def render(parts: tuple[str, str, re_pb2.Digest, str, str]) -> str:
            instance, kind, digest, upload_id, extra = parts
            body = f"{kind}/{digest.hash}/{digest.size_bytes}{extra}"
            if upload_id:
                body = f"uploads/{upload_id}/{body}"
            return f"{instance}/{body}" if instance else body

        uuids = st.builds(lambda: str(uuid.uuid4()))
        good = st.tuples(
            _live(self.pool.instances, ""),
            st.sampled_from(["blobs", "blobs", "compressed-blobs/zstd", "blobs/sha256"]),
            st.sampled_from(known),
            uuids if upload else st.just(""),
            st.just("/metadata") if upload else st.just(""),
        ).map(render)
        bad = st.tuples(
            _one_of_known(self.pool.instances, _text(6), ""),
            st.sampled_from(["blobs", "compressed-blobs/zstd", "blobs/sha256", "blobs/md5",
                             "compressed-blobs/deflate", "compressed-blobs", "uploads"]),
            st.sampled_from(known),
            st.one_of(st.just(""), uuids, _text(8)),
            st.sampled_from(["", "/meta", "/..", "/../x", "/", "//", "/a/b"]),
        ).map(render)
        return _weighted((3, good), (2, bad), (1, _mangled(st.just("blobs/x/1"))))

    def _batch_entries(self) -> st.SearchStrategy[re_pb2.BatchUpdateBlobsRequest.Request]:
        Request = re_pb2.BatchUpdateBlobsRequest.Request  # noqa: N806

        def entry(data: bytes, how: int, other: bytes) -> re_pb2.BatchUpdateBlobsRequest.Request:
            digest = proto_digest(data)
            if how <= 1:
                return Request(digest=digest, data=data)
            if how == 2:  # the bytes of another blob
                return Request(digest=digest, data=other)
            if how == 3:
                return Request(digest=digest, data=zstandard.compress(data),
                               compressor=re_pb2.Compressor.ZSTD)
            if how == 4:  # compressed junk
                return Request(digest=digest, data=other, compressor=re_pb2.Compressor.ZSTD)
            if how == 5:  # an unsupported compressor
                return Request(digest=digest, data=zlib.compress(data),
                               compressor=re_pb2.Compressor.DEFLATE)
            return Request(digest=digest, data=data[:-1] if data else b"?")

        source = st.one_of(self.known_blobs(), st.binary(max_size=300))
        return st.builds(entry, source, st.integers(0, 6), st.binary(max_size=40))


def _is_repeated(fd: Any) -> bool:
    return bool(fd.is_repeated)


def _is_map(fd: Any) -> bool:
    return (fd.type == FieldDescriptor.TYPE_MESSAGE and _is_repeated(fd)
            and fd.message_type.GetOptions().map_entry)


def _assign(message: Message, fd: Any, value: Any) -> None:
    target = getattr(message, fd.name)
    if _is_map(fd):
        value_fd = fd.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(fd):
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, fd.name, value)


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request to send: typed (a message, or a list of them for a client stream) or raw."""

    method: MethodDescriptor
    body: Any  # Message | list[Message] | bytes | list[bytes]
    raw: bool = False
    metadata: tuple[tuple[str, str | bytes], ...] = ()  # sent with the call

    def __repr__(self) -> str:
        return f"Call({self.describe(300)})"

    def describe(self, limit: int = 600) -> str:
        text = repr(self.body) if self.raw else str(self.body)
        sent = f" metadata {self.metadata!r:.300}" if self.metadata else ""
        return f"{method_path(self.method)} {'raw ' if self.raw else ''}{text[:limit]}{sent}"


class RequestStrategies:
    """Strategies for `Call`s to every method, typed and raw."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.messages = MessageStrategies(pool)

    def typed(self, method: MethodDescriptor) -> st.SearchStrategy[Call]:
        if method.client_streaming:  # ByteStream.Write
            return st.one_of(self.writes(), st.lists(
                self.messages.message(method.input_type), min_size=0, max_size=4)
            ).map(lambda body: Call(method, body))
        return self.messages.message(method.input_type).map(lambda body: Call(method, body))

    def junk(self, method: MethodDescriptor) -> st.SearchStrategy[Call]:
        def mutate(message: Message, cuts: list[tuple[int, int]]) -> bytes:
            data = bytearray(message.SerializeToString())
            for position, value in cuts:
                if not data:
                    break
                index = position % len(data)
                if value < 0:
                    del data[index:]
                else:
                    data[index] = value % 256
            return bytes(data)

        mutated = st.builds(mutate, self.messages.message(method.input_type),
                            st.lists(st.tuples(st.integers(0, 10_000), st.integers(-1, 255)),
                                     min_size=1, max_size=3))
        body = st.one_of(st.binary(max_size=120), mutated,
                         st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08",
                                          b"\x12\x05abc", b"\x0b" * 3, b"\x0a\x02\x0a\x00"]))
        if method.client_streaming:
            return st.lists(body, min_size=1, max_size=3).map(
                lambda bodies: Call(method, bodies, raw=True))
        return body.map(lambda data: Call(method, data, raw=True))

    def calls(self, junk_share: int = 4) -> st.SearchStrategy[Call]:
        """Any method; about one call in `junk_share` sends raw bytes."""
        typed = st.one_of([self.typed(m) for m in METHODS])
        junk = st.one_of([self.junk(m) for m in METHODS])
        return st.integers(0, junk_share - 1).flatmap(lambda n: junk if n == 0 else typed)

    def writes(self) -> st.SearchStrategy[list[bs_pb2.WriteRequest]]:
        """Plausible ByteStream upload streams, perturbed."""
        instances = self.pool.instances

        def stream(data: bytes, fresh: bool, instance: str, compressed: bool, pieces: int,
                   perturbation: int, junk: bytes) -> list[bs_pb2.WriteRequest]:
            if fresh:
                data = data + junk  # a new blob
            digest = proto_digest(data)
            payload = zstandard.compress(data) if compressed else data
            kind = "compressed-blobs/zstd" if compressed else "blobs"
            name = f"uploads/{uuid.uuid4()}/{kind}/{digest.hash}/{digest.size_bytes}"
            name = f"{instance}/{name}" if instance else name
            size = max(1, -(-len(payload) // max(pieces, 1)))
            chunks = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
            requests, offset = [], 0
            for index, chunk in enumerate(chunks):
                requests.append(bs_pb2.WriteRequest(
                    resource_name=name if index == 0 else "", write_offset=offset, data=chunk,
                    finish_write=index == len(chunks) - 1))
                offset += len(chunk)
            last = requests[-1]
            if perturbation == 1:
                last.finish_write = False  # ends early: an unfinished upload
            elif perturbation == 2:
                last.write_offset += 1
            elif perturbation == 3:
                requests[0].write_offset = 5
            elif perturbation == 4:
                last.resource_name = name + "/other"
            elif perturbation == 5:
                last.data = last.data + junk + b"!"
            elif perturbation == 6:
                requests.append(bs_pb2.WriteRequest(write_offset=offset, data=b"after"))
            elif perturbation == 7:
                requests[0].resource_name = ""
            return requests

        return st.builds(stream, self.messages.known_blobs(), st.booleans(),
                         _one_of_known(instances, _text(5), ""), st.booleans(), st.integers(1, 4),
                         st.integers(0, 9), st.binary(max_size=16))


# -- sending --------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    client_cancelled: bool = False


@dataclass
class Harness:
    """Sends `Call`s to a server over one channel, on an event loop in a background thread.

    With a `pool`, the bot sessions, leases and operations the server hands out
    in answers are added to it, for later requests to use.
    """

    address: str
    pool: Pool | None = None
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    by_method: collections.Counter[str] = field(default_factory=collections.Counter)
    by_method_code: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    samples: dict[tuple[str, str], str] = field(default_factory=dict)  # a message per kind
    sent: int = 0
    alive: Callable[[], bool] = lambda: True
    # TLS (and whatever call credentials they carry); plaintext without them.
    credentials: grpc.ChannelCredentials | None = None

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-client",
                                        daemon=True)
        self._thread.start()
        self.channel: grpc.aio.Channel = self.run(self._open())

    async def _open(self) -> grpc.aio.Channel:
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.address, self.credentials, options=options)
        return grpc.aio.insecure_channel(self.address, options=options)

    def run(self, coroutine: Awaitable[T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result()

    def close(self) -> None:
        self.run(self.channel.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def send_all(self, calls: Iterable[Call]) -> list[str]:
        """Send calls concurrently; the problems they revealed (also kept in `problems`)."""
        return self.run(self._send_all(list(calls)))

    async def _send_all(self, calls: list[Call]) -> list[str]:
        outcomes = await asyncio.gather(*(self._send(call) for call in calls))
        found: list[str] = []
        for call, outcome in zip(calls, outcomes, strict=True):
            self.sent += 1
            name = outcome.code.name
            if outcome.client_cancelled:
                name = "ended by client" if outcome.code == grpc.StatusCode.OK \
                    else "CANCELLED by client"
            self.counts[name] += 1
            self.by_method[call.method.name] += 1
            self.by_method_code[(call.method.name, name)] += 1
            self.samples.setdefault((call.method.name, name), outcome.details[:200])
            problem = self._judge(call, outcome)
            if problem is not None:
                found.append(problem)
        if found:
            self.problems.extend(found)
        return found

    def _judge(self, call: Call, outcome: Outcome) -> str | None:
        code, details = outcome.code, outcome.details
        bad = None
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
            bad = f"status {code.name}"
        elif "Traceback" in details or 'File "/' in details or "Exception" in details:
            bad = "a traceback or exception in the message"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and call.method.name not in LONG_POLLS:
            bad = "no answer before the deadline"
        elif code == grpc.StatusCode.UNAVAILABLE and not self.alive():
            bad = "the server died"
        if bad is None:
            return None
        return f"{bad}: {code.name} {details[:300]!r} for {call.describe()}"

    async def _send(self, call: Call) -> Outcome:
        method = call.method
        path = method_path(method)
        timeout = DEADLINES.get(method.name, DEFAULT_DEADLINE)
        serializer = None if call.raw else _serialize
        channel = self.channel
        harvest = None if call.raw or self.pool is None else _HARVEST.get(method.name)
        deserializer = None if harvest is None else message_class(method.output_type).FromString
        metadata = grpc.aio.Metadata(*call.metadata) if call.metadata else None
        try:
            if method.client_streaming:
                stub = channel.stream_unary(path, request_serializer=serializer)
                await stub(_aiter(call.body), timeout=timeout, metadata=metadata)
            elif method.server_streaming:
                return await self._read_stream(
                    channel.unary_stream(path, request_serializer=serializer,
                                         response_deserializer=deserializer)(
                        call.body, timeout=timeout, metadata=metadata), method.name, harvest,
                    self.pool)
            else:
                response = await channel.unary_unary(
                    path, request_serializer=serializer, response_deserializer=deserializer)(
                    call.body, timeout=timeout, metadata=metadata)
                if harvest is not None and self.pool is not None:
                    harvest(self.pool, call.body, response)
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if (method.client_streaming and error.code() == grpc.StatusCode.INTERNAL
                    and details == CLIENT_WRITE_AFTER_CLOSE):
                # The server answered before the client had sent everything: the
                # client's own gRPC turns its failed write into INTERNAL and the
                # server's status is lost.  Not the server's doing.
                return Outcome(grpc.StatusCode.OK, "", client_cancelled=True)
            return Outcome(error.code(), details)
        return Outcome(grpc.StatusCode.OK, "")

    @staticmethod
    async def _read_stream(call: Any, method: str, harvest: Harvest | None,
                           pool: Pool | None) -> Outcome:
        # Execute and WaitExecution stay open while the action waits: read the first
        # message only.  Others are read to the end (bounded).
        limit = 1 if method in ("Execute", "WaitExecution") else STREAM_MESSAGES * 64
        received = 0
        try:
            async for response in call:
                if harvest is not None and pool is not None:
                    harvest(pool, None, response)
                received += 1
                if received >= limit:
                    call.cancel()
                    return Outcome(grpc.StatusCode.CANCELLED, "", client_cancelled=True)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "")
        except asyncio.CancelledError:
            return Outcome(grpc.StatusCode.CANCELLED, "", client_cancelled=True)
        return Outcome(grpc.StatusCode.OK, "")


Harvest = Callable[[Pool, Any, Any], None]


def _harvest_session(pool: Pool, request: Any, session: bots_pb2.BotSession) -> None:
    if session.name:
        Pool.remember(pool.bots, (session.name, session.bot_id))
    for lease in session.leases:
        Pool.remember(pool.leases, (session.name, lease.id))


def _harvest_operation(pool: Pool, request: Any, operation: operations_pb2.Operation) -> None:
    if operation.name:
        Pool.remember(pool.operations, operation.name)


_HARVEST: dict[str, Harvest] = {
    "CreateBotSession": _harvest_session,
    "UpdateBotSession": _harvest_session,
    "Execute": _harvest_operation,
}


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def _aiter(items: Iterable[Any]) -> Any:
    for item in items:
        yield item


# -- seeding the server --------------------------------------------------------------


@dataclass
class Protected:
    """Data stored before the fuzzing that must be intact afterwards."""

    blobs: dict[tuple[str, int], str] = field(default_factory=dict)  # digest -> sha256 check
    large: dict[tuple[str, int], str] = field(default_factory=dict)  # read via ByteStream
    action_results: dict[tuple[str, int], bytes] = field(default_factory=dict)
    cache_instances: list[str] = field(default_factory=list)  # where the results are


def _rng_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


async def seed_server(channel: grpc.aio.Channel, instances: Sequence[str], *,
                      cache_writable: Sequence[str] = ("",), seed: int = 7,
                      large_size: int = 6 * 1024 * 1024) -> tuple[Pool, Protected]:
    """Store blobs, trees, actions and action results; open operations, sessions, leases.

    Returns the pool the fuzzer draws from and the protected data: its blobs are
    in the pool too (content-addressed: no request may change them), its action
    results are not (their keys are random digests nobody else knows).
    """
    rng = random.Random(seed)
    pool = Pool(instances=list(instances))
    protected = Protected(cache_instances=list(cache_writable))
    cas = re_grpc.ContentAddressableStorageStub(channel)
    action_cache = re_grpc.ActionCacheStub(channel)

    async def upload(blobs: Sequence[bytes], instance: str = "") -> None:
        response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(b), data=b)
                      for b in blobs]))
        assert all(r.status.code == 0 for r in response.responses), response

    # Protected blobs, every size class up to a large one through ByteStream.
    sizes = [0, 1, 2, 10, 100, 1000, 4096, 65_536, 100_000, 1_048_576 + 7]
    plain = [_rng_bytes(rng, size) for size in sizes for _ in range(2)]
    for instance in instances:
        await upload(plain, instance)
    for data in plain:
        digest = pool.add_blob(data)
        protected.blobs[(digest.hash, digest.size_bytes)] = hashlib.sha256(data).hexdigest()
    large = _rng_bytes(rng, large_size)
    large_digest = proto_digest(large)
    chunk = 1024 * 1024
    for instance in instances:
        name = f"uploads/{uuid.uuid4()}/blobs/{large_digest.hash}/{large_digest.size_bytes}"
        name = f"{instance}/{name}" if instance else name
        writes = [bs_pb2.WriteRequest(resource_name=name if i == 0 else "", write_offset=i,
                                      data=large[i:i + chunk],
                                      finish_write=i + chunk >= len(large))
                  for i in range(0, len(large), chunk)]
        await bs_grpc.ByteStreamStub(channel).Write(_aiter(writes))
    pool.large.append(large_digest)
    protected.large[(large_digest.hash, large_digest.size_bytes)] = \
        hashlib.sha256(large).hexdigest()

    # Directory trees: a chain, a diamond (one subtree twice), files referencing blobs.
    leaf = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=proto_digest(plain[4]))])
    leaf_blob = leaf.SerializeToString()
    middle = re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="a", digest=proto_digest(leaf_blob)),
        re_pb2.DirectoryNode(name="b", digest=proto_digest(leaf_blob))])
    middle_blob = middle.SerializeToString()
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="top", digest=proto_digest(plain[6]), is_executable=True)],
        directories=[re_pb2.DirectoryNode(name="m", digest=proto_digest(middle_blob))],
        symlinks=[re_pb2.SymlinkNode(name="l", target="m/a/f")])
    root_blob = root.SerializeToString()
    unsafe = re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="..", digest=proto_digest(leaf_blob)),
        re_pb2.DirectoryNode(name="x/y", digest=proto_digest(leaf_blob))],
        files=[re_pb2.FileNode(name="dup", digest=proto_digest(plain[2])),
               re_pb2.FileNode(name="dup", digest=proto_digest(plain[3]))])
    trees = [leaf_blob, middle_blob, root_blob, unsafe.SerializeToString(),
             re_pb2.Directory().SerializeToString()]
    for instance in instances:
        await upload(trees, instance)
    for blob in trees:
        pool.directories.append(pool.add_blob(blob))

    # Actions: runnable ones, one per platform, one uncacheable, one with a junk command.
    commands = [re_pb2.Command(arguments=["true"]),
                re_pb2.Command(arguments=["echo", "hi"], output_paths=["out"]),
                re_pb2.Command(arguments=[]),
                re_pb2.Command(arguments=["run"], platform=re_pb2.Platform(properties=[
                    re_pb2.Platform.Property(name="OSFamily", value="plan9")]))]
    blobs = [c.SerializeToString() for c in commands] + [b"\xff\xfenot a command"]
    actions = []
    for index, command in enumerate(blobs):
        for extra in range(2):
            action = re_pb2.Action(command_digest=proto_digest(command),
                                   input_root_digest=proto_digest(root_blob),
                                   do_not_cache=extra == 1, salt=f"seed-{index}".encode())
            if index == 1:
                action.timeout.seconds = 10 ** (extra + 3)
            actions.append(action.SerializeToString())
    actions.append(b"\x0a\x02\xff\xff")  # not an Action
    for instance in instances:
        await upload(blobs + actions, instance)
    for blob in blobs:
        pool.add_blob(blob)
    pool.actions = [proto_digest(a) for a in actions]

    # Protected action results: random keys, results referencing protected blobs.
    for index in range(8):
        key = proto_digest(f"protected-action-{seed}-{index}-{rng.random()}".encode())
        result = re_pb2.ActionResult(
            exit_code=index,
            stdout_digest=proto_digest(plain[index]),
            output_files=[re_pb2.OutputFile(path=f"out/{index}",
                                            digest=proto_digest(plain[index + 2]))])
        for instance in cache_writable:
            await action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
                instance_name=instance, action_digest=key, action_result=result))
        protected.action_results[(key.hash, key.size_bytes)] = \
            result.SerializeToString(deterministic=True)

    # Action results the fuzzer may read and overwrite.
    for index in range(4):
        key = proto_digest(f"playground-action-{index}".encode())
        result = re_pb2.ActionResult(exit_code=index, stdout_digest=proto_digest(plain[index]))
        for instance in cache_writable:
            await action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
                instance_name=instance, action_digest=key, action_result=result))
        pool.cache_keys.append(key)

    # Operations (queued: no bot runs them), bot sessions with leases, page tokens.
    execution = re_grpc.ExecutionStub(channel)
    bots = bots_pb2_grpc.BotsStub(channel)
    operations = operations_pb2_grpc.OperationsStub(channel)
    for instance in instances:
        try:
            for action_blob in actions[:4]:
                call = execution.Execute(re_pb2.ExecuteRequest(
                    instance_name=instance, action_digest=proto_digest(action_blob)))
                async for operation in call:
                    pool.operations.append(operation.name)
                    break
                call.cancel()
            for index in range(3):
                bot_id = f"seed-bot-{index}-{uuid.uuid4().hex[:6]}"
                session = await bots.CreateBotSession(bots_pb2.CreateBotSessionRequest(
                    parent=instance, bot_session=bots_pb2.BotSession(bot_id=bot_id)))
                pool.bots.append((session.name, bot_id))
                update = await bots.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
                    name=session.name, bot_session=session), timeout=1.0)
                pool.leases.extend((session.name, lease.id) for lease in update.leases)
            listing = await operations.ListOperations(operations_pb2.ListOperationsRequest(
                name=instance, page_size=1))
            if listing.next_page_token:
                pool.page_tokens.append(listing.next_page_token)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNIMPLEMENTED,
                                    grpc.StatusCode.INVALID_ARGUMENT):
                raise  # a cache-only instance refuses execution; anything else is a bug
    page = cas.GetTree(re_pb2.GetTreeRequest(root_digest=proto_digest(root_blob), page_size=1))
    async for response in page:
        if response.next_page_token:
            pool.page_tokens.append(response.next_page_token)
        break
    page.cancel()
    pool.page_tokens.append(base64.urlsafe_b64encode(b"1/junk").decode())
    return pool, protected


async def check_protected(channel: grpc.aio.Channel, instances: Sequence[str],
                          protected: Protected) -> list[str]:
    """Read every protected blob and action result back; the differences found."""
    cas = re_grpc.ContentAddressableStorageStub(channel)
    bytestream = bs_grpc.ByteStreamStub(channel)
    action_cache = re_grpc.ActionCacheStub(channel)
    differences: list[str] = []
    for instance in instances:
        digests = [re_pb2.Digest(hash=h, size_bytes=s) for h, s in protected.blobs]
        response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            instance_name=instance, digests=digests))
        for entry in response.responses:
            expected = protected.blobs[(entry.digest.hash, entry.digest.size_bytes)]
            if entry.status.code != 0 or hashlib.sha256(entry.data).hexdigest() != expected:
                differences.append(f"{instance!r}: blob {entry.digest.hash}/"
                                   f"{entry.digest.size_bytes}: status {entry.status.code}")
        for (hash_, size), expected in protected.large.items():
            prefix = f"{instance}/" if instance else ""
            hasher = hashlib.sha256()
            try:
                async for chunk in bytestream.Read(bs_pb2.ReadRequest(
                        resource_name=f"{prefix}blobs/{hash_}/{size}")):
                    hasher.update(chunk.data)
            except grpc.aio.AioRpcError as error:
                differences.append(f"{instance!r}: large blob {hash_}: {error.code().name}")
                continue
            if hasher.hexdigest() != expected:
                differences.append(f"{instance!r}: large blob {hash_} changed")
        if instance not in protected.cache_instances:
            continue
        for (hash_, size), expected_result in protected.action_results.items():
            try:
                result = await action_cache.GetActionResult(re_pb2.GetActionResultRequest(
                    instance_name=instance,
                    action_digest=re_pb2.Digest(hash=hash_, size_bytes=size)))
            except grpc.aio.AioRpcError as error:
                differences.append(f"{instance!r}: action result {hash_}: {error.code().name}")
                continue
            if result.SerializeToString(deterministic=True) != expected_result:
                differences.append(f"{instance!r}: action result {hash_} changed")
    return differences
