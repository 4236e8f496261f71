"""Log streams kept in the server's memory: what a running action has printed so far.

A stream is created for an instance (`create`), written in order by whoever holds
its write name (the name plus a secret token), and read by anyone who knows its
name: a read returns what is there from its offset and then waits for more until
the writer finishes the stream (`finish_write`), so readers that start late still
get everything.  Names::

    {instance}/logstreams/{id}            read (ByteStream Read)
    {instance}/logstreams/{id}/{secret}   write (ByteStream Write)

Bounds (`LogStreamLimits`): a stream holds at most `max_stream_size` bytes (a
write beyond is refused and the stream is finished, marked truncated); all
streams together at most `max_total_size` (the oldest finished streams are
dropped first; with none left to drop a new stream is refused); a finished
stream is kept `keep_for` seconds, an unfinished one whose writer has been silent
for `idle_timeout` seconds is finished and then kept as long.  A stream that is
gone is NOT_FOUND with a message saying so.

The output of a running action: `for_action` gives the pair of streams (stdout,
stderr) of an action being executed, creating them the first time anyone asks
(the Execution service, to name them in the operation's metadata; the Bots
service, to hand their write names to the bot running it); `end_action`
finishes them when the bot reports the lease (so that readers of a bot that
streamed nothing end too), and the next run of the same action gets new ones.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from buildfleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
)

SEGMENT = "logstreams"
MiB = 1024 * 1024
READ_CHUNK = 64 * 1024
EMPTY_KEEP = 10.0  # seconds a finished stream that nothing was written to is kept
MAX_LAST_RUNS = 10_000  # ended runs whose streams can still be found by their action


@dataclass(frozen=True)
class LogStreamLimits:
    max_stream_size: int = 16 * MiB
    max_total_size: int = 256 * MiB
    keep_for: float = 600.0
    idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class LogName:
    """A parsed log stream resource name."""

    instance_name: str
    stream_id: str
    token: str | None  # the secret of a write name; None for a read name

    @property
    def read_name(self) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}{SEGMENT}/{self.stream_id}"


def is_log_name(name: str) -> bool:
    return name.startswith(SEGMENT + "/") or f"/{SEGMENT}/" in name


def parse_log_name(name: str) -> LogName:
    """`{instance}/logstreams/{id}` or `.../{id}/{secret}`; INVALID_ARGUMENT otherwise."""
    if name.startswith(SEGMENT + "/"):
        instance, found, tail = "", True, name[len(SEGMENT) + 1:]
    else:
        instance, separator, tail = name.partition(f"/{SEGMENT}/")
        found = bool(separator)
    parts = tail.split("/")
    if not found or not tail or len(parts) > 2 or not all(parts):
        raise InvalidArgument(f"{name[:200]!r} is not a log stream name "
                              f"({{instance}}/{SEGMENT}/{{id}}, or .../{{id}}/{{secret}} "
                              "to write)")
    return LogName(instance, parts[0], parts[1] if len(parts) == 2 else None)


@dataclass(eq=False)
class _Stream:
    name: LogName
    token: str
    touched: float  # monotonic: last write, or creation
    data: bytearray = field(default_factory=bytearray)
    finished: bool = False
    truncated: bool = False
    finished_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Tell every waiting reader that something changed."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()


@dataclass(frozen=True, slots=True)
class ActionOutput:
    """The streams of one run of an action: read and write names of each."""

    stdout: tuple[str, str]
    stderr: tuple[str, str]


class LogStreams:
    """Every log stream of one server process."""

    def __init__(self, limits: LogStreamLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LogStreamLimits()
        self.clock = clock
        self._streams: OrderedDict[str, _Stream] = OrderedDict()  # by id, oldest first
        self._open: dict[str, _Stream] = {}  # the unfinished ones
        self._ended: deque[_Stream] = deque()  # finished with output, oldest first
        self._ended_empty: deque[_Stream] = deque()  # finished without
        self._expired_at = float("-inf")
        self._total = 0
        # (instance, action digest "hash/size") -> the streams of its current run
        self._actions: dict[tuple[str, str], ActionOutput] = {}
        self._last_runs: OrderedDict[tuple[str, str], ActionOutput] = OrderedDict()
        self.write_calls = 0  # ByteStream Write calls to streams (one may carry many writes)

    # -- the output of running actions ---------------------------------------------

    def for_action(self, instance_name: str, action: str) -> ActionOutput | None:
        """The streams of the run of `action` (its digest as "hash/size") now under
        way, created if need be; None when no more streams fit."""
        key = (instance_name, action)
        output = self._actions.get(key)
        if output is not None and self._kept(output.stdout[0]) and self._kept(output.stderr[0]):
            return output
        try:
            output = ActionOutput(self.create(instance_name), self.create(instance_name))
        except ResourceExhausted:
            return None
        self._actions[key] = output
        return output

    def end_action(self, instance_name: str, action: str) -> None:
        """The run of `action` ended: finish its streams (readers get the rest and
        stop) and forget them, so that a later run gets streams of its own."""
        key = (instance_name, action)
        output = self._actions.pop(key, None)
        if output is None:
            return
        self._last_runs[key] = output
        self._last_runs.move_to_end(key)
        while len(self._last_runs) > MAX_LAST_RUNS:
            self._last_runs.popitem(last=False)
        for read_name, _ in (output.stdout, output.stderr):
            stream = self._streams.get(parse_log_name(read_name).stream_id)
            if stream is not None and not stream.finished:
                self._finish(stream)

    def latest(self, instance_name: str, action: str) -> ActionOutput | None:
        """The streams of the run of `action` under way, or else of its last run while
        they are kept; None when there are neither (never creates any)."""
        key = (instance_name, action)
        output = self._actions.get(key) or self._last_runs.get(key)
        if output is None or not (self._kept(output.stdout[0]) or self._kept(output.stderr[0])):
            return None
        return output

    def _kept(self, read_name: str) -> bool:
        return parse_log_name(read_name).stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def total_size(self) -> int:
        return self._total

    # -- writers -------------------------------------------------------------------

    def create(self, instance_name: str) -> tuple[str, str]:
        """A new empty stream: (read name, write name)."""
        self.expire()
        self._make_room(0)
        if self._total >= self.limits.max_total_size:
            raise ResourceExhausted(
                f"the server holds {self._total} bytes of unfinished log streams, its limit "
                f"(logstreams.max-total-size {self.limits.max_total_size}): try again later")
        name = LogName(instance_name, uuid.uuid4().hex, None)
        stream = _Stream(name, secrets.token_hex(16), self.clock())
        self._streams[name.stream_id] = stream
        self._open[name.stream_id] = stream
        return name.read_name, f"{name.read_name}/{stream.token}"

    def _writable(self, name: LogName) -> _Stream:
        stream = self._find(name)
        if name.token is None:
            raise InvalidArgument(f"{name.read_name!r} is the read name of a log stream: "
                                  "write to its write_resource_name")
        if not hmac.compare_digest(name.token, stream.token):
            raise PermissionDenied(f"wrong write token for log stream {name.read_name!r}")
        return stream

    def committed(self, name: LogName) -> tuple[int, bool]:
        """(bytes written so far, finished) for QueryWriteStatus."""
        stream = self._writable(name)
        return len(stream.data), stream.finished

    def write(self, name: LogName, offset: int, data: bytes, finish: bool) -> int:
        """Append `data` at `offset` (which must be the stream's length); the new length."""
        stream = self._writable(name)
        if stream.finished:
            raise FailedPrecondition(f"log stream {name.read_name!r} is finished: nothing "
                                     "more can be written to it")
        if offset != len(stream.data):
            raise InvalidArgument(f"write_offset {offset} of log stream {name.read_name!r}: "
                                  f"expected {len(stream.data)}, the bytes written so far")
        stream.touched = self.clock()
        if len(stream.data) + len(data) > self.limits.max_stream_size:
            room = self.limits.max_stream_size - len(stream.data)
            self._append(stream, data[:room])
            self._finish(stream, truncated=True)
            raise ResourceExhausted(
                f"log stream {name.read_name!r} reached its limit of "
                f"{self.limits.max_stream_size} bytes (logstreams.max-stream-size): it keeps "
                "the first ones and takes no more")
        self._append(stream, data)
        if finish:
            self._finish(stream)
        elif data:
            stream.wake()
        return len(stream.data)

    def _append(self, stream: _Stream, data: bytes) -> None:
        if data:
            self._make_room(len(data))
            stream.data += data
            self._total += len(data)

    def _finish(self, stream: _Stream, truncated: bool = False) -> None:
        stream.finished = True
        stream.truncated = stream.truncated or truncated
        stream.finished_at = self.clock()
        self._open.pop(stream.name.stream_id, None)
        # kept for late readers; one that nothing was written to only briefly
        # (most actions print nothing: they must not fill the memory)
        (self._ended if stream.data else self._ended_empty).append(stream)
        stream.wake()

    # -- readers -------------------------------------------------------------------

    async def read(self, name: LogName, offset: int, limit: int) -> AsyncGenerator[bytes, None]:
        """The stream's bytes from `offset` (at most `limit` of them, 0: no limit) as
        they are written, until it is finished."""
        if name.token is not None:
            raise InvalidArgument(f"a log stream is read by its name, not by its write "
                                  f"name ({name.read_name!r})")
        if offset < 0:
            raise OutOfRange(f"read_offset {offset} is negative")
        if limit < 0:
            raise InvalidArgument(f"read_limit {limit} is negative")
        stream = self._find(name)
        if stream.finished and offset > len(stream.data):
            raise OutOfRange(f"read_offset {offset} is past the end of log stream "
                             f"{name.read_name!r} ({len(stream.data)} bytes)")
        end = offset + limit if limit else None
        position = offset
        while True:
            changed = stream.changed
            available = len(stream.data) if end is None else min(end, len(stream.data))
            while position < available:
                step = min(READ_CHUNK, available - position)
                yield bytes(stream.data[position:position + step])
                position += step
            if (end is not None and position >= end) or stream.finished:
                return
            await changed.wait()
            if self._streams.get(name.stream_id) is not stream:
                raise NotFound(f"log stream {name.read_name!r} expired while it was read")

    def snapshot(self, name: LogName, offset: int, limit: int) -> tuple[bytes, bool]:
        """What a stream holds from `offset` (at most `limit` bytes) right now, and
        whether nothing more will come after it; never waits."""
        stream = self._find(name)
        if offset < 0 or offset > len(stream.data):
            raise OutOfRange(f"offset {offset} is outside log stream {name.read_name!r} "
                             f"({len(stream.data)} bytes so far)")
        data = bytes(stream.data[offset:offset + limit])
        return data, stream.finished and offset + len(data) == len(stream.data)

    # -- housekeeping --------------------------------------------------------------

    def _find(self, name: LogName) -> _Stream:
        self.expire()
        stream = self._streams.get(name.stream_id)
        if stream is None or stream.name.instance_name != name.instance_name:
            raise NotFound(
                f"log stream {name.read_name!r} is not known: it never existed or it "
                f"expired (a finished stream is kept {self.limits.keep_for:g} s)")
        return stream

    def expire(self) -> None:
        """Finish streams whose writer went silent; drop those kept long enough
        (looked at most once a second: it costs a pass over the unfinished ones)."""
        now = self.clock()
        if now - self._expired_at < 1.0:
            return
        self._expired_at = now
        for stream in list(self._open.values()):
            if now - stream.touched >= self.limits.idle_timeout:
                self._finish(stream)
        for ended, kept in ((self._ended, self.limits.keep_for),
                            (self._ended_empty, min(self.limits.keep_for, EMPTY_KEEP))):
            while ended and now - ended[0].finished_at >= kept:
                self._drop(ended.popleft())

    def _make_room(self, size: int) -> None:
        """Drop the oldest finished streams until `size` more bytes fit."""
        while self._ended and self._total + size > self.limits.max_total_size:
            self._drop(self._ended.popleft())
        if self._total + size > self.limits.max_total_size:
            raise ResourceExhausted(
                f"the server's log streams hold {self._total} bytes, their limit "
                f"(logstreams.max-total-size {self.limits.max_total_size}): this output "
                "is not kept")

    def _drop(self, stream: _Stream) -> None:
        self._open.pop(stream.name.stream_id, None)
        if self._streams.pop(stream.name.stream_id, None) is stream:
            self._total -= len(stream.data)
            stream.wake()  # readers still waiting find it gone
        if len(self._actions) > len(self._streams):  # forget runs whose streams are gone
            self._actions = {key: output for key, output in self._actions.items()
                             if self._kept(output.stdout[0]) or self._kept(output.stderr[0])}
