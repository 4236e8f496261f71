"""Where an action's command runs: in a bubblewrap sandbox, or unconfined.

`bwrap` (the default where bubblewrap works): each command runs in fresh user,
mount, PID, IPC, UTS and cgroup namespaces, and a network namespace of its own
(only a loopback) unless the action asks for the network and the bot allows it.
Its file system holds only

- the system, read-only: ``/usr``, ``/bin``, ``/sbin``, ``/lib*`` and ``/etc`` (plus
  any ``--sandbox-path``), with the secrets of ``/etc`` (password hashes, SSH host
  keys, TLS private keys, sudoers, Kerberos keytabs) masked, and the bot's own
  directories and files masked wherever they fall under a system path;
- the action's input root, read-write, at `SANDBOX_ROOT`, as the working tree;
- a private ``/tmp``, a minimal ``/dev`` and a fresh ``/proc``.

The command gets no capabilities, its own session, and dies with the bot
(``--die-with-parent``).  Every process it starts lives in its PID namespace,
which the kernel empties when the namespace's first process ends: a process that
calls ``setsid`` or forks twice does not outlive its action.

`chroot`: the same, but with the input root as ``/`` (for actions whose input root
is a complete system, as BuildStream sends); nothing of the bot's machine is
visible.

`none`: the command runs as the bot's user with the machine in view, in a
process group of its own (a process that calls ``setsid`` escapes the kill).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SANDBOX_ROOT = "/buildfleet/root"  # where the input root is inside a bwrap sandbox

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

# Secrets under the system paths that no action needs.
SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
           "/etc/security/opasswd", "/etc/ssh", "/etc/ssl/private", "/etc/sudoers",
           "/etc/sudoers.d", "/etc/krb5.keytab", "/etc/buildfleet")

NETWORK_PROPERTY = "network"  # an action asks for the network with network=on
SANDBOX_PROPERTY = "sandbox"  # what the bot advertises: sandbox=bwrap, chroot or none

# An environment variable the sandbox itself sets (bubblewrap exports the working
# directory as PWD); the command is started through `env` to take it back out.
_ENV = "/usr/bin/env"


class Kind(enum.StrEnum):
    BWRAP = "bwrap"
    CHROOT = "chroot"
    NONE = "none"


class SandboxUnusable(Exception):
    """Bubblewrap cannot run sandboxed commands here (the message says why and how to
    fix it)."""


@dataclass(frozen=True)
class SandboxConfig:
    kind: Kind = Kind.NONE
    allow_network: bool = False  # run actions that ask for the network with it
    extra_paths: tuple[str, ...] = ()  # more read-only system paths (bwrap)
    hidden: tuple[Path, ...] = ()  # the bot's own paths: never visible inside
    bwrap: str = "bwrap"


@dataclass
class Launch:
    """How to start one command: the program and arguments to exec, and the host
    directory to start it in (None: the sandbox chooses its own)."""

    argv: list[str]
    cwd: Path | None
    sandboxed: bool  # bwrap reports the exit code on the status descriptor


def wants_network(requirements: Iterable[tuple[str, str]]) -> bool:
    return (NETWORK_PROPERTY, "on") in set(requirements)


def advertised(config: SandboxConfig) -> list[tuple[str, str]]:
    """The properties a bot with this sandbox advertises."""
    pairs = [(SANDBOX_PROPERTY, config.kind.value)]
    if config.allow_network:
        pairs.append((NETWORK_PROPERTY, "on"))
    return pairs


def _under(path: str, parents: Iterable[str]) -> bool:
    return any(path == parent or path.startswith(parent.rstrip("/") + "/")
               for parent in parents)


def _mask(path: str) -> list[str]:
    """bwrap arguments that hide `path` (a file or a directory) inside the sandbox."""
    if os.path.isdir(path) and not os.path.islink(path):
        return ["--tmpfs", path, "--remount-ro", path]
    return ["--ro-bind", "/dev/null", path]


def system_arguments(config: SandboxConfig) -> list[str]:
    """The read-only system of a bwrap sandbox (symlinked top-level directories, as on
    merged-/usr systems, become the same symlinks)."""
    arguments: list[str] = []
    bound: list[str] = []
    for path in dict.fromkeys((*SYSTEM_PATHS, *config.extra_paths)):
        if os.path.islink(path):
            arguments += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            arguments += ["--ro-bind", path, path]
            bound.append(os.path.realpath(path))
    hidden = [*SECRETS, *(str(p) for p in config.hidden)]
    for path in dict.fromkeys(os.path.realpath(p) for p in hidden):
        if os.path.lexists(path) and _under(path, bound):
            arguments += _mask(path)
    return arguments


def _namespaces(network: bool) -> list[str]:
    arguments = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup-try", "--hostname", "buildfleet",
                 "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if not network:
        arguments.append("--unshare-net")
    return arguments


def through_env(argv: Sequence[str], environment: dict[str, str]) -> list[str]:
    """`argv` started through env(1), which takes out the PWD that bubblewrap sets (or
    restores the Command's own) and runs the program as execvp would, exiting 127 when
    it is not found and 126 when it cannot run -- the codes the bot reports unsandboxed."""
    if "=" in argv[0]:  # env would take it for an assignment: let bwrap run it
        return list(argv)
    assignments = [f"PWD={environment['PWD']}"] if "PWD" in environment else []
    return [_ENV, "-u", "PWD", *assignments, *argv]


def launch(config: SandboxConfig, argv: Sequence[str], *, root: Path, working: Path,
           environment: dict[str, str], network: bool, status_fd: int) -> Launch:
    """How to start `argv` for an action whose input root is `root` and whose working
    directory is `working` (a directory under `root`); a sandbox reports the command's
    exit code on the descriptor `status_fd` (see `exit_code_of`)."""
    if config.kind is Kind.NONE:
        return Launch(list(argv), working, sandboxed=False)
    relative = os.path.relpath(os.path.realpath(working), os.path.realpath(root))
    relative = "" if relative == "." else relative
    if config.kind is Kind.BWRAP:
        inside = f"{SANDBOX_ROOT}/{relative}" if relative else SANDBOX_ROOT
        # /tmp first, so that a --sandbox-path under /tmp shows through it
        files = ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                 *system_arguments(config), "--bind", str(root), SANDBOX_ROOT,
                 "--remount-ro", "/"]  # the sandbox's own root: nothing to write there
        command = through_env(argv, environment)
    else:
        inside = f"/{relative}"
        files = ["--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
                 "--tmpfs", "/tmp"]
        # The input root is the whole system: use env(1) only when it has one.
        has_env = os.access(root / _ENV.lstrip("/"), os.X_OK)
        command = through_env(argv, environment) if has_env else list(argv)
    return Launch([config.bwrap, *_namespaces(network), *files, "--chdir", inside,
                   "--json-status-fd", str(status_fd), "--", *command], cwd=None,
                  sandboxed=True)


def exit_code_of(report: bytes) -> int | None:
    """The command's exit code from what bwrap wrote on its status descriptor; None when
    the command never ran (the sandbox could not be set up)."""
    for line in report.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("exit-code"), int):
            return int(record["exit-code"])
    return None


def last_line(fd: int, limit: int = 4096) -> str:
    """The last line written to the file open as `fd` (an action's stderr), for a
    message."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, max(0, size - limit))
    except OSError:
        return ""
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def check_bwrap(config: SandboxConfig) -> None:
    """Run a real command in the sandbox the bot would use; SandboxUnusable with what
    is wrong and how to fix it when that fails."""
    program = shutil.which(config.bwrap)
    if program is None:
        raise SandboxUnusable(
            f"bubblewrap ({config.bwrap}) is not installed: install it (Debian and Ubuntu: "
            "`apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`), or run "
            "actions unsandboxed with --sandbox none")
    checked = SandboxConfig(Kind.BWRAP, bwrap=program, hidden=config.hidden,
                            extra_paths=config.extra_paths)
    with tempfile.TemporaryDirectory(prefix="buildfleet-sandbox-check-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        environment = {"PATH": "/usr/bin:/bin"}
        with open(Path(tmp) / "status", "w+b") as status:
            probe = launch(checked, ["sh", "-c", "echo ok > probe"], root=root,
                           working=root, environment=environment, network=False,
                           status_fd=status.fileno())
            try:
                result = subprocess.run(probe.argv, stdin=subprocess.DEVNULL,
                                        capture_output=True, timeout=60, env=environment,
                                        pass_fds=(status.fileno(),))
            except (OSError, subprocess.TimeoutExpired) as error:
                raise SandboxUnusable(f"bubblewrap could not run a test command: {error}; "
                                      "use --sandbox none to run unsandboxed") from None
            status.seek(0)
            code = exit_code_of(status.read())
        probe_file = root / "probe"
        if code == 0 and probe_file.is_file() and probe_file.read_bytes() == b"ok\n":
            return
    why = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
    hint = ""
    if any(word in why.lower() for word in ("namespace", "permission", "not permitted")):
        hint = (" (bubblewrap needs user namespaces: on Debian and Ubuntu "
                "`sysctl kernel.unprivileged_userns_clone=1`, on Ubuntu 24.04 also "
                "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`; in a container, "
                "a seccomp profile that allows unshare and mount)")
    raise SandboxUnusable(f"bubblewrap cannot run a sandboxed command here: {why}{hint}; "
                          "use --sandbox none to run unsandboxed")
