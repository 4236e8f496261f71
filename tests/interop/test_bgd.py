"""Interoperability with a client nobody here wrote: BuildGrid's `bgd cas`.

`bgd` (from the `buildgrid` package on PyPI) needs Python >= 3.12, newer than the
project's own interpreter, so the test builds it a virtual environment of its own
(tests/venvkit.py), and runs it as ``VENV/bin/python -c 'from buildgrid.server.app
import cli; cli()'``.

The test uploads a directory tree with ``bgd cas upload-dir`` to a real
``buildfleet serve`` process and downloads it again with ``bgd cas download-dir``:
files big enough for ByteStream, empty files, executables, nested and empty
directories and symlinks must all come back as they were.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from procutil import ServeProcess
from venvkit import PinnedClient, ensure_venv, venv_python

from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
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

BGD = PinnedClient("buildgrid", BUILDGRID_VERSION, "buildgrid.server.app", MIN_PYTHON,
                   name="bgd")


def ensure_bgd_venv() -> Path:
    """A virtual environment with buildgrid==BUILDGRID_VERSION; built once, then reused."""
    return ensure_venv(BGD)


@pytest.fixture(scope="session")
def bgd_venv() -> Path:
    return ensure_bgd_venv()


def run_bgd(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDGRID_")}
    return subprocess.run([str(venv_python(venv)), "-c", _BGD_MAIN, *args],
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


@pytest.mark.timeout(900)  # the first run builds the bgd venv
def test_bgd_creates_and_reads_a_log_stream_live(tmp_path: Path, bgd_venv: Path) -> None:
    with ServeProcess.start(tmp_path / "server", data_dir=tmp_path / "data") as server:
        remote = ["logstream", "--remote", f"http://{server.address}"]
        created = run_bgd(bgd_venv, *remote, "create", "")
        assert created.returncode == 0, created.stdout + created.stderr
        names = dict(re.findall(r'^(name|write_resource_name): "([^"]+)"$', created.stdout,
                                re.MULTILINE))
        assert names["name"].startswith("logstreams/"), created.stdout
        assert names["write_resource_name"].startswith(names["name"] + "/")

        with grpc.insecure_channel(server.address) as channel:
            bytestream = bs_grpc.ByteStreamStub(channel)

            def write(offset: int, data: bytes, finish: bool) -> None:
                bytestream.Write(iter([bs_pb2.WriteRequest(
                    resource_name=names["write_resource_name"], write_offset=offset,
                    data=data, finish_write=finish)]), timeout=30)

            write(0, b"first line\n", False)
            reader = subprocess.Popen(
                [str(venv_python(bgd_venv)), "-c", _BGD_MAIN, *remote, "read", names["name"]],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                assert reader.stdout is not None
                assert reader.stdout.readline() == b"first line\n"  # unfinished: it waits
                assert reader.poll() is None
                write(11, b"second line\n", True)
                out, err = reader.communicate(timeout=BGD_TIMEOUT)
            finally:
                reader.kill()
        assert reader.returncode == 0, err
        assert out == b"second line\n"
