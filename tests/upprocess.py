"""Run `buildfleet up` as a real process for tests: the grid a user starts.

`UpProcess.start(workdir, bots=..., ...)` launches ``python -m buildfleet up`` with
stdout and stderr in files, waits (bounded) until it has printed its banner (the
bots are registered by then) and returns a handle: the endpoint, the Bazel flags
it printed per instance, its child processes.  Use it as a context manager: a
process still running at the end is killed, and so are its bots.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from procutil import ChildProcess

_ENDPOINT = re.compile(r"^buildfleet is up: grpcs?://(?P<address>\S+)$", re.MULTILINE)
_BAZEL_LINE = re.compile(r"^  bazel build //\.\.\. (?P<flags>.+)$", re.MULTILINE)
_END_OF_BANNER = "Ctrl-C stops the grid."

DEFAULT_READY_TIMEOUT = 60.0


class UpError(AssertionError):
    """`buildfleet up` did not come up (or go down) as expected."""


def child_pids(pid: int) -> set[int]:
    """The direct children of process `pid` (from /proc)."""
    children: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        children.update(int(part) for part in text.split())
    return children


def alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate()` until it is truthy; AssertionError after `timeout` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)


class UpProcess(ChildProcess):
    """A `buildfleet up` process, its output and its bots."""

    NAME = "buildfleet up"
    STOP_TIMEOUT = 60.0
    error = UpError

    def __init__(self, process: subprocess.Popen[bytes], stdout_path: Path,
                 stderr_path: Path, data_dir: Path) -> None:
        super().__init__(process)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.data_dir = data_dir
        self.endpoint = ""

    @classmethod
    def spawn(cls, workdir: Path, *, bots: int | None = 1, data_dir: Path | None = None,
              listen: str = "127.0.0.1:0", config: Path | None = None,
              extra_args: Sequence[str] = (), new_session: bool = False) -> UpProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        data_dir = data_dir if data_dir is not None else workdir / "data"
        args = [sys.executable, "-m", "buildfleet", "up", "--listen", listen,
                "--data-dir", str(data_dir)]
        if bots is not None:
            args += ["--bots", str(bots)]
        if config is not None:
            args += ["--config", str(config)]
        args += list(extra_args)
        stdout_path, stderr_path = workdir / "up.stdout", workdir / "up.stderr"
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL,
                                       stdout=stdout, stderr=stderr, env=env,
                                       start_new_session=new_session)
        return cls(process, stdout_path, stderr_path, data_dir)

    @classmethod
    def start(cls, workdir: Path, *, bots: int | None = 1, data_dir: Path | None = None,
              listen: str = "127.0.0.1:0", config: Path | None = None,
              extra_args: Sequence[str] = (), new_session: bool = False,
              timeout: float = DEFAULT_READY_TIMEOUT) -> UpProcess:
        up = cls.spawn(workdir, bots=bots, data_dir=data_dir, listen=listen, config=config,
                       extra_args=extra_args, new_session=new_session)
        try:
            up.wait_ready(timeout)
        except BaseException:
            up.kill()
            raise
        return up

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> str:
        """Wait until the whole banner is printed; the endpoint (HOST:PORT)."""
        deadline = time.monotonic() + timeout
        while True:
            stdout = self.stdout()
            match = _ENDPOINT.search(stdout)
            if match is not None and _END_OF_BANNER in stdout:
                self.endpoint = match["address"]
                return self.endpoint
            if self.process.poll() is not None:
                raise UpError(f"buildfleet up exited with {self.process.returncode} before "
                              f"it was up:\n{self.report()}")
            if time.monotonic() > deadline:
                raise UpError(f"buildfleet up was not up within {timeout:g} s:\n"
                              f"{self.report()}")
            time.sleep(0.05)

    # -- what it printed ----------------------------------------------------------------

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace")

    def bot_logs(self) -> str:
        parts = []
        for path in sorted((self.data_dir / "bots").glob("*/bot.log")):
            parts.append(f"--- {path}\n{path.read_bytes().decode(errors='replace')}")
        return "\n".join(parts)

    def report(self) -> str:
        return (f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}\n"
                f"bot logs:\n{self.bot_logs()}")

    def bazel_flags(self, instance: str = "") -> list[str]:
        """The flags printed on the `bazel build //... FLAGS` line of `instance`."""
        for match in _BAZEL_LINE.finditer(self.stdout()):
            flags = shlex.split(match["flags"])
            named = [f.split("=", 1)[1] for f in flags
                     if f.startswith("--remote_instance_name=")]
            if (named[0] if named else "") == instance:
                return flags
        raise UpError(f"no Bazel flags printed for instance {instance!r}:\n{self.stdout()}")

    # -- its processes ------------------------------------------------------------------

    def details(self) -> str:
        return self.report()

    def bot_pids(self) -> set[int]:
        """The running `buildfleet bot` children of the process."""
        return {pid for pid in child_pids(self.pid)
                if alive(pid) and "bot" in cmdline(pid)[3:5]}

    def kill(self) -> None:
        """SIGKILL the process and its bots if they are still running."""
        bots = self.bot_pids() if self.running() else set()
        super().kill()
        for pid in bots:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
