"""Interoperability with a client nobody here wrote: BuildGrid's `bgd cas`.

`bgd` (from the `buildgrid` package on PyPI) needs Python >= 3.12, newer than the
project's own interpreter, so the test builds it a virtual environment of its own
in a cache outside the repository (``~/.cache/buildfleet-tests/bgd-venv-VERSION``,
or under $XDG_CACHE_HOME), reused while it works.  The environment is built in a
temporary directory next to that path and renamed into place, so parallel runs do
not see a half-built one; because a renamed venv's console scripts keep their old
``#!`` line, `bgd` is run as ``VENV/bin/python -c 'from buildgrid.server.app import
cli; cli()'``.

The test uploads a directory tree with ``bgd cas upload-dir`` to a real
``buildfleet serve`` process and downloads it again with ``bgd cas download-dir``:
files big enough for ByteStream, empty files, executables, nested and empty
directories and symlinks must all come back as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
import yaml
from procutil import ServeProcess, find_python

from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet.digest import Digest

pytestmark = pytest.mark.interop

BUILDGRID_VERSION = "0.9.1"
MIN_PYTHON = (3, 12)
BGD_TIMEOUT = 180.0
MiB = 1024 * 1024

_BGD_MAIN = ("import sys; from buildgrid.server.app import cli; "
             "sys.argv[0] = 'bgd'; sys.exit(cli())")
_PUSHED = re.compile(r"^Success: Pushed path=\[(?P<path>.*)\] with digest=\[(?P<digest>[^\]]+)\]$",
                     re.MULTILINE)


# -- the bgd environment -------------------------------------------------------------

def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "buildfleet-tests"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_works(venv: Path) -> bool:
    """Whether `venv` has buildgrid at the wanted version and its CLI imports."""
    python = _venv_python(venv)
    if not python.exists():
        return False
    check = ("import importlib.metadata as m, buildgrid.server.app; "
             "print(m.version('buildgrid'))")
    try:
        result = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == BUILDGRID_VERSION


def _run_setup(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}): {' '.join(command)}\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


def ensure_bgd_venv() -> Path:
    """A virtual environment with buildgrid==BUILDGRID_VERSION; built once, then reused."""
    final = _cache_root() / f"bgd-venv-{BUILDGRID_VERSION}"
    if _venv_works(final):
        return final
    python = find_python(*MIN_PYTHON)
    if python is None:
        pytest.skip(f"bgd (buildgrid {BUILDGRID_VERSION}) needs Python >= "
                    f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}; none found on PATH or under pyenv")
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
    building.chmod(0o755)
    try:
        _run_setup([python, "-m", "venv", str(building)], "creating the bgd venv")
        _run_setup([str(_venv_python(building)), "-m", "pip", "install",
                    "--disable-pip-version-check", "--quiet", f"buildgrid=={BUILDGRID_VERSION}"],
                   f"pip install buildgrid=={BUILDGRID_VERSION}")
        if not _venv_works(building):
            pytest.fail(f"buildgrid {BUILDGRID_VERSION} installed in {building} does not import")
        if final.exists() and not _venv_works(final):
            shutil.rmtree(final, ignore_errors=True)  # a broken leftover
        try:
            building.rename(final)
        except OSError:
            if not _venv_works(final):  # not another run winning the race: a real error
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not _venv_works(final):
        pytest.fail(f"the bgd venv at {final} does not work after creation")
    return final


@pytest.fixture(scope="session")
def bgd_venv() -> Path:
    return ensure_bgd_venv()


def run_bgd(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDGRID_")}
    return subprocess.run([str(_venv_python(venv)), "-c", _BGD_MAIN, *args],
                          capture_output=True, text=True, timeout=BGD_TIMEOUT,
                          stdin=subprocess.DEVNULL, env=env)


def cas_args(address: str, instance: str) -> list[str]:
    """`bgd cas` group options for a server at `address` and an instance."""
    args = ["cas", "--remote", f"http://{address}"]
    if instance:
        args += ["--instance-name", instance]
    return args


# -- trees -------------------------------------------------------------------------

Entry = tuple[str, bytes | str | None, bool]


def make_tree(root: Path, seed: bytes) -> dict[str, bytes]:
    """A tree with the cases that matter; returns the file contents by relative path."""
    files = {
        "README.txt": b"top-level file " + seed,
        "empty.txt": b"",
        "run.sh": b"#!/bin/sh\necho " + seed.hex().encode() + b"\n",
        "big.bin": os.urandom(5 * MiB + 12345),  # over the batch limit: ByteStream
        "medium.bin": os.urandom(1536 * 1024),  # above bgd's batching threshold
        "a/b/c/deep.txt": b"three levels down " + seed,
        "a/b/same-as-readme.txt": b"top-level file " + seed,  # a duplicate blob
        "a/b/c/d/e/f/deepest.txt": b"six levels down",
        "a/tool": b"#!/bin/sh\nexit 0\n",
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    (root / "run.sh").chmod(0o755)
    (root / "a" / "tool").chmod(0o755)
    (root / "empty-dir").mkdir()
    (root / "a" / "b" / "also-empty").mkdir()
    (root / "a" / "link-to-deep").symlink_to("b/c/deep.txt")
    (root / "dangling").symlink_to("does/not/exist")
    return files


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry under `root`: (kind, content or link target, executable)."""
    entries: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                entries[relative] = ("symlink", os.readlink(path), False)
            elif stat.S_ISDIR(mode):
                entries[relative] = ("dir", None, False)
            else:
                entries[relative] = ("file", path.read_bytes(), bool(mode & 0o111))
    return entries


def describe(entries: dict[str, Entry]) -> dict[str, tuple[str, str, bool]]:
    """`entries` with contents shortened to digests, for readable assertion output."""
    return {path: (kind, Digest.of(value).hash[:12] if isinstance(value, bytes) else str(value),
                   executable)
            for path, (kind, value, executable) in entries.items()}


# -- the test ----------------------------------------------------------------------

@pytest.mark.timeout(900)  # the first run builds the bgd venv
@pytest.mark.parametrize("instance", ["", "ci/linux"], ids=["default-instance", "named-instance"])
def test_bgd_round_trips_a_directory_tree(tmp_path: Path, bgd_venv: Path, instance: str) -> None:
    config = tmp_path / "buildfleet.yaml"
    config.write_text(yaml.safe_dump({"instances": {"": {}, "ci/linux": {}}}))
    source = tmp_path / "source"
    source.mkdir()
    files = make_tree(source, seed=os.urandom(8))
    before = snapshot(source)

    with ServeProcess.start(tmp_path / "server", data_dir=tmp_path / "data",
                            config=config) as server:
        uploaded = run_bgd(bgd_venv, *cas_args(server.address, instance),
                           "upload-dir", "--verify", str(source))
        report = (f"bgd upload-dir exited {uploaded.returncode}\nstdout:\n{uploaded.stdout}\n"
                  f"stderr:\n{uploaded.stderr}\nserver log:\n{server.output()}")
        assert uploaded.returncode == 0, report
        assert "Error" not in uploaded.stderr, report
        pushed = {m["path"]: m["digest"] for m in _PUSHED.finditer(uploaded.stdout)}
        assert str(source) in pushed, report
        root_digest = pushed[str(source)]

        # bgd really stored the blobs, in the instance it was told to use.
        with grpc.insecure_channel(server.address) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            wanted = [re_pb2.Digest(hash=d.hash, size_bytes=d.size_bytes)
                      for d in (Digest.of(data) for data in files.values())]
            response = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                instance_name=instance, blob_digests=wanted), timeout=30)
            assert list(response.missing_blob_digests) == []
            other = "" if instance else "ci/linux"
            big = Digest.of(files["big.bin"])
            response = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                instance_name=other,
                blob_digests=[re_pb2.Digest(hash=big.hash, size_bytes=big.size_bytes)]),
                timeout=30)
            assert len(response.missing_blob_digests) == 1

        target = tmp_path / "downloaded"
        downloaded = run_bgd(bgd_venv, *cas_args(server.address, instance),
                             "download-dir", "--verify", root_digest, str(target))
        report = (f"bgd download-dir exited {downloaded.returncode}\n"
                  f"stdout:\n{downloaded.stdout}\nstderr:\n{downloaded.stderr}\n"
                  f"server log:\n{server.output()}")
        assert downloaded.returncode == 0, report
        assert "Error" not in downloaded.stderr, report
        assert "Success: Pulled" in downloaded.stdout, report

    after = snapshot(target)
    assert describe(after) == describe(before)
    assert after == before
