"""The bot: one Remote Workers API session, kept alive, running the leases it gets.

`Bot.run()` registers with CreateBotSession, then loops on UpdateBotSession:
each call reports the bot's status and its leases and long-polls for new work
(deadline `poll_timeout`; servers hold a call for up to 80% of it).  Exactly
one call is in flight.  When a lease finishes (or the bot's status changes)
while a call is waiting, that call is cancelled and a fresh one carries the
news at once.

Leases are accepted ACTIVE or PENDING (reported ACTIVE from then on), with the
Action inline or as a Digest.  A bot that has just taken work up to its capacity
waits up to `ACTIVE_REPORT_DELAY` before its next call (as buildbox-worker does):
most actions finish sooner, and their first report is then the COMPLETED one,
which saves one long-poll and its cancellation per action.  A finished lease is
reported COMPLETED in every update until a response no longer lists it (the
server's acknowledgement); a running lease that a response does not list, or
lists as CANCELLED, was withdrawn: its command is killed and it is forgotten.

While the server is unreachable the bot retries with capped, jittered
exponential backoff, keeping finished results; when the server answers
INVALID_ARGUMENT or NOT_FOUND for the session, the bot registers again and
sends the finished results in the new session's first update.

SIGTERM or SIGINT: the bot reports BOT_TERMINATING and takes no new leases,
lets running actions finish for up to `drain_timeout` seconds, kills what is
left and reports it UNAVAILABLE (so the server runs it elsewhere), delivers the
final update and exits 0.  A second signal kills every command and exits 1 at
once.  A periodic health check reports UNHEALTHY (no new work) while the work
or cache directory is not writable or free space is below the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from google.rpc import code_pb2, status_pb2

from buildfleet import __version__
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from buildfleet.client import logstreams
from buildfleet.client.cas import CasClient
from buildfleet.worker.cache import LocalCache
from buildfleet.worker.config import BotConfig, open_channel
from buildfleet.worker.health import check_health
from buildfleet.worker.limits import Cgroups
from buildfleet.worker.runner import LeaseOutcome, Runner, RunnerConfig, in_thread, remove_tree
from buildfleet.worker.sandbox import Kind, SandboxUnusable, check_bwrap

log = logging.getLogger(__name__)

PENDING, ACTIVE, COMPLETED, CANCELLED = (bots_pb2.LeaseState.Value(n) for n in
                                         ("PENDING", "ACTIVE", "COMPLETED", "CANCELLED"))
OK, UNHEALTHY, BOT_TERMINATING = (bots_pb2.BotStatus.Value(n) for n in
                                  ("OK", "UNHEALTHY", "BOT_TERMINATING"))
RPC_TIMEOUT = 30.0  # seconds for calls other than the long-poll
# Seconds a bot busy up to its capacity waits before it echoes new leases ACTIVE
# (sooner if something changes: a lease finishes, the bot is told to stop).
ACTIVE_REPORT_DELAY = 1.0
SESSION_LOST = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
FATAL_AT_START = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
_ACTION_DIR = re.compile(r"[0-9a-f]{32}")


class BotError(Exception):
    """The bot cannot start (bad configuration, rejected instance, locked directory)."""


class Backoff:
    """Capped exponential delays with jitter: 0.1 s, 0.2 s, ... up to `cap`, each scaled
    by a random factor in [0.5, 1]."""

    def __init__(self, cap: float, first: float = 0.1) -> None:
        self.cap = max(cap, first)
        self.first = first
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)


@dataclass(eq=False)
class LocalLease:
    """A lease this bot holds, as it will report it."""

    proto: bots_pb2.Lease
    task: asyncio.Task[None] | None = None
    finished: bool = False
    cancel_reason: str | None = None  # why the bot cancelled the task itself

    @property
    def id(self) -> str:
        return self.proto.id


class Bot:
    """A `buildfleet bot` process's worth of state."""

    def __init__(self, config: BotConfig) -> None:
        self.config = config
        self.cache = LocalCache(config.cache_path, config.cache_size)
        self.leases: dict[str, LocalLease] = {}
        self.unhealthy: str | None = None
        self.terminating = False
        self.session: bots_pb2.BotSession | None = None
        self.registrations = 0
        self._signals = 0
        self._wake = asyncio.Event()
        self._hold_report = False  # new leases fill the bot: report them a little later
        self._streams: dict[str, tuple[str, str]] = {}  # lease id -> log stream write names
        self._slots = asyncio.Semaphore(config.concurrency)
        self._drain_task: asyncio.Task[None] | None = None
        self._give_up_at: float | None = None
        self._aborted = False
        self._failures = 0  # consecutive failed calls to the server
        self._main: asyncio.Task[int] | None = None
        self._locks: list[IO[bytes]] = []
        self._channels: list[grpc.aio.Channel] = []
        self._runner: Runner | None = None
        self._bots: bots_pb2_grpc.BotsStub | None = None

    # ------------------------------------------------------------------ set-up

    def worker(self) -> worker_pb2.Worker:
        """How the bot describes itself: properties on the worker and on one device."""
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle=self.config.bot_id)
        for key, value in self.config.properties:
            device.properties.add(key=key, value=value)
            worker.properties.add(key=key, value=value)
        worker.configs.add(key="capacity", value=str(self.config.concurrency))
        return worker

    def _lock(self, directory: Path) -> None:
        path = directory / ".buildfleet-bot.lock"
        stream = open(path, "ab")  # noqa: SIM115 - held for the bot's lifetime
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            stream.close()
            raise BotError(f"{directory} is in use by another bot (locked {path})") from None
        self._locks.append(stream)

    def _prepare(self) -> None:
        """Create and lock the directories, clear leftovers, open the cache (blocking)."""
        config = self.config
        try:
            config.work_dir.mkdir(parents=True, exist_ok=True)
            self._lock(config.work_dir)
            config.actions_dir.mkdir(exist_ok=True)
            for leftover in config.actions_dir.iterdir():
                if _ACTION_DIR.fullmatch(leftover.name):
                    remove_tree(leftover)
            config.cache_path.mkdir(parents=True, exist_ok=True)
            if config.cache_path.resolve() != config.work_dir.resolve():
                self._lock(config.cache_path)
            self.cache.open()
        except OSError as error:
            raise BotError(f"cannot prepare the bot's directories: {error}") from None

    async def _check_sandbox(self) -> None:
        """Stop at start-up, saying why, when the chosen sandbox does not work here."""
        if self.config.sandbox.kind is Kind.NONE:
            log.warning("actions run unsandboxed (--sandbox none): each can read and write "
                        "what the bot's user can, reach the network, and leave processes "
                        "behind")
            return
        try:
            await in_thread(check_bwrap, self.config.sandbox)
        except SandboxUnusable as error:
            raise BotError(f"--sandbox {self.config.sandbox.kind.value}: {error}") from None

    def _close(self) -> None:
        for stream in self._locks:
            stream.close()
        self._locks.clear()

    # ------------------------------------------------------------------- running

    async def run(self) -> int:
        """Serve until stopped by a signal; the process exit code."""
        config = self.config
        await self._check_sandbox()
        self._prepare()
        self._main = asyncio.current_task()  # type: ignore[assignment]
        server_channel = open_channel(config.server, config.credentials)
        self._channels.append(server_channel)
        cas_channel = server_channel
        if config.cas and config.cas != config.server:
            cas_channel = open_channel(config.cas, config.credentials)
            self._channels.append(cas_channel)
        self._bots = bots_pb2_grpc.BotsStub(server_channel)
        cas = CasClient(cas_channel, config.instance)
        cgroups = await in_thread(
            Cgroups.find, "buildfleet-" + re.sub(r"[^A-Za-z0-9_.-]", "_", config.bot_id))
        self._runner = Runner(cas, self.cache, RunnerConfig(
            bot_id=config.bot_id, work_dir=config.actions_dir,
            default_timeout=config.default_timeout,
            allow_outside_symlinks=config.allow_outside_symlinks,
            retry_max_delay=config.reconnect_max_delay, sandbox=config.sandbox,
            limits=config.limits, cgroups=cgroups))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        log.info("bot %s (buildfleet %s) for %s instance %r: properties %s, concurrency %d, "
                 "work dir %s, cache %s (%d bytes), action limits %s (enforced by %s)",
                 config.bot_id, __version__, config.server,
                 config.instance, ", ".join(f"{k}={v}" for k, v in config.properties),
                 config.concurrency, config.work_dir, config.cache_path, config.cache_size,
                 config.limits.describe(),
                 f"cgroups v{cgroups.version}" if cgroups else "resource limits")
        health = asyncio.create_task(self._health_loop(), name="health")
        try:
            await self._check_instance(server_channel)
            await self._session_loop()
            return 0
        except asyncio.CancelledError:
            if self._aborted:
                return 1
            raise
        finally:
            health.cancel()
            await self._stop_leases()
            if self._runner is not None:
                await self._runner.settle()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            for channel in self._channels:
                await channel.close()
            log.info("bot %s stopped; local cache: %s", config.bot_id,
                     ", ".join(f"{k} {v}" for k, v in self.cache.stats.as_dict().items()))
            self._close()

    async def _stop_leases(self) -> None:
        if self._runner is not None:
            self._runner.kill_all()
        tasks = [lease.task for lease in self.leases.values() if lease.task is not None]
        for lease in self.leases.values():
            if lease.task is not None and not lease.task.done():
                lease.cancel_reason = lease.cancel_reason or "the bot stopped"
                lease.task.cancel()
        if self._drain_task is not None:
            self._drain_task.cancel()
            tasks.append(self._drain_task)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s: finishing running actions (up to %gs), taking no new work", name,
                     self.config.drain_timeout)
            self.terminating = True
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
            self._wake.set()
            return
        log.warning("%s again: stopping now, killing every running command", name)
        self._aborted = True
        if self._runner is not None:
            self._runner.kill_all()
        if self._main is not None:
            self._main.cancel()

    async def _drain(self) -> None:
        running = [lease.task for lease in self.leases.values()
                   if lease.task is not None and not lease.task.done()]
        if running:
            await asyncio.wait(running, timeout=self.config.drain_timeout)
        left = [lease for lease in self.leases.values()
                if lease.task is not None and not lease.task.done()]
        for lease in left:
            log.warning("lease %s still running after %gs: killing it", lease.id,
                        self.config.drain_timeout)
            lease.cancel_reason = "drain"
            assert lease.task is not None
            lease.task.cancel()
        await asyncio.gather(*(lease.task for lease in left if lease.task is not None),
                             return_exceptions=True)
        self._give_up_at = time.monotonic() + self.config.final_update_timeout
        self._wake.set()

    async def _health_loop(self) -> None:
        directories = [self.config.actions_dir, self.config.cache_path]
        while True:
            reason = await in_thread(self._check_health, directories)
            if reason != self.unhealthy:
                if reason is None:
                    log.info("healthy again")
                else:
                    log.warning("unhealthy: %s", reason)
                self.unhealthy = reason
                self._wake.set()
            await asyncio.sleep(self.config.health_interval)

    def _check_health(self, directories: list[Path]) -> str | None:
        for directory in directories:
            with contextlib.suppress(OSError):
                directory.mkdir(parents=True, exist_ok=True)
        return check_health(directories, self.config.min_free_space)

    def status(self) -> int:
        if self.terminating:
            return BOT_TERMINATING
        return UNHEALTHY if self.unhealthy else OK

    # -------------------------------------------------------------------- startup

    async def _check_instance(self, channel: grpc.aio.Channel) -> None:
        """GetCapabilities for the instance: exit on a rejected instance, wait for the
        server while it is unreachable."""
        stub = re_grpc.CapabilitiesStub(channel)
        backoff = Backoff(self.config.reconnect_max_delay)
        while not self.terminating:
            try:
                await stub.GetCapabilities(
                    re_pb2.GetCapabilitiesRequest(instance_name=self.config.instance),
                    timeout=RPC_TIMEOUT)
                return
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return
                if code in FATAL_AT_START:
                    raise BotError(f"the server refuses instance {self.config.instance!r}: "
                                   f"{error.details()}") from None
                delay = backoff.next()
                self._failed(f"server {self.config.server} unreachable", error, delay)
                await self._pause(delay)

    # -------------------------------------------------------------------- session

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if something happens that is worth reporting
        (a signal, a finished lease, a change of health)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _failed(self, what: str, error: grpc.aio.AioRpcError, delay: float) -> None:
        """Log a failed call: the first of a series as a warning, the rest at debug level."""
        self._failures += 1
        (log.warning if self._failures == 1 else log.debug)(
            "%s (%s: %s); retrying in %.1fs%s", what, error.code().name, error.details(),
            delay, " (further attempts are logged at debug level)" if self._failures == 1
            else "")

    def _recovered(self) -> None:
        if self._failures:
            log.info("server reachable again after %d failed attempts", self._failures)
            self._failures = 0

    def _done(self) -> bool:
        """Stopping, and no lease left to run or to report."""
        return self.terminating and not self.leases

    def _gave_up(self) -> bool:
        if self._give_up_at is None or time.monotonic() < self._give_up_at:
            return False
        unsent = sum(1 for lease in self.leases.values() if lease.finished)
        log.warning("could not deliver the final update within %gs; exiting anyway "
                    "(%d results not delivered)", self.config.final_update_timeout, unsent)
        return True

    async def _session_loop(self) -> None:
        assert self._bots is not None
        backoff = Backoff(self.config.reconnect_max_delay)
        while True:
            if self._done() and self.session is None:
                return
            if self._gave_up():
                return
            if self.session is None:
                try:
                    await self._register()
                    backoff.reset()
                    self._recovered()
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    if self.registrations == 0 and code in FATAL_AT_START:
                        raise BotError(f"the server refused to register the bot: "
                                       f"{code.name}: {error.details()}") from None
                    delay = backoff.next()
                    self._failed("cannot register", error, delay)
                    await self._pause(delay)
                    continue
            if self._hold_report:
                self._hold_report = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), ACTIVE_REPORT_DELAY)
            self._wake.clear()
            request = self._request()
            try:
                response = await self._update(request)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code in SESSION_LOST:
                    if (self.terminating and request.bot_session.status == BOT_TERMINATING
                            and all(lease.finished for lease in self.leases.values())):
                        return  # the server closed the session after our final report
                    log.warning("the server lost session %s (%s: %s); registering again",
                                request.name, code.name, error.details())
                    self.session = None
                    await self._pause(backoff.next())
                    continue
                delay = backoff.next()
                self._failed("UpdateBotSession failed", error, delay)
                await self._pause(delay)
                continue
            if response is None:
                continue  # interrupted to report a change: send a fresh update
            backoff.reset()
            self._recovered()
            self._apply(response)
            if self._done() and request.bot_session.status == BOT_TERMINATING:
                return

    async def _register(self) -> None:
        assert self._bots is not None
        request = bots_pb2.CreateBotSessionRequest(
            parent=self.config.instance,
            bot_session=bots_pb2.BotSession(bot_id=self.config.bot_id,
                                            status=self.status(),  # type: ignore[arg-type]
                                            worker=self.worker()))
        session = await self._bots.CreateBotSession(request, timeout=RPC_TIMEOUT)
        self.session = session
        self.registrations += 1
        log.info("registered as session %r%s", session.name,
                 f" (again; {len(self.leases)} leases carried over)"
                 if self.registrations > 1 else "")
        for lease in session.leases:
            if lease.state in (PENDING, ACTIVE) and lease.id not in self.leases:
                self._start(lease)

    def _request(self) -> bots_pb2.UpdateBotSessionRequest:
        assert self.session is not None
        body = bots_pb2.BotSession(
            name=self.session.name, bot_id=self.config.bot_id,
            status=self.status(),  # type: ignore[arg-type]
            worker=self.worker(), version=self.session.version,
            leases=[lease.proto for lease in self.leases.values()])
        if self.session.HasField("expire_time"):
            body.expire_time.CopyFrom(self.session.expire_time)
        return bots_pb2.UpdateBotSessionRequest(name=self.session.name, bot_session=body)

    async def _update(self, request: bots_pb2.UpdateBotSessionRequest
                      ) -> bots_pb2.BotSession | None:
        """One UpdateBotSession; None when a local change interrupted it first."""
        assert self._bots is not None
        timeout = self.config.poll_timeout
        if self._give_up_at is not None:  # stopping: do not wait longer than allowed
            timeout = max(1.0, min(timeout, self._give_up_at - time.monotonic()))
        call = self._bots.UpdateBotSession(request, timeout=timeout,
                                           metadata=((logstreams.WANTED, "1"),))
        waiting = asyncio.ensure_future(call)
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiting, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not waiting.done():
                call.cancel()
        try:
            response: bots_pb2.BotSession = await waiting
            self._take_streams(await call.trailing_metadata())
            return response
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._wake.is_set():
                return None
            raise

    def _take_streams(self, trailers: object) -> None:
        """The write names of the log streams of new leases, if the server gave any."""
        for key, value in trailers or ():  # type: ignore[attr-defined]
            if key != logstreams.KEY:
                continue
            try:
                self._streams.update(logstreams.decode(value))
            except ValueError as error:
                log.info("ignoring unreadable log stream names from the server: %s", error)
        while len(self._streams) > 1000:  # names of leases that never started
            self._streams.pop(next(iter(self._streams)))

    def _apply(self, response: bots_pb2.BotSession) -> None:
        """Take in the server's answer: new leases, withdrawn ones, acknowledgements."""
        assert self.session is not None
        if response.name:
            self.session.name = response.name
        self.session.version = response.version
        if response.HasField("expire_time"):
            self.session.expire_time.CopyFrom(response.expire_time)
        listed: set[str] = set()
        started = pending = False
        for lease in response.leases:
            listed.add(lease.id)
            local = self.leases.get(lease.id)
            if lease.state in (PENDING, ACTIVE):
                if local is None:
                    self._start(lease)
                    started = True
                    # one offered PENDING waits for the bot's ACTIVE: no delay then
                    pending = pending or lease.state == PENDING
            elif local is not None and not local.finished:
                # CANCELLED (or COMPLETED by someone else): stop working on it.
                self._withdraw(local, "the server cancelled it")
        for lease_id, local in list(self.leases.items()):
            if lease_id in listed:
                continue
            if local.finished:
                del self.leases[lease_id]  # acknowledged
            else:
                self._withdraw(local, "the server no longer lists it")
        running = sum(not local.finished for local in self.leases.values())
        self._hold_report = (started and not pending and not self.terminating
                             and not self.unhealthy
                             and running >= self.config.concurrency)

    def _withdraw(self, local: LocalLease, reason: str) -> None:
        log.info("lease %s withdrawn (%s): stopping it", local.id, reason)
        self.leases.pop(local.id, None)
        if local.task is not None and not local.task.done():
            local.cancel_reason = reason
            local.task.cancel()

    def _start(self, lease: bots_pb2.Lease) -> None:
        proto = bots_pb2.Lease()
        proto.CopyFrom(lease)
        proto.state = ACTIVE  # type: ignore[assignment]
        local = LocalLease(proto)
        self.leases[local.id] = local
        if self.terminating or self.unhealthy:
            why = "the bot is stopping" if self.terminating else f"the bot is unhealthy: " \
                                                                   f"{self.unhealthy}"
            log.info("lease %s refused: %s", local.id, why)
            self._finish(local, LeaseOutcome(status_pb2.Status(
                code=code_pb2.UNAVAILABLE, message=f"bot {self.config.bot_id}: {why}")))
            return
        local.task = asyncio.create_task(self._run_lease(local), name=f"lease {local.id}")

    def _finish(self, local: LocalLease, outcome: LeaseOutcome) -> None:
        proto = local.proto
        proto.state = COMPLETED  # type: ignore[assignment]
        proto.status.CopyFrom(outcome.status)
        proto.ClearField("result")
        if outcome.result is not None:
            proto.result.Pack(outcome.result)
        local.finished = True
        self._wake.set()

    async def _run_lease(self, local: LocalLease) -> None:
        assert self._runner is not None
        try:
            async with self._slots:
                outcome = await self._runner.run(local.id, local.proto.payload,
                                                 self._streams.pop(local.id, None))
        except asyncio.CancelledError:
            if local.cancel_reason is None:
                raise
            if local.cancel_reason == "drain":
                self._finish(local, LeaseOutcome(status_pb2.Status(
                    code=code_pb2.UNAVAILABLE,
                    message=f"bot {self.config.bot_id} stopped before the action finished "
                    f"(drain timeout {self.config.drain_timeout:g}s); run it elsewhere")))
            return
        if self.leases.get(local.id) is local:
            self._finish(local, outcome)


async def run_bot(config: BotConfig) -> int:
    """Run a bot until it is stopped; the exit code."""
    return await Bot(config).run()
