"""Running one lease: fetch the action and its inputs, run the command, upload the result.

`Runner.run` returns a `LeaseOutcome`: the lease status and, when the command
ran, the ActionResult.  The status is OK for any command that ran, whatever its
exit code; DEADLINE_EXCEEDED (with stdout/stderr and the exit code in the
result) when it ran past its timeout; otherwise the failure that stopped it:

- INVALID_ARGUMENT: an unsafe input tree or command, an unknown payload;
- FAILED_PRECONDITION (with PreconditionFailure details): input blobs missing
  from the CAS;
- UNAVAILABLE: the CAS could not be reached;
- INTERNAL: anything else that went wrong on the bot (disk full, fork failure,
  a corrupt blob...), with a message naming the cause.

Each command runs in a fresh directory ``<work>/<uuid>/root`` in its own process
group (a new session), with only the Command's environment variables, stdin
from /dev/null and stdout/stderr in files next to the root.  On timeout or
cancellation the whole group is killed with SIGKILL; after a normal exit the
group is killed too, so that no stray background process outlives its action.
The directory is removed afterwards, in the background while the outcome is
reported (`Runner.settle` waits for the removals).  The Command is read and
the input tree fetched at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import shutil
import signal
import stat
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.client.cas import CasClient, CasError, CorruptBlob, MissingBlobs, digest_of_file
from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, FailedPrecondition, InvalidArgument
from buildfleet.worker.cache import LocalCache
from buildfleet.worker.inputs import (
    Outputs,
    check_command,
    flatten_tree,
    materialise,
    missing_error,
)
from buildfleet.worker.limits import (
    ActionCgroup,
    Cgroups,
    Limits,
    gated,
    human_bytes,
    requested,
    set_rlimits,
)
from buildfleet.worker.outputs import collect_outputs, sort_result
from buildfleet.worker.sandbox import (
    NETWORK_PROPERTY,
    SandboxConfig,
    exit_code_of,
    last_line,
    launch,
    through_env,
    wants_network,
)
from buildfleet.worker.streaming import OutputStreamer

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTION_NAME = re_pb2.Action.DESCRIPTOR.full_name
DIGEST_NAME = re_pb2.Digest.DESCRIPTOR.full_name
TRANSIENT_CAS_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                       grpc.StatusCode.ABORTED)


@dataclass
class RunnerConfig:
    bot_id: str
    work_dir: Path  # actions run in fresh directories under it
    default_timeout: float = 3600.0  # seconds, when the Action sets none
    allow_outside_symlinks: bool = False
    # While the CAS is unreachable, CAS steps are retried for this long (seconds), so
    # that a finished action's outputs survive a server restart.
    cas_retry_timeout: float = 60.0
    retry_max_delay: float = 10.0
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    limits: Limits = field(default_factory=Limits)  # every action's, and the most one may ask
    cgroups: Cgroups | None = None  # where actions with limits get their cgroups


@dataclass(frozen=True)
class Ran:
    """How a command ended."""

    exit_code: int
    timed_out: bool
    limit_hit: str | None  # "memory" or "pids" when it hit that limit (cgroups only)


class SandboxFailure(Exception):
    """The sandbox could not be set up for a command (it never ran)."""


@dataclass
class LeaseOutcome:
    """What to report for a lease."""

    status: status_pb2.Status
    result: re_pb2.ActionResult | None = None
    action_digest: Digest | None = None
    summary: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def code(self) -> int:
        return self.status.code


def status(code: int, message: str = "", details: list[AnyProto] | None = None
           ) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message, details=details or [])


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group `pgid` (no error when none is left)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _stamp(target: Timestamp) -> float:
    target.GetCurrentTime()
    return time.monotonic()


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """Run blocking work in a thread; if cancelled, still wait for the thread to finish.

    (So that nothing keeps writing into a directory that is about to be removed.)
    """
    future = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with directories the command made read-only."""
    def retry(function: Callable[..., object], failed: str, _: object) -> None:
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            os.chmod(failed, stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            function(failed)

    if not (path.exists() or path.is_symlink()):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


async def retry_transient(operation: Callable[[], Awaitable[T]], what: str, *,
                          window: float, max_delay: float) -> T:
    """Run `operation`, again with backoff while it fails with a transient CAS error,
    for up to `window` seconds; then the last error is raised."""
    deadline = time.monotonic() + window
    delay = 0.1
    attempt = 0
    while True:
        try:
            return await operation()
        except CasError as error:
            if error.code not in TRANSIENT_CAS_CODES or time.monotonic() >= deadline:
                raise
            attempt += 1
            pause = min(delay, max_delay, max(0.0, deadline - time.monotonic()))
            pause *= random.uniform(0.5, 1.0)
            (log.warning if attempt == 1 else log.debug)(
                "%s: CAS unreachable (%s); retrying for up to %.0fs", what, error.message,
                max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
            delay *= 2


class Runner:
    """Runs leases for one bot."""

    def __init__(self, cas: CasClient, cache: LocalCache, config: RunnerConfig) -> None:
        self.cas = cas
        self.cache = cache
        self.config = config
        self.process_groups: set[int] = set()  # running commands, for an abrupt stop
        self.completed = 0
        # directories of finished actions being removed: after the report, not before
        self._removals: set[asyncio.Future[None]] = set()

    def _remove_later(self, path: Path) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, remove_tree, path)
        self._removals.add(future)
        future.add_done_callback(self._removed)

    def _removed(self, future: asyncio.Future[None]) -> None:
        self._removals.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not remove an action's directory: %s", future.exception())

    async def settle(self) -> None:
        """Wait until the directories of finished actions are removed."""
        while self._removals:
            await asyncio.gather(*list(self._removals), return_exceptions=True)

    async def _spawn(self, command: re_pb2.Command, root: Path, working: Path,
                     environment: dict[str, str], network: bool, limits: Limits,
                     timeout: float, stdout: int, stderr: int, status: int) -> Ran:
        """Run the command to its end (or timeout).  A sandbox reports the exit code on
        the descriptor `status`; with `limits` the command starts behind a gate that
        opens once it is in its cgroup (or under its resource limits)."""
        start = launch(self.config.sandbox, command.arguments, root=root, working=working,
                       environment=environment, network=network, status_fd=status)
        argv = start.argv
        group: ActionCgroup | None = None
        gate_read = gate_write = -1
        if limits:
            # unsandboxed, env(1) takes back out the PWD that the gate's shell exports
            argv = gated(argv if start.sandboxed else through_env(argv, environment))
        try:
            if limits:
                if self.config.cgroups is not None:
                    group = await in_thread(self.config.cgroups.make, limits)
                gate_read, gate_write = os.pipe()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, cwd=start.cwd, env=environment,
                    stdin=gate_read if limits else asyncio.subprocess.DEVNULL,
                    stdout=stdout, stderr=stderr, start_new_session=True,
                    pass_fds=(status,) if start.sandboxed else ())
            except OSError as error:
                return self._not_started(command, error, start.sandboxed, stderr)
            finally:
                if limits:
                    os.close(gate_read)
            self.process_groups.add(process.pid)
            try:
                if limits:
                    try:
                        if group is not None:
                            group.join(process.pid)
                        else:
                            set_rlimits(process.pid, limits)
                        os.write(gate_write, b"go\n")
                    finally:
                        os.close(gate_write)
                        gate_write = -1
                timed_out = False
                try:
                    await asyncio.wait_for(process.wait(), timeout)
                except TimeoutError:
                    timed_out = True
            finally:
                kill_group(process.pid)
                if process.returncode is None:
                    await process.wait()
                self.process_groups.discard(process.pid)
            hit = group.hit() if group is not None else None
        finally:
            if gate_write >= 0:
                os.close(gate_write)
            if group is not None:
                await in_thread(group.remove)
        returncode = process.returncode
        assert returncode is not None
        if start.sandboxed and not timed_out:
            reported = exit_code_of(os.pread(status, 65536, 0))
            if reported is None:  # bwrap itself failed before the command ran
                raise SandboxFailure(last_line(stderr) or f"bwrap exited with {returncode}")
            return Ran(reported, False, hit)
        return Ran(returncode if returncode >= 0 else 128 - returncode, timed_out, hit)

    def _not_started(self, command: re_pb2.Command, error: OSError, sandboxed: bool,
                     stderr: int) -> Ran:
        """The command could not be started: exit codes as a shell gives them (127 not
        found, 126 not runnable); anything else is the bot's failure."""
        if sandboxed:
            raise OSError(error.errno, f"could not start the sandbox "
                          f"({self.config.sandbox.bwrap}): {error.strerror}") from None
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            exit_code = 127  # as a shell would: not found
        elif isinstance(error, PermissionError) or error.errno == errno.ENOEXEC:
            exit_code = 126  # found but not runnable
        else:
            raise OSError(error.errno, f"could not start the command: "
                          f"{error.strerror}") from None
        os.write(stderr, f"buildfleet bot: cannot run {command.arguments[0]!r}: "
                         f"{error.strerror}\n".encode())
        return Ran(exit_code, False, None)

    async def _retry(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_transient(operation, what, window=self.config.cas_retry_timeout,
                                     max_delay=self.config.retry_max_delay)

    def kill_all(self) -> None:
        """SIGKILL every running command (used when the bot must stop at once)."""
        for pgid in list(self.process_groups):
            kill_group(pgid)

    async def run(self, lease_id: str, payload: AnyProto,
                  streams: tuple[str, str] | None = None) -> LeaseOutcome:
        """Run the action of one lease to its outcome (cancellation kills the command).
        With `streams` (the write names of two log streams) its stdout and stderr are
        also sent there as the command runs."""
        metadata = re_pb2.ExecutedActionMetadata(worker=self.config.bot_id)
        started = _stamp(metadata.worker_start_timestamp)
        summary: dict[str, float | int | str] = {}
        action_digest: Digest | None = None
        outcome: LeaseOutcome
        try:
            action, action_digest = await self._action(payload)
            outcome = await self._run_action(action, action_digest, metadata, summary, streams)
        except asyncio.CancelledError:
            log.info("lease %s action %s: stopped after %.3fs (command killed)", lease_id,
                     action_digest or "?", time.monotonic() - started)
            raise
        except BuildfleetError as error:
            outcome = LeaseOutcome(status(error.code.value[0], error.message,
                                          [_pack(d) for d in error.details]))
        except MissingBlobs as error:
            failure = missing_error(error.digests, "blob")
            outcome = LeaseOutcome(status(code_pb2.FAILED_PRECONDITION, failure.message,
                                          [_pack(d) for d in failure.details]))
        except CorruptBlob as error:
            outcome = LeaseOutcome(status(code_pb2.INTERNAL, error.message))
        except CasError as error:
            if error.code in TRANSIENT_CAS_CODES:
                outcome = LeaseOutcome(status(code_pb2.UNAVAILABLE,
                                              f"CAS unreachable: {error.message}"))
            elif error.code == grpc.StatusCode.INVALID_ARGUMENT:
                outcome = LeaseOutcome(status(code_pb2.INVALID_ARGUMENT, error.message))
            else:
                outcome = LeaseOutcome(status(code_pb2.INTERNAL,
                                              f"CAS error {error.code.name}: {error.message}"))
        except SandboxFailure as error:
            log.warning("lease %s: the sandbox failed: %s", lease_id, error)
            outcome = LeaseOutcome(status(code_pb2.INTERNAL,
                                          f"bot {self.config.bot_id}: the sandbox could not "
                                          f"run the command: {error}"))
        except OSError as error:
            cause = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "I/O error"
            log.warning("lease %s: %s", lease_id, error)
            outcome = LeaseOutcome(status(code_pb2.INTERNAL,
                                          f"bot {self.config.bot_id}: {cause}: {error}"))
        except Exception as error:  # a bug: report it so the server retries elsewhere
            log.exception("lease %s failed on the bot", lease_id)
            outcome = LeaseOutcome(status(code_pb2.INTERNAL,
                                          f"bot {self.config.bot_id}: {type(error).__name__}: "
                                          f"{error}"))
        outcome.action_digest = action_digest
        summary["total"] = time.monotonic() - started
        outcome.summary = summary
        self.completed += 1
        self._log(lease_id, outcome)
        return outcome

    def _log(self, lease_id: str, outcome: LeaseOutcome) -> None:
        summary = outcome.summary
        exit_code = outcome.result.exit_code if outcome.result is not None else "-"
        code = code_pb2.Code.Name(outcome.code) if outcome.code in code_pb2.Code.values() \
            else str(outcome.code)
        message = f" ({outcome.status.message})" if outcome.status.message else ""
        log.info(
            "lease %s action %s: exit code %s, status %s%s; fetch %.3fs (cache hits %s, "
            "misses %s, %s bytes downloaded), execution %.3fs, upload %.3fs, total %.3fs",
            lease_id, outcome.action_digest or "?", exit_code, code, message,
            summary.get("fetch", 0.0), summary.get("cache_hits", 0),
            summary.get("cache_misses", 0), summary.get("bytes_downloaded", 0),
            summary.get("execution", 0.0), summary.get("upload", 0.0),
            summary.get("total", 0.0))

    async def _action(self, payload: AnyProto) -> tuple[re_pb2.Action, Digest]:
        kind = payload.type_url.rsplit("/", 1)[-1]
        if kind == ACTION_NAME:
            action = re_pb2.Action()
            try:
                action.ParseFromString(payload.value)
            except DecodeError:
                raise InvalidArgument("lease payload is not a valid Action") from None
            return action, Digest.of(payload.value)
        if kind == DIGEST_NAME:
            message = re_pb2.Digest()
            try:
                message.ParseFromString(payload.value)
            except DecodeError:
                raise InvalidArgument("lease payload is not a valid Digest") from None
            digest = Digest.from_proto(message, "lease payload (action digest)")
            try:
                action = await self._retry(
                    lambda: self.cas.read_message(digest, re_pb2.Action, "action"),
                    "fetching the action")
            except MissingBlobs:
                raise missing_error([digest], "action") from None
            return action, digest
        raise InvalidArgument(f"lease payload of type {payload.type_url!r} is neither an "
                              "Action nor a Digest")

    async def _read_command(self, action: re_pb2.Action, command_digest: Digest
                            ) -> tuple[re_pb2.Command, Outputs, bool, Limits, float]:
        """The action's Command, checked: its outputs, whether it gets the network,
        its limits and its timeout."""
        try:
            command = await self._retry(
                lambda: self.cas.read_message(command_digest, re_pb2.Command, "command"),
                "fetching the command")
        except MissingBlobs:
            raise missing_error([command_digest], "command") from None
        outputs = check_command(command)
        platform = action.platform if action.platform.properties else command.platform
        properties = [(p.name, p.value) for p in platform.properties]
        network = wants_network(properties)
        if network and not self.config.sandbox.allow_network:
            raise FailedPrecondition(
                f"the action asks for the network ({NETWORK_PROPERTY}=on) and bot "
                f"{self.config.bot_id} does not allow it (start it with --allow-network)")
        limits = requested(properties).within(self.config.limits)
        if action.HasField("timeout") and (action.timeout.seconds or action.timeout.nanos):
            timeout = action.timeout.seconds + action.timeout.nanos / 1e9
            if timeout < 0:
                raise InvalidArgument(f"action timeout {timeout}s is negative")
        else:
            timeout = self.config.default_timeout
        return command, outputs, network, limits, timeout

    async def _run_action(self, action: re_pb2.Action, action_digest: Digest,
                          metadata: re_pb2.ExecutedActionMetadata,
                          summary: dict[str, float | int | str],
                          streams: tuple[str, str] | None = None) -> LeaseOutcome:
        fetch_started = _stamp(metadata.input_fetch_start_timestamp)
        command_digest = Digest.from_proto(action.command_digest, "action.command_digest")
        root_digest = Digest.from_proto(action.input_root_digest, "action.input_root_digest")
        # The input tree is fetched while the command is read and checked.
        fetching_tree = asyncio.ensure_future(self._retry(
            lambda: self.cas.get_tree(root_digest), "fetching the input tree"))
        try:
            command, outputs, network, limits, timeout = await self._read_command(
                action, command_digest)
            directories = await fetching_tree
        finally:
            if not fetching_tree.done():
                fetching_tree.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetching_tree
            elif not fetching_tree.cancelled():
                fetching_tree.exception()  # retrieved: the command's error is the one raised
        tree = flatten_tree(root_digest, directories,
                            allow_outside_symlinks=self.config.allow_outside_symlinks)
        fetch = await self._retry(lambda: self.cache.ensure(tree.file_keys(), self.cas),
                                  "fetching input files")
        summary.update(cache_hits=fetch.hits, cache_misses=fetch.misses,
                       bytes_downloaded=fetch.bytes_downloaded)
        action_dir = self.config.work_dir / uuid.uuid4().hex
        try:
            try:
                await in_thread(os.mkdir, action_dir, 0o700)
                root = action_dir / "root"
                await in_thread(os.mkdir, root, 0o755)
                working = await in_thread(materialise, tree, root, self.cache, outputs)
            finally:
                self.cache.release(fetch)
            summary["fetch"] = _stamp(metadata.input_fetch_completed_timestamp) - fetch_started
            return await self._execute(command, outputs, timeout, action_dir, root, working,
                                       network, limits, metadata, summary, streams)
        finally:
            self._remove_later(action_dir)  # the outcome is reported meanwhile

    async def _execute(self, command: re_pb2.Command, outputs: Outputs, timeout: float,
                       action_dir: Path, root: Path, working: Path, network: bool,
                       limits: Limits, metadata: re_pb2.ExecutedActionMetadata,
                       summary: dict[str, float | int | str],
                       streams: tuple[str, str] | None = None) -> LeaseOutcome:
        stdout_path = action_dir / "stdout"
        stderr_path = action_dir / "stderr"
        environment = {v.name: v.value for v in command.environment_variables}
        exec_started = _stamp(metadata.execution_start_timestamp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        stdout = await in_thread(os.open, stdout_path, flags, 0o644)
        try:
            stderr = await in_thread(os.open, stderr_path, flags, 0o644)
            try:
                status_fd = await in_thread(os.open, action_dir / "sandbox-status",
                                            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                live = [OutputStreamer(self.cas.bytestream, name, path, what)
                        for name, path, what in zip(streams or (), (stdout_path, stderr_path),
                                                    ("stdout", "stderr"), strict=False)]
                for streamer in live:
                    streamer.start()
                try:
                    ran = await self._spawn(command, root, working, environment, network,
                                            limits, timeout, stdout, stderr, status_fd)
                finally:
                    os.close(status_fd)
                    for streamer in live:
                        await streamer.close()
            finally:
                os.close(stderr)
        finally:
            os.close(stdout)
        elapsed = _stamp(metadata.execution_completed_timestamp) - exec_started
        summary["execution"] = elapsed
        metadata.virtual_execution_duration.FromNanoseconds(int(elapsed * 1e9))

        exit_code, timed_out = ran.exit_code, ran.timed_out
        upload_started = _stamp(metadata.output_upload_start_timestamp)
        result = re_pb2.ActionResult(exit_code=exit_code)
        blobs: dict[Digest, bytes | Path] = {}
        if not timed_out:
            collected = await in_thread(collect_outputs, root, working, outputs)
            for skipped in collected.skipped:
                log.warning("output %s", skipped)
            result.CopyFrom(collected.result)
            result.exit_code = exit_code
            blobs.update(collected.blobs)
        stdout_digest = await in_thread(digest_of_file, stdout_path)
        stderr_digest = await in_thread(digest_of_file, stderr_path)
        blobs.setdefault(stdout_digest, stdout_path)
        blobs.setdefault(stderr_digest, stderr_path)
        result.stdout_digest.hash, result.stdout_digest.size_bytes = stdout_digest
        result.stderr_digest.hash, result.stderr_digest.size_bytes = stderr_digest
        await self._retry(lambda: self.cas.upload(blobs), "uploading outputs")
        summary["upload"] = _stamp(metadata.output_upload_completed_timestamp) - upload_started
        metadata.worker_completed_timestamp.GetCurrentTime()
        result.execution_metadata.CopyFrom(metadata)
        sort_result(result)
        if ran.limit_hit == "memory" or (ran.limit_hit == "pids" and exit_code != 0):
            # the action's own doing: reported with its result, not retried elsewhere
            what = (f"exceeded its memory limit of {human_bytes(limits.memory or 0)} and was "
                    "killed" if ran.limit_hit == "memory" else
                    f"reached its limit of {limits.pids} processes (starting another failed)")
            return LeaseOutcome(status(code_pb2.RESOURCE_EXHAUSTED,
                                       f"the action {what}; exit code {exit_code}"), result)
        if timed_out:
            return LeaseOutcome(status(code_pb2.DEADLINE_EXCEEDED,
                                       f"the command ran longer than its timeout of "
                                       f"{timeout:g}s and was killed"), result)
        return LeaseOutcome(status(code_pb2.OK), result)


def _pack(message: Message) -> AnyProto:
    if isinstance(message, AnyProto):
        return message
    packed = AnyProto()
    packed.Pack(message)
    return packed
