"""An action's inputs: checking the input tree and command, and laying them out on disk.

Everything is checked before anything is written (`flatten_tree`, `check_command`):

- a name in a Directory that is empty, ``.``, ``..``, contains ``/`` (so also an
  absolute path) or a NUL byte, or that appears twice in one directory (among
  its files, subdirectories and symlinks together) is INVALID_ARGUMENT;
- a symlink whose target is absolute, or that resolves (following the other
  symlinks of the tree as the kernel would) to a place above the input root,
  is INVALID_ARGUMENT unless outside symlinks are allowed;
- the working directory and every output path must be relative, normalised
  paths that stay inside the input root (outputs: inside the working
  directory); anything else is INVALID_ARGUMENT;
- a directory of the tree missing from the CAS is FAILED_PRECONDITION.

`materialise` then creates the tree under a fresh directory: directories,
files hard-linked from the local cache, symlinks last (so nothing is written
through one), and the parent directories of every declared output; each
directory it creates or walks into is checked to resolve inside the root.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.rpc import error_details_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import FailedPrecondition, InvalidArgument
from buildfleet.worker.cache import CacheKey, LocalCache

MAX_ENTRIES = 2_000_000  # files + directories + symlinks in one input tree
MAX_DEPTH = 1_000
MAX_SYMLINK_HOPS = 40  # as Linux: deeper chains fail with ELOOP, they cannot escape


@dataclass
class InputTree:
    """A checked input tree as paths relative to the input root ('/'-separated)."""

    directories: list[str] = field(default_factory=list)  # parents before children
    files: list[tuple[str, Digest, bool]] = field(default_factory=list)  # path, digest, exec
    symlinks: list[tuple[str, str]] = field(default_factory=list)  # path, target

    def file_keys(self) -> set[CacheKey]:
        return {(digest, executable) for _, digest, executable in self.files}

    def size(self) -> int:
        return sum(digest.size_bytes for _, digest, _ in self.files)


@dataclass
class Outputs:
    """What a Command wants back, as normalised paths relative to the working directory."""

    working_directory: str  # relative to the input root; "" is the root itself
    paths: list[str]  # output_paths (REAPI v2.1 style); empty when the legacy fields are used
    files: list[str]  # legacy output_files
    directories: list[str]  # legacy output_directories
    directory_format: int = 0

    @property
    def uses_paths(self) -> bool:
        return bool(self.paths) or not (self.files or self.directories)

    def all(self) -> list[str]:
        return list(dict.fromkeys([*self.paths, *self.files, *self.directories]))


def missing_error(digests: list[Digest], what: str) -> FailedPrecondition:
    """FAILED_PRECONDITION naming missing blobs, with REAPI PreconditionFailure details."""
    failure = error_details_pb2.PreconditionFailure()
    for digest in sorted(set(digests)):
        failure.violations.add(type="MISSING", subject=f"blobs/{digest.hash}/{digest.size_bytes}",
                               description=f"{what} {digest} is not in the CAS")
    shown = ", ".join(str(d) for d in sorted(set(digests))[:5])
    more = f" and {len(set(digests)) - 5} more" if len(set(digests)) > 5 else ""
    return FailedPrecondition(f"missing input: {what} {shown}{more} not in the CAS",
                              details=[failure])


def check_name(name: str, where: str) -> None:
    """Refuse a Directory entry name that is not one plain path segment."""
    if name in ("", ".", ".."):
        raise InvalidArgument(f"input tree: {where} has an entry named {name!r}")
    if "/" in name:
        raise InvalidArgument(f"input tree: {where} has an entry named {name!r}, "
                              "which contains '/' (names are single path segments)")
    if "\0" in name:
        raise InvalidArgument(f"input tree: {where} has an entry name with a NUL byte")


def _describe(path: str) -> str:
    return f"directory {path!r}" if path else "the root directory"


def flatten_tree(root: Digest, directories: Mapping[Digest, re_pb2.Directory], *,
                 allow_outside_symlinks: bool = False) -> InputTree:
    """Check the tree under `root` and list its entries; raises before anything is written."""
    if root not in directories:
        raise missing_error([root], "input root directory")
    tree = InputTree()
    links: dict[tuple[str, ...], str] = {}
    missing: list[Digest] = []
    stack: list[tuple[tuple[str, ...], Digest]] = [((), root)]
    count = 0
    while stack:
        parts, digest = stack.pop()
        if len(parts) > MAX_DEPTH:
            raise InvalidArgument(f"input tree: nested deeper than {MAX_DEPTH} directories")
        directory = directories[digest]
        where = _describe("/".join(parts))
        seen: set[str] = set()
        names = ([n.name for n in directory.files] + [n.name for n in directory.directories]
                 + [n.name for n in directory.symlinks])
        for name in names:
            check_name(name, where)
            if name in seen:
                raise InvalidArgument(f"input tree: {where} has two entries named {name!r}")
            seen.add(name)
        count += len(names)
        if count > MAX_ENTRIES:
            raise InvalidArgument(f"input tree: more than {MAX_ENTRIES} entries")
        for file_node in directory.files:
            file_digest = Digest.from_proto(file_node.digest, f"input file {file_node.name!r}")
            tree.files.append(("/".join((*parts, file_node.name)), file_digest,
                               file_node.is_executable))
        for link in directory.symlinks:
            if not link.target:
                raise InvalidArgument(f"input tree: symlink {'/'.join((*parts, link.name))!r} "
                                      "has an empty target")
            if "\0" in link.target:
                raise InvalidArgument(f"input tree: symlink {'/'.join((*parts, link.name))!r} "
                                      "has a target with a NUL byte")
            links[(*parts, link.name)] = link.target
            tree.symlinks.append(("/".join((*parts, link.name)), link.target))
        children: list[tuple[tuple[str, ...], Digest]] = []
        for node in directory.directories:
            child = Digest.from_proto(node.digest, f"input directory {node.name!r}")
            child_parts = (*parts, node.name)
            tree.directories.append("/".join(child_parts))
            if child not in directories:
                missing.append(child)
                continue
            children.append((child_parts, child))
        stack.extend(reversed(children))
    if missing:
        raise missing_error(missing, "input directory")
    if not allow_outside_symlinks:
        for where_parts, target in links.items():
            if _escapes(where_parts[:-1], target, links):
                raise InvalidArgument(
                    f"input tree: symlink {'/'.join(where_parts)!r} -> {target!r} points "
                    "outside the input root")
    return tree


def _escapes(parent: tuple[str, ...], target: str, links: Mapping[tuple[str, ...], str]) -> bool:
    """Does `target`, read in directory `parent`, resolve above the input root?"""
    return _resolve(list(parent), target, links, 0) is None


def _resolve(base: list[str], target: str, links: Mapping[tuple[str, ...], str],
             hops: int) -> list[str] | None:
    """Resolve `target` from the directory `base` (real path), following the tree's
    symlinks; None when it leaves the root.  Names not in the tree count as directories."""
    if target.startswith("/"):
        return None
    if hops > MAX_SYMLINK_HOPS:
        return base  # the kernel would stop with ELOOP: it cannot lead anywhere
    current = list(base)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return None
            current.pop()
            continue
        link = links.get((*current, part))
        if link is None:
            current.append(part)
            continue
        resolved = _resolve(current, link, links, hops + 1)
        if resolved is None:
            return None
        current = resolved
    return current


def _relative(path: str, what: str, *, allow_empty: bool) -> str | None:
    """`path` normalised, after the checks every relative path passes; None for the
    directory itself ("" or ".") where that is allowed."""
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is absolute; it must be relative")
    if path in ("", "."):
        if allow_empty:
            return None
        raise InvalidArgument(f"{what} is empty")
    return posixpath.normpath(path)


def _climbs(normal: str) -> bool:
    return normal == ".." or normal.startswith("../")


def normalise(path: str, what: str, *, allow_empty: bool) -> str:
    """A relative path without '.', '..' or empty segments; InvalidArgument otherwise."""
    normal = _relative(path, what, allow_empty=allow_empty)
    if normal is None:
        return ""
    if _climbs(normal):
        raise InvalidArgument(f"{what} {path!r} leads outside its directory")
    return "" if normal == "." else normal


def output_path(path: str, working: str, what: str, *, allow_empty: bool) -> str:
    """An output path, relative to the working directory `working`, normalised.  It may
    climb out of the working directory (`../../install`, as BuildStream's whole-system
    actions do) as long as it stays inside the input root."""
    normal = _relative(path, what, allow_empty=allow_empty)
    if normal is None:
        return ""
    inside_root = posixpath.normpath(posixpath.join(working, normal))
    if _climbs(inside_root):
        raise InvalidArgument(f"{what} {path!r} leads outside the input root")
    if not allow_empty and inside_root == ".":
        raise InvalidArgument(f"{what} {path!r} names the input root itself")
    return "" if normal == "." else normal


def check_command(command: re_pb2.Command) -> Outputs:
    """The working directory and outputs of `command`, checked and normalised."""
    if not command.arguments:
        raise InvalidArgument("command has no arguments")
    working = normalise(command.working_directory, "working_directory", allow_empty=True)
    for variable in command.environment_variables:
        if not variable.name or "=" in variable.name or "\0" in variable.name:
            raise InvalidArgument(f"environment variable name {variable.name!r} is invalid")
        if "\0" in variable.value:
            raise InvalidArgument(f"environment variable {variable.name} contains a NUL byte")
    for argument in command.arguments:
        if "\0" in argument:
            raise InvalidArgument("a command argument contains a NUL byte")
    paths = [output_path(p, working, "output path", allow_empty=True)
             for p in command.output_paths]
    files = [output_path(p, working, "output file", allow_empty=False)
             for p in command.output_files]
    dirs = [output_path(p, working, "output directory", allow_empty=True)
            for p in command.output_directories]
    return Outputs(working_directory=working, paths=list(dict.fromkeys(paths)),
                   files=list(dict.fromkeys(files)), directories=list(dict.fromkeys(dirs)),
                   directory_format=int(command.output_directory_format))


# -- on disk (blocking: run these in a thread) -------------------------------------------


def _inside(root_real: str, path: str) -> bool:
    return path == root_real or path.startswith(root_real + os.sep)


def safe_makedirs(root: Path, relative: str, base: Path | None = None) -> Path:
    """Create `base/relative` (base defaults to root) as directories, never leaving `root`.

    Returns the resulting path.  An existing symlink on the way is followed only
    when it resolves to a directory inside `root`; an existing non-directory is
    INVALID_ARGUMENT.
    """
    root_real = os.path.realpath(root)
    current = os.path.realpath(base) if base is not None else root_real
    if not _inside(root_real, current):
        raise InvalidArgument(f"{relative!r} is not inside the input root")
    if not relative:
        return Path(current)
    for part in relative.split("/"):
        if part == "..":  # `current` is always a real path: this is its real parent
            current = os.path.dirname(current)
            if not _inside(root_real, current):
                raise InvalidArgument(f"{relative!r} leads outside the input root")
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            resolved = os.path.realpath(candidate)
            if not _inside(root_real, resolved):
                raise InvalidArgument(f"{relative!r}: {part!r} is a symlink leading outside "
                                      "the input root")
            if not os.path.isdir(resolved):
                raise InvalidArgument(f"{relative!r}: {part!r} is a symlink to a non-directory")
            current = resolved
            continue
        try:
            os.mkdir(candidate, 0o755)
        except FileExistsError:
            if not os.path.isdir(candidate):
                raise InvalidArgument(f"{relative!r}: {part!r} exists in the input tree and is "
                                      "not a directory") from None
        current = candidate
    return Path(current)


def materialise(tree: InputTree, root: Path, cache: LocalCache, outputs: Outputs) -> Path:
    """Create the input tree under the empty directory `root`; the working directory.

    Also creates the working directory and the parent directory of every
    declared output (relative to the working directory).
    """
    for directory in tree.directories:
        os.mkdir(root / directory, 0o755)
    for path, digest, executable in tree.files:
        cache.link((digest, executable), root / path)
    for path, target in tree.symlinks:
        os.symlink(target, root / path)
    working = safe_makedirs(root, outputs.working_directory)
    for output in outputs.all():
        parent = posixpath.dirname(output)
        if parent:
            safe_makedirs(root, parent, working)
    return working
