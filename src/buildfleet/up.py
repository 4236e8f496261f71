"""`buildfleet up`: a whole grid in one command.

Starts the server in this process (embedded defaults, or ``--config``) and N local
bots as child processes for every instance that executes actions, waits until
every bot has registered, prints the endpoint and the Bazel flags that use it,
and runs until SIGTERM or Ctrl-C.

- Each bot is ``python -m buildfleet bot`` with its own work directory (and local
  cache) ``DATA_DIR/bots/<n>`` and its log in ``DATA_DIR/bots/<n>/bot.log``. Its
  bot id, ``<host>-bot<n>`` (``<host>-<instance>-bot<n>`` for a named instance), is
  stable across restarts: a restarted bot replaces its predecessor's session at
  once, and the server retries the leases the dead one held.
- A bot that exits while the grid is up is logged (with the end of its log) and
  started again after a capped exponential backoff (1 s, 2 s, ... 60 s; reset
  after a minute of running).
- Stopping: the bots get SIGTERM first and drain (they finish running actions
  within ``--drain-timeout`` and report them while the server still answers),
  then the server stops. A second signal is passed on to the bots, which then
  kill their actions and exit at once.
- No orphans: the bots run in their own session (so a terminal's Ctrl-C reaches
  only `up`, which stops them in order), and each is started through a small
  shim that sets PR_SET_PDEATHSIG (SIGTERM) before exec'ing the bot, so they stop
  by themselves if `up` dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

import click

from buildfleet.auth.setup import SecureGrid, prepare
from buildfleet.config import (
    AuthConfig,
    ConfigError,
    MetricsConfig,
    ServerConfig,
    TlsConfig,
    load_config,
    parse_listen_address,
)

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the bots get to register
RESTART_FIRST_DELAY = 1.0
RESTART_MAX_DELAY = 60.0
STABLE_AFTER = 60.0  # a bot that ran this long is restarted without backoff
KILL_GRACE = 15.0  # extra seconds past the drain timeout before a bot is SIGKILLed

# Run as `python -c SHIM UP_PID PROGRAM ARGS...`: ask the kernel to SIGTERM this
# process when its parent (`up`) dies, give up if `up` is already gone, then become
# the bot. PR_SET_PDEATHSIG survives execve.
_PDEATHSIG_SHIM = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class UpError(Exception):
    """The grid could not be brought up (bad options, bots that do not register)."""


def connect_address(listen: str) -> str:
    """HOST:PORT that local clients use to reach a server listening on `listen`
    (a wildcard host becomes loopback)."""
    host, port = parse_listen_address(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "[::0]"):
        host = "[::1]"
    return f"{host}:{port}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "instance"


@dataclass(eq=False)
class BotSlot:
    """One local bot: what it is, and the process currently running it."""

    index: int
    instance: str
    bot_id: str
    work_dir: Path
    process: asyncio.subprocess.Process | None = None
    spawned_at: float = 0.0  # time.time() of the latest start
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.work_dir / "bot.log"

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def open_log(self) -> BinaryIO:
        """The bot's log file, opened for appending, with a line marking this start."""
        output = open(self.log_path, "ab")  # noqa: SIM115 - the caller closes it
        output.write(f"--- buildfleet up: starting bot {self.bot_id} "
                     f"({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        output.flush()
        return output

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_path.read_bytes()[-8192:].decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class BazelHint:
    """What a client needs to use one instance."""

    instance: str
    bots: int
    endpoint: str
    properties: list[tuple[str, str]] = field(default_factory=list)
    secure: SecureGrid | None = None

    def flags(self) -> list[str]:
        if self.secure is None:
            flags = [f"--remote_executor=grpc://{self.endpoint}"]
        else:
            flags = [f"--remote_executor=grpcs://{self.endpoint}",
                     f"--tls_certificate={self.secure.ca.resolve()}",
                     f"--remote_header=authorization=Bearer {self.secure.client_token()}"]
        if self.instance:
            flags.append(f"--remote_instance_name={self.instance}")
        flags += [f"--remote_default_exec_properties={k}={v}" for k, v in self.properties]
        return flags


class Grid:
    """The server (in this process) and its local bots (child processes)."""

    def __init__(self, config: ServerConfig, *, bots: int, instances: Sequence[str] = (),
                 drain_timeout: float = 60.0, bot_log_level: str = "info",
                 secure: SecureGrid | None = None, sandbox: str = "auto") -> None:
        from buildfleet.server.app import BuildfleetServer

        if bots < 0:
            raise UpError("--bots must be 0 or more")
        self.config = config
        self.server = BuildfleetServer(config)
        executing = [i.name for i in self.server.instances if i.scheduler is not None]
        for name in instances:
            if name not in {i.name for i in self.server.instances}:
                raise UpError(f"--instance {name!r}: the configuration has no such instance")
            if name not in executing:
                raise UpError(f"--instance {name!r}: execution is disabled on it "
                              "(scheduler.enabled: false)")
        self.bot_instances = list(dict.fromkeys(instances)) if instances else executing
        self.bots_per_instance = bots
        self.secure = secure
        self.drain_timeout = drain_timeout
        self.bot_log_level = bot_log_level
        self.sandbox = sandbox  # auto: decided at start
        self.endpoint = ""
        self.slots: list[BotSlot] = []
        self._stopping = asyncio.Event()
        self._supervisors: list[asyncio.Task[None]] = []
        self._signals = 0

    # ------------------------------------------------------------------ starting

    async def start(self) -> None:
        """Start the server and the bots (without waiting for them to register)."""
        try:
            ports = await self.server.start()
        except BaseException:
            await self.server.instances.close()
            raise
        host, _ = parse_listen_address(self.config.addresses()[0])
        self.endpoint = connect_address(f"{host}:{ports[0]}")
        if self.slots or self.bots_per_instance:
            self.sandbox = await self._choose_sandbox()
        bots_dir = self.config.data_dir / "bots"
        host_name = _slug(socket.gethostname() or "local")
        index = 0
        for instance in self.bot_instances:
            for number in range(self.bots_per_instance):
                prefix = host_name if not instance else f"{host_name}-{_slug(instance)}"
                self.slots.append(BotSlot(index=index, instance=instance,
                                          bot_id=f"{prefix}-bot{number}",
                                          work_dir=bots_dir / str(index)))
                index += 1
        for slot in self.slots:
            slot.work_dir.mkdir(parents=True, exist_ok=True)
            self._supervisors.append(asyncio.create_task(self._supervise(slot),
                                                         name=f"bot {slot.bot_id}"))

    async def _choose_sandbox(self) -> str:
        if self.sandbox != "auto":
            return self.sandbox
        from buildfleet.worker.sandbox import SandboxConfig, SandboxUnusable, check_bwrap

        try:
            await asyncio.to_thread(check_bwrap, SandboxConfig())
        except SandboxUnusable as error:
            log.warning("the bots run actions unsandboxed: %s", error)
            return "none"
        return "bwrap"

    def _bot_command(self, slot: BotSlot) -> list[str]:
        scheme = "grpc" if self.secure is None else "grpcs"
        credentials = [] if self.secure is None else [
            "--tls-ca", str(self.secure.ca), "--token-file", str(self.secure.bot_token_file)]
        bot = [sys.executable, "-m", "buildfleet", "bot",
               "--server", f"{scheme}://{self.endpoint}", *credentials,
               "--instance", slot.instance,
               "--bot-id", slot.bot_id,
               "--work-dir", str(slot.work_dir),
               "--drain-timeout", f"{self.drain_timeout:g}",
               "--sandbox", "bwrap" if self.sandbox == "auto" else self.sandbox,
               "--log-level", self.bot_log_level]
        return [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *bot]

    async def _spawn(self, slot: BotSlot) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with slot.open_log() as output:
            slot.spawned_at = time.time()
            process = await asyncio.create_subprocess_exec(
                *self._bot_command(slot), stdin=asyncio.subprocess.DEVNULL, stdout=output,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        slot.process = process
        slot.starts += 1
        log.debug("bot %s started (pid %d)", slot.bot_id, process.pid)
        return process

    async def _supervise(self, slot: BotSlot) -> None:
        """Run the slot's bot until the grid stops; restart it when it exits."""
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST_DELAY
        while not self._stopping.is_set():
            try:
                process = await self._spawn(slot)
            except OSError as error:
                log.error("cannot start bot %s: %s", slot.bot_id, error)
                code: int | None = None
                ran = 0.0
            else:
                if self._stopping.is_set():
                    slot.signal(signal.SIGTERM)
                started = loop.time()
                code = await process.wait()
                ran = loop.time() - started
            if self._stopping.is_set():
                return
            if ran >= STABLE_AFTER:
                delay = RESTART_FIRST_DELAY
            how = ("did not start" if code is None else
                   f"was killed by {signal.Signals(-code).name}" if code < 0 else
                   f"exited with code {code}")
            tail = slot.log_tail()
            log.warning("bot %s %s after %.1fs; restarting it in %.0fs (log %s)%s",
                        slot.bot_id, how, ran, delay, slot.log_path,
                        ":\n" + tail if tail else "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RESTART_MAX_DELAY)

    def _registered(self, slot: BotSlot) -> bool:
        scheduler = self.server.instances.get(slot.instance).scheduler
        if scheduler is None or not slot.running():
            return False
        return any(session.bot_id == slot.bot_id and session.created_at >= slot.spawned_at
                   for session in scheduler.live_sessions())

    async def wait_registered(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until every bot has a live session; UpError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            missing = [slot for slot in self.slots if not self._registered(slot)]
            if not missing:
                return
            if self._stopping.is_set():
                raise UpError("stopped before the bots registered")
            if loop.time() > deadline:
                details = "\n".join(f"bot {slot.bot_id} (log {slot.log_path}):\n"
                                    f"{slot.log_tail() or '(no output)'}" for slot in missing)
                raise UpError(f"{len(missing)} of {len(self.slots)} bots did not register "
                              f"within {timeout:g}s:\n{details}")
            await asyncio.sleep(0.05)

    def hints(self) -> list[BazelHint]:
        from buildfleet.worker.config import machine_properties

        os_family = [(key, value) for key, value in machine_properties() if key == "OSFamily"]
        return [BazelHint(instance=name, bots=self.bots_per_instance, endpoint=self.endpoint,
                          properties=os_family, secure=self.secure)
                for name in self.bot_instances]

    def banner(self) -> str:
        """What `up` prints once the grid works: the endpoint and the Bazel flags."""
        scheme = "grpc" if self.secure is None else "grpcs"
        lines = [f"buildfleet is up: {scheme}://{self.endpoint}"]
        if self.secure is not None:
            lines.append(f"credentials: {self.secure.root.resolve()} (the CA, the server's "
                         "certificate, a token for bots and one for clients)")
        lines.append(f"data directory: {self.config.data_dir.resolve()} "
                     f"(bot logs: {self.config.data_dir.resolve() / 'bots'}/*/bot.log)")
        metrics = self.server.metrics_url()
        if metrics is not None:
            lines.append(f"metrics: {metrics}")
        page = self.server.web_url()
        if page is not None:
            login = "" if self.secure is None else (
                f" (log in with the admin token in "
                f"{shlex.quote(str(self.secure.admin_token_file.resolve()))})")
            lines.append(f"the fleet's page: {page}{login}")
        if self.bot_instances:
            credentials = "" if self.secure is None else (
                f" --tls-ca {shlex.quote(str(self.secure.ca.resolve()))} --token-file "
                f"{shlex.quote(str(self.secure.admin_token_file.resolve()))}")
            lines.append(f"the fleet: buildfleet bots list --server {scheme}://{self.endpoint}"
                         f"{credentials}  (also: buildfleet queues, buildfleet ops list)")
        hints = self.hints()
        if not hints:
            lines += ["", "No instance executes actions (scheduler disabled everywhere); "
                      "use it as a remote cache:",
                      f"  bazel build //... --remote_cache={scheme}://{self.endpoint}"]
        for hint in hints:
            label = f"instance {hint.instance!r}" if hint.instance else "the default instance"
            flags = [shlex.quote(flag) for flag in hint.flags()]
            lines += ["", f"{label}: {hint.bots} local bot{'s' if hint.bots != 1 else ''}. "
                      "Build with Bazel:",
                      "  bazel build //... " + " ".join(flags),
                      "or put in .bazelrc:"]
            lines += [f"  build {flag}" for flag in flags]
        lines += ["", "Ctrl-C stops the grid."]
        return "\n".join(lines)

    # ------------------------------------------------------------------ stopping

    def request_stop(self, signum: int | None = None) -> None:
        """First call: stop in order. Later calls: pass the signal on to the bots,
        which then stop at once."""
        self._signals += 1
        if self._signals == 1:
            self._stopping.set()
            return
        name = signal.Signals(signum).name if signum is not None else "stop"
        log.warning("%s again: the bots stop now, killing their actions", name)
        for slot in self.slots:
            slot.signal(signal.SIGTERM)

    async def wait_stop_requested(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Stop the bots (SIGTERM, drain), then the server."""
        self._stopping.set()
        running = [slot for slot in self.slots if slot.running()]
        if running:
            log.info("stopping %d bots (running actions get up to %gs)", len(running),
                     self.drain_timeout)
        for slot in running:
            slot.signal(signal.SIGTERM)
        if self._supervisors:
            _, pending = await asyncio.wait(self._supervisors,
                                            timeout=self.drain_timeout + KILL_GRACE)
            for slot in self.slots:
                if slot.running():
                    log.warning("bot %s did not stop in time: killing it", slot.bot_id)
                    slot.signal(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=10)
            for task in pending:
                task.cancel()
        for slot in self.slots:
            code = slot.process.returncode if slot.process is not None else None
            if code not in (None, 0):
                log.warning("bot %s exited with %s while stopping (log %s)", slot.bot_id,
                            code, slot.log_path)
        if self.endpoint:
            log.info("stopping the server")
        await self.server.stop()


async def run_up(config: ServerConfig, *, bots: int, instances: Sequence[str] = (),
                 drain_timeout: float = 60.0, ready_timeout: float = READY_TIMEOUT,
                 out: TextIO | None = None, secure: SecureGrid | None = None,
                 sandbox: str = "auto") -> int:
    """Bring the grid up, print how to use it, run until SIGTERM/SIGINT; exit code."""
    stream = out if out is not None else sys.stdout
    grid = Grid(config, bots=bots, instances=instances, drain_timeout=drain_timeout,
                secure=secure, sandbox=sandbox)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, grid.request_stop, signum)
    code = 0
    try:
        await grid.start()
        log.info("server on %s; starting %d bots", grid.endpoint, len(grid.slots))
        waiting = asyncio.ensure_future(grid.wait_registered(ready_timeout))
        stop = asyncio.ensure_future(grid.wait_stop_requested())
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if waiting.done():
            waiting.result()  # raises UpError when the bots did not register
            stream.write(grid.banner() + "\n")
            stream.flush()
            log.info("%d bots registered; the grid is up", len(grid.slots))
            await grid.wait_stop_requested()
        else:
            waiting.cancel()
        log.info("shutting down")
    except UpError as error:
        log.error("%s", error)
        code = 1
    finally:
        await grid.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=2)
    log.info("stopped")
    return code


@click.command("up")
@click.option("--bots", type=click.IntRange(min=0), default=None, metavar="N",
              help="Local bots per executing instance. Default: the number of CPUs.")
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve on (repeatable; bots and the printed flags use the "
                   "first). Default 127.0.0.1:50051.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Server data, and the bots' work dirs under DIR/bots. "
                   "Default ./buildfleet-data.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML configuration file of the server (instances, storage, limits).")
@click.option("--instance", "instances", multiple=True, metavar="NAME",
              help="Instance the bots serve (repeatable). Default: every instance that "
                   "executes actions.")
@click.option("--drain-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds the bots' running actions get to finish when stopping.")
@click.option("--secure", is_flag=True,
              help="TLS and tokens: make (once, in DATA_DIR/secure) a private CA, a server "
                   "certificate and tokens for the bots and for clients, and print the "
                   "Bazel flags that use them.")
@click.option("--sandbox", "sandbox", default="auto", show_default=True,
              type=click.Choice(["auto", "bwrap", "none"]),
              help="How the bots run actions: in a bubblewrap sandbox (auto: when it works "
                   "on this machine, else unsandboxed with a warning) or unsandboxed.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def up(bots: int | None, listen: tuple[str, ...], data_dir: Path | None,
       config_file: Path | None, instances: tuple[str, ...], drain_timeout: float,
       secure: bool, sandbox: str, log_level: str) -> None:
    """Start a whole grid: the server and local bots, until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = load_config(config_file).with_overrides(listen=list(listen), data_dir=data_dir)
        if config.metrics.listen is None:  # on by default here, on a free loopback port
            config = config.model_copy(update={"metrics": MetricsConfig(listen="127.0.0.1:0")})
        if config.web.listen is None:  # the fleet's page too
            config = config.model_copy(update={"web": config.web.model_copy(
                update={"listen": "127.0.0.1:0"})})
        files = secured(config) if secure else None
        if files is not None:
            config = config.model_copy(update={
                "tls": TlsConfig(cert=str(files.server_cert.resolve()),
                                 key=str(files.server_key.resolve())),
                "auth": AuthConfig(tokens_file=str(files.tokens_file.resolve()))})
    except (ConfigError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    count = bots if bots is not None else (os.cpu_count() or 1)
    try:
        code = asyncio.run(run_up(config, bots=count, instances=instances,
                                  drain_timeout=drain_timeout, secure=files, sandbox=sandbox))
    except (UpError, ConfigError, OSError) as error:
        raise click.ClickException(str(error)) from None
    sys.exit(code)


def secured(config: ServerConfig) -> SecureGrid:
    """The credentials of `up --secure` (made once in DATA_DIR/secure)."""
    if config.tls is not None or config.auth.configured or any(
            tls is not None for _, tls in config.listeners()):
        raise ConfigError("--secure makes the grid's TLS and tokens itself: leave `tls` and "
                          "`auth` out of the configuration (or drop --secure)")
    host, _ = parse_listen_address(config.addresses()[0])
    return prepare(Path(config.data_dir) / "secure", [host])
