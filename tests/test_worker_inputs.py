"""The bot's input checks and layout (buildfleet.worker.inputs), without a server.

Every unsafe input tree is refused with INVALID_ARGUMENT before anything is
written; missing directories are FAILED_PRECONDITION naming the digest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import FailedPrecondition, InvalidArgument
from buildfleet.worker.cache import LocalCache
from buildfleet.worker.inputs import (
    check_command,
    flatten_tree,
    materialise,
    safe_makedirs,
)

FILE = Digest.of(b"content")


def pd(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


class TreeBuilder:
    """Directory messages by digest, built bottom-up."""

    def __init__(self) -> None:
        self.directories: dict[Digest, re_pb2.Directory] = {}

    def add(self, *, files: tuple[str, ...] = (), dirs: dict[str, Digest] | None = None,
            links: dict[str, str] | None = None, executable: tuple[str, ...] = ()) -> Digest:
        directory = re_pb2.Directory()
        for name in files:
            directory.files.add(name=name, digest=pd(FILE), is_executable=name in executable)
        for name, digest in (dirs or {}).items():
            directory.directories.add(name=name, digest=pd(digest))
        for name, target in (links or {}).items():
            directory.symlinks.add(name=name, target=target)
        digest = Digest.of(directory.SerializeToString())
        self.directories[digest] = directory
        return digest


def flatten(builder: TreeBuilder, root: Digest, **options: bool) -> object:
    return flatten_tree(root, builder.directories, **options)


# -- names -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "/", "nul\0byte"])
@pytest.mark.parametrize("kind", ["file", "dir", "link"])
def test_bad_names_are_refused(name: str, kind: str) -> None:
    tree = TreeBuilder()
    if kind == "file":
        inner = tree.add(files=(name,))
    elif kind == "dir":
        inner = tree.add(dirs={name: tree.add()})
    else:
        inner = tree.add(links={name: "target"})
    root = tree.add(dirs={"sub": inner})
    with pytest.raises(InvalidArgument) as raised:
        flatten(tree, root)
    assert "sub" in raised.value.message


@pytest.mark.parametrize("layout", [
    {"files": ("x", "x")},
    {"files": ("x",), "dirs": "x"},
    {"files": ("x",), "links": "x"},
    {"dirs": "x", "links": "x"},
])
def test_duplicate_names_are_refused(layout: dict[str, object]) -> None:
    tree = TreeBuilder()
    empty = tree.add()
    directory = re_pb2.Directory()
    for name in layout.get("files", ()):  # type: ignore[attr-defined]
        directory.files.add(name=name, digest=pd(FILE))
    if "dirs" in layout:
        directory.directories.add(name=str(layout["dirs"]), digest=pd(empty))
    if "links" in layout:
        directory.symlinks.add(name=str(layout["links"]), target="y")
    root = Digest.of(directory.SerializeToString())
    tree.directories[root] = directory
    with pytest.raises(InvalidArgument, match="two entries named 'x'"):
        flatten(tree, root)


# -- symlinks ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/etc/passwd", "..", "../x", "a/../../x", "./../x",
                                    "sub/../../.."])
def test_symlinks_out_of_the_root_are_refused(target: str) -> None:
    tree = TreeBuilder()
    root = tree.add(links={"l": target}, dirs={"sub": tree.add()})
    with pytest.raises(InvalidArgument, match="outside the input root"):
        flatten(tree, root)


def test_symlink_deep_in_the_tree_may_climb_but_not_out() -> None:
    tree = TreeBuilder()
    deep = tree.add(links={"ok": "../../top", "bad": "../../../top"})
    root = tree.add(dirs={"a": tree.add(dirs={"b": deep})})
    with pytest.raises(InvalidArgument, match="a/b/bad"):
        flatten(tree, root)
    fine = TreeBuilder()
    deep = fine.add(links={"ok": "../../top", "same": "./x/../y"})
    root = fine.add(dirs={"a": fine.add(dirs={"b": deep})}, files=("top",))
    flattened = flatten_tree(root, fine.directories)
    assert ("a/b/ok", "../../top") in flattened.symlinks


def test_symlink_chain_escaping_through_another_symlink_is_refused() -> None:
    # a/up -> ..  (the root: fine on its own);  esc -> a/up/..  is the root's parent.
    tree = TreeBuilder()
    a = tree.add(links={"up": ".."})
    root = tree.add(dirs={"a": a}, links={"esc": "a/up/.."})
    with pytest.raises(InvalidArgument, match="'esc'"):
        flatten(tree, root)
    # Without the chain, the same names are harmless.
    tree = TreeBuilder()
    a = tree.add(links={"up": ".."})
    root = tree.add(dirs={"a": a}, links={"fine": "a/up/a"})
    flatten(tree, root)


def test_symlink_loops_are_not_an_escape() -> None:
    tree = TreeBuilder()
    root = tree.add(links={"x": "y", "y": "x"})
    assert len(flatten_tree(root, tree.directories).symlinks) == 2


def test_outside_symlinks_may_be_allowed() -> None:
    tree = TreeBuilder()
    root = tree.add(links={"abs": "/usr/bin/env", "up": "../x"})
    flattened = flatten_tree(root, tree.directories, allow_outside_symlinks=True)
    assert sorted(flattened.symlinks) == [("abs", "/usr/bin/env"), ("up", "../x")]


@pytest.mark.parametrize("target", ["", "a\0b"])
def test_empty_or_nul_symlink_targets_are_refused(target: str) -> None:
    tree = TreeBuilder()
    root = tree.add(links={"l": target})
    with pytest.raises(InvalidArgument, match="symlink 'l'"):
        flatten(tree, root)


# -- missing pieces ---------------------------------------------------------------------

def test_missing_directories_are_failed_precondition_with_details() -> None:
    tree = TreeBuilder()
    absent = Digest.of(b"not a directory we have")
    root = tree.add(dirs={"gone": absent})
    with pytest.raises(FailedPrecondition) as raised:
        flatten(tree, root)
    assert absent.hash in raised.value.message
    (details,) = raised.value.details
    assert details.violations[0].type == "MISSING"  # type: ignore[attr-defined]
    assert details.violations[0].subject == f"blobs/{absent.hash}/{absent.size_bytes}"  # type: ignore[attr-defined]
    with pytest.raises(FailedPrecondition):
        flatten_tree(absent, {})


def test_flatten_lists_everything_parents_first() -> None:
    tree = TreeBuilder()
    c = tree.add(files=("tool",), executable=("tool",))
    b = tree.add(dirs={"c": c}, files=("data",))
    root = tree.add(dirs={"a": tree.add(dirs={"b": b}), "z": c}, links={"l": "a/b/data"})
    flattened = flatten_tree(root, tree.directories)
    assert flattened.directories.index("a") < flattened.directories.index("a/b") \
        < flattened.directories.index("a/b/c")
    assert sorted(flattened.files) == [("a/b/c/tool", FILE, True), ("a/b/data", FILE, False),
                                       ("z/tool", FILE, True)]
    assert flattened.file_keys() == {(FILE, True), (FILE, False)}


# -- commands ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("output_paths", "../escape"), ("output_paths", "/abs"),
    ("output_files", "a/../../escape"), ("output_files", ""),
    ("output_directories", ".."), ("output_directories", "/tmp/x"),
])
def test_outputs_escaping_the_working_directory_are_refused(field: str, value: str) -> None:
    command = re_pb2.Command(arguments=["true"])
    getattr(command, field).append(value)
    with pytest.raises(InvalidArgument):
        check_command(command)


@pytest.mark.parametrize("working", ["..", "/abs", "a/../../b"])
def test_working_directory_must_stay_inside(working: str) -> None:
    with pytest.raises(InvalidArgument, match="working_directory"):
        check_command(re_pb2.Command(arguments=["true"], working_directory=working))


def test_command_outputs_are_normalised() -> None:
    outputs = check_command(re_pb2.Command(
        arguments=["true"], working_directory="w/./x/", output_files=["a/./b", "a/b"],
        output_directories=["", "d/../e"]))
    assert outputs.working_directory == "w/x"
    assert outputs.files == ["a/b"]
    assert outputs.directories == ["", "e"]
    assert not outputs.uses_paths
    with pytest.raises(InvalidArgument, match="no arguments"):
        check_command(re_pb2.Command())


# -- on disk ----------------------------------------------------------------------------

def test_safe_makedirs_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside").mkdir()
    os.symlink(outside, root / "out")
    os.symlink("inside", root / "in")
    (root / "file").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="outside"):
        safe_makedirs(root, "out/x")
    assert list(outside.iterdir()) == []
    assert safe_makedirs(root, "in/x/y") == root / "inside" / "x" / "y"
    with pytest.raises(InvalidArgument, match="not a directory"):
        safe_makedirs(root, "file/x")


def test_materialise_lays_out_tree_and_output_parents(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache", 1 << 20)
    cache.open()
    for executable in (False, True):
        target = cache.path((FILE, executable))
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"content")
        target.chmod(0o555 if executable else 0o444)
        cache._add((FILE, executable), target)
    tree = TreeBuilder()
    c = tree.add(files=("tool",), executable=("tool",))
    root_digest = tree.add(dirs={"a": tree.add(dirs={"c": c})}, files=("f",),
                           links={"l": "a/c/tool"})
    flattened = flatten_tree(root_digest, tree.directories)
    outputs = check_command(re_pb2.Command(arguments=["x"], working_directory="wd",
                                           output_files=["o/p/file"], output_paths=["q/r"]))
    root = tmp_path / "root"
    root.mkdir()
    working = materialise(flattened, root, cache, outputs)
    assert working == root / "wd"
    assert (root / "wd" / "o" / "p").is_dir() and (root / "wd" / "q").is_dir()
    assert not (root / "wd" / "q" / "r").exists()
    assert os.access(root / "a" / "c" / "tool", os.X_OK)
    assert (root / "f").stat().st_mode & 0o777 == 0o444
    assert os.readlink(root / "l") == "a/c/tool"
    assert (root / "f").stat().st_ino == cache.path((FILE, False)).stat().st_ino


def test_outputs_may_climb_out_of_the_working_directory_but_not_the_input_root() -> None:
    """BuildStream's whole-system actions name their install root from a deep working
    directory: allowed while the path stays inside the input root."""
    outputs = check_command(re_pb2.Command(
        arguments=["true"], working_directory="a/b/c",
        output_paths=["../../../buildstream-install", "../x/./y"]))
    assert outputs.paths == ["../../../buildstream-install", "../x/y"]
    for escaping in ("../../../../x", "../../../.."):
        with pytest.raises(InvalidArgument, match="outside the input root"):
            check_command(re_pb2.Command(arguments=["true"], working_directory="a/b/c",
                                         output_paths=[escaping]))
    with pytest.raises(InvalidArgument, match="input root itself"):
        check_command(re_pb2.Command(arguments=["true"], working_directory="a",
                                     output_files=[".."]))


def test_climbing_outputs_follow_real_directories_not_the_spelling(tmp_path: Path) -> None:
    """An output's `..` climbs from where the command really runs: through a symlinked
    working directory that is one level deep, `../..` would leave the input root."""
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "a" / "link").symlink_to("../real")
    fine = safe_makedirs(root, "../made", root / "a" / "link")
    assert fine == root / "made" and fine.is_dir()
    with pytest.raises(InvalidArgument, match="outside the input root"):
        safe_makedirs(root, "../../escaped", root / "real")
    assert not (tmp_path / "escaped").exists()
