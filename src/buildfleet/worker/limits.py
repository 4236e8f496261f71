"""Per-action limits on memory and on the number of processes, enforced by the kernel.

A limit comes from the bot (`--memory-limit`, `--pids-limit`: every action's, and
the most an action may ask for) and from the action's platform properties
(`memory=2GiB`, `pids=200`: a lower limit of its own).  Where the bot can make
cgroups (cgroup v2 with the memory and pids controllers delegated to it, or the v1
memory and pids hierarchies) each action runs in a cgroup of its own, and the bot
can tell afterwards which limit an action hit: the kernel's OOM killer ended it
(memory), or it was refused a new process (pids).  Elsewhere the limits are
resource limits (RLIMIT_AS, RLIMIT_NPROC) set on the action's first process, which
are weaker (address space rather than memory; processes counted per user) and do
not say afterwards which one was hit.

The command is started through a small gate (`sh` waiting on a pipe) so that it
is inside its cgroup, or under its resource limits, before it runs anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ByteSize, TypeAdapter, ValidationError

from buildfleet.errors import InvalidArgument

log = logging.getLogger(__name__)

MEMORY_PROPERTY = "memory"
PIDS_PROPERTY = "pids"

# Reads one line from its stdin, a pipe (the bot writes it once the process is in its
# cgroup, or under its limits), takes /dev/null as stdin instead and becomes the
# command.
GATE = ["/bin/sh", "-c", 'read go || exit 125; exec "$@" </dev/null', "sh"]


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None

    def __bool__(self) -> bool:
        return self.memory is not None or self.pids is not None

    def within(self, cap: Limits) -> Limits:
        """These limits, none above `cap` (unset ones take the cap's)."""
        def lower(mine: int | None, theirs: int | None) -> int | None:
            if mine is None:
                return theirs
            return mine if theirs is None else min(mine, theirs)

        return Limits(lower(self.memory, cap.memory), lower(self.pids, cap.pids))

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory {human_bytes(self.memory)}")
        if self.pids is not None:
            parts.append(f"{self.pids} processes")
        return ", ".join(parts) or "none"


def human_bytes(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def parse_size(text: str, what: str) -> int:
    try:
        size = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise InvalidArgument(f"{what} {text!r} is not a size (e.g. 512MiB, 2GiB)") from None
    if size <= 0:
        raise InvalidArgument(f"{what} {text!r} must be more than 0")
    return size


def requested(properties: Iterable[tuple[str, str]]) -> Limits:
    """The limits an action asks for with its platform properties; InvalidArgument for
    a malformed one."""
    memory = pids = None
    for name, value in properties:
        if name == MEMORY_PROPERTY:
            memory = parse_size(value, "platform property memory")
        elif name == PIDS_PROPERTY:
            if not value.isdigit() or int(value) <= 0:
                raise InvalidArgument(f"platform property pids {value!r} is not a positive "
                                      "number of processes")
            pids = int(value)
    return Limits(memory, pids)


# -- cgroups ---------------------------------------------------------------------------------

def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, super options) of the cgroup file systems."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) > 4 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as stream:
        stream.write(value)


def _count(path: Path, key: str) -> int:
    """The value of `key` in a flat-keyed cgroup file (memory.events, pids.events)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    match = re.search(rf"^{re.escape(key)} (\d+)$", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


class ActionCgroup:
    """The cgroup(s) one action runs in."""

    def __init__(self, directories: dict[str, Path], version: int) -> None:
        self.directories = directories  # controller -> directory ("" for v2)
        self.version = version

    def join(self, pid: int) -> None:
        for directory in self.directories.values():
            _write(directory / "cgroup.procs", str(pid))

    def hit(self) -> str | None:
        """Which limit the action hit: "memory", "pids" or None."""
        if self.version == 2:
            directory = self.directories[""]
            if _count(directory / "memory.events", "oom_kill"):
                return "memory"
            if _count(directory / "pids.events", "max"):
                return "pids"
            return None
        memory = self.directories.get("memory")
        if memory is not None and _count(memory / "memory.oom_control", "oom_kill"):
            return "memory"
        pids = self.directories.get("pids")
        if pids is not None and _count(pids / "pids.events", "max"):
            return "pids"
        return None

    def remove(self) -> None:
        """Remove the cgroup (killing anything left in it first)."""
        for directory in self.directories.values():
            for _ in range(50):
                try:
                    members = (directory / "cgroup.procs").read_text().split()
                except OSError:
                    break
                if not members:
                    break
                for member in members:
                    with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                        os.kill(int(member), 9)
            with contextlib.suppress(OSError):
                directory.rmdir()


class Cgroups:
    """Where the bot makes its actions' cgroups."""

    def __init__(self, parents: dict[str, Path], version: int) -> None:
        self.parents = parents
        self.version = version

    @classmethod
    def find(cls, name: str) -> Cgroups | None:
        """The bot's cgroups for its actions (made now), or None where it cannot have
        any: then the limits are resource limits."""
        own = _own_paths()
        mounts = _mounts()
        v1: dict[str, Path] = {}
        for controller in ("memory", "pids"):
            mount = next((point for point, kind, options in mounts
                          if kind == "cgroup" and controller in options), None)
            if mount is None or controller not in own:
                break
            v1[controller] = Path(mount) / own[controller].lstrip("/") / name
        else:
            try:
                for directory in v1.values():
                    directory.mkdir(exist_ok=True)
                return cls(v1, 1)
            except OSError as error:
                log.info("no cgroups for actions (%s): limits are resource limits", error)
                return None
        unified = next((point for point, kind, _ in mounts if kind == "cgroup2"), None)
        if unified is None or "" not in own:
            return None
        return cls._delegated_v2(Path(unified) / own[""].lstrip("/"), name)

    @classmethod
    def _delegated_v2(cls, own: Path, name: str) -> Cgroups | None:
        """On cgroup v2 a cgroup with processes cannot give controllers to children: the
        bot moves itself into a leaf of its own cgroup first (as a service with
        delegation does), then makes the actions' parent beside it."""
        try:
            available = set((own / "cgroup.controllers").read_text().split())
            if not {"memory", "pids"} <= available:
                log.info("no cgroups for actions (the memory and pids controllers are not "
                         "delegated to %s): limits are resource limits", own)
                return None
            if (own / "cgroup.procs").read_text().split() != [] and str(own) != "/sys/fs/cgroup":
                leaf = own / f"{name}-bot"
                leaf.mkdir(exist_ok=True)
                for member in (own / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        _write(leaf / "cgroup.procs", member)
            _write(own / "cgroup.subtree_control", "+memory +pids")
            parent = own / name
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+memory +pids")
        except OSError as error:
            log.info("no cgroups for actions (%s): limits are resource limits", error)
            return None
        return cls({"": parent}, 2)

    def make(self, limits: Limits) -> ActionCgroup:
        """A new cgroup with `limits`; OSError when it cannot be made."""
        name = uuid.uuid4().hex
        directories = {controller: parent / name for controller, parent in self.parents.items()}
        made = ActionCgroup({}, self.version)
        try:
            for controller, directory in directories.items():
                directory.mkdir()
                made.directories[controller] = directory
            if self.version == 2:
                directory = directories[""]
                if limits.memory is not None:
                    _write(directory / "memory.max", str(limits.memory))
                    with contextlib.suppress(OSError):  # no swap accounting: fine
                        _write(directory / "memory.swap.max", "0")
                if limits.pids is not None:
                    _write(directory / "pids.max", str(limits.pids))
            else:
                if limits.memory is not None and "memory" in directories:
                    memory = directories["memory"]
                    _write(memory / "memory.limit_in_bytes", str(limits.memory))
                    if (memory / "memory.memsw.limit_in_bytes").exists():
                        with contextlib.suppress(OSError):
                            _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory))
                if limits.pids is not None and "pids" in directories:
                    _write(directories["pids"] / "pids.max", str(limits.pids))
        except OSError:
            made.remove()
            raise
        return made


def set_rlimits(pid: int, limits: Limits) -> None:
    """The fallback without cgroups: resource limits on the gated first process."""
    if limits.memory is not None:
        resource.prlimit(pid, resource.RLIMIT_AS, (limits.memory, limits.memory))
    if limits.pids is not None:
        resource.prlimit(pid, resource.RLIMIT_NPROC, (limits.pids, limits.pids))


def gated(argv: Sequence[str]) -> list[str]:
    return [*GATE, *argv]
