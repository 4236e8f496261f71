"""An action's outputs: found on disk after the command, described in an ActionResult.

The fields filled follow the style of the Command:

- `output_paths` (REAPI v2.1+): each path is reported by what it turned out to
  be: a regular file in `output_files`, a directory in `output_directories`, a
  symlink (not followed) in `output_symlinks`;
- legacy `output_files` / `output_directories` (Bazel 4, Pants 2.17): a declared
  file that is a symlink goes to `output_file_symlinks`, a declared directory
  that is a symlink to `output_directory_symlinks`; a declared file that is a
  directory (or the reverse) is left out, as is anything missing.

Directories become Tree messages (children deduplicated, parents first, so
`is_topologically_sorted` is set) and, when the Command asks for it with
`output_directory_format`, a root Directory digest as well.  An output whose
parent directory resolves outside the input root (the command replaced it by a
symlink) is left out: nothing outside the action's directory is read.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.client.cas import build_tree, digest_of_file, proto_digest
from buildfleet.digest import Digest
from buildfleet.worker.inputs import Outputs

log = logging.getLogger(__name__)

TREE_ONLY, DIRECTORY_ONLY, TREE_AND_DIRECTORY = 0, 1, 2


@dataclass
class Collected:
    """Output fields of an ActionResult and the blobs they reference."""

    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    blobs: dict[Digest, bytes | Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # declared outputs left out, and why


def _locate(root: Path, working: Path, relative: str) -> Path | None:
    """The real location of `working/relative` with its parent inside `root`, or None."""
    full = working / relative if relative else working
    parent = os.path.realpath(full.parent if relative else full)
    root_real = os.path.realpath(root)
    if parent != root_real and not parent.startswith(root_real + os.sep):
        return None
    return Path(parent) / full.name if relative else Path(parent)


def collect_outputs(root: Path, working: Path, outputs: Outputs) -> Collected:
    """Describe the declared outputs found under `working` (blocking)."""
    collected = Collected()
    result = collected.result
    if outputs.uses_paths:
        for path in outputs.paths:
            _collect(collected, root, working, path, "any", result.output_symlinks,
                     outputs.directory_format)
    else:
        for path in outputs.files:
            _collect(collected, root, working, path, "file", result.output_file_symlinks,
                     outputs.directory_format)
        for path in outputs.directories:
            _collect(collected, root, working, path, "directory",
                     result.output_directory_symlinks, outputs.directory_format)
    return collected


def _collect(collected: Collected, root: Path, working: Path, path: str, kind: str,
             links: RepeatedCompositeFieldContainer[re_pb2.OutputSymlink],
             directory_format: int) -> None:
    result = collected.result
    location = _locate(root, working, path)
    if location is None:
        collected.skipped.append(f"{path!r}: its parent leads outside the input root")
        return
    try:
        info = location.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return  # not produced: simply absent from the result
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        links.add(path=path, target=os.readlink(location))
    elif stat.S_ISREG(mode):
        if kind == "directory":
            collected.skipped.append(f"{path!r}: declared a directory, is a file")
            return
        digest = digest_of_file(location)
        collected.blobs.setdefault(digest, location)
        result.output_files.add(path=path, digest=proto_digest(digest),
                                is_executable=bool(mode & stat.S_IXUSR))
    elif stat.S_ISDIR(mode):
        if kind == "file":
            collected.skipped.append(f"{path!r}: declared a file, is a directory")
            return
        tree = build_tree(location)
        entry = result.output_directories.add(path=path)
        if directory_format in (TREE_ONLY, TREE_AND_DIRECTORY):
            data = tree.tree().SerializeToString(deterministic=True)
            tree_digest = Digest.of(data)
            collected.blobs[tree_digest] = data
            entry.tree_digest.CopyFrom(proto_digest(tree_digest))
            entry.is_topologically_sorted = True
        if directory_format in (DIRECTORY_ONLY, TREE_AND_DIRECTORY):
            collected.blobs.update(tree.directories)
            entry.root_directory_digest.CopyFrom(proto_digest(tree.root_digest))
        for digest, file_path in tree.files.items():
            collected.blobs.setdefault(digest, file_path)
    else:
        collected.skipped.append(f"{path!r}: not a regular file, directory or symlink")


def sort_result(result: re_pb2.ActionResult) -> None:
    """Order every output list by path (stable, readable results)."""
    result.output_files.sort(key=lambda entry: entry.path)
    result.output_directories.sort(key=lambda entry: entry.path)
    for links in (result.output_symlinks, result.output_file_symlinks,
                  result.output_directory_symlinks):
        links.sort(key=lambda entry: entry.path)
