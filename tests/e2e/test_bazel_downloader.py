"""Bazel fetches an `http_archive` through buildfleet's Remote Asset API
(`--experimental_remote_downloader`), so that the origin is asked once for the whole
fleet: the first build makes the grid download the archive from a local HTTP server;
after `bazel clean --expunge`, with an empty repository cache, the second build gets
it from the grid and the HTTP server sees no request at all.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from upprocess import UpProcess

from .conftest import Bazel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ARCHIVE_PATH = "/releases/greeting-1.0.tar.gz"
GREETING = b"hello from an archive fetched through the grid\n"


def archive() -> bytes:
    """A tar.gz with one package: a BUILD file exporting a text file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("greeting-1.0/BUILD",
                            b'exports_files(["greeting.txt"])\n'),
                           ("greeting-1.0/greeting.txt", GREETING)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Origin:
    """An HTTP server that serves the archive and counts requests for it."""

    def __init__(self, body: bytes) -> None:
        self.requests: list[str] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                origin.requests.append(self.path)
                if self.path != ARCHIVE_PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{ARCHIVE_PATH}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    served = Origin(archive())
    yield served
    served.close()


def test_an_http_archive_comes_through_the_remote_downloader_once(
        bazel: Bazel, grid: UpProcess, origin: Origin, tmp_path: Path) -> None:
    body = archive()
    root = bazel.workspace.root
    workspace = (root / "WORKSPACE").read_text()
    (root / "WORKSPACE").write_text(
        workspace
        + 'load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")\n\n'
        + 'http_archive(\n    name = "greeting",\n'
        + f'    urls = ["{origin.url}"],\n'
        + f'    sha256 = "{hashlib.sha256(body).hexdigest()}",\n'
        + '    strip_prefix = "greeting-1.0",\n)\n')
    (root / "downloaded").mkdir(exist_ok=True)
    (root / "downloaded" / "BUILD").write_text(
        'genrule(\n    name = "shout",\n    srcs = ["@greeting//:greeting.txt"],\n'
        '    outs = ["shout.txt"],\n    cmd = "tr a-z A-Z < $< > $@",\n)\n')
    bazel.workspace.user_rc.write_text("")
    flags = [*grid.bazel_flags(""), "--spawn_strategy=remote",
             f"--experimental_remote_downloader=grpc://{grid.endpoint}"]

    first = bazel("build", "//downloaded:shout", *flags,
                  f"--repository_cache={tmp_path / 'repository-cache-1'}")
    assert first.returncode == 0, first.describe()
    assert bazel.bin_path("downloaded/shout.txt").read_bytes() == GREETING.upper()
    # the grid downloaded it; Bazel itself did not
    assert origin.requests == [ARCHIVE_PATH], origin.requests

    expunged = bazel("clean", "--expunge")
    assert expunged.returncode == 0, expunged.describe()
    second = bazel("build", "//downloaded:shout", *flags,
                   f"--repository_cache={tmp_path / 'repository-cache-2'}")
    assert second.returncode == 0, second.describe()
    assert bazel.bin_path("downloaded/shout.txt").read_bytes() == GREETING.upper()
    assert origin.requests == [ARCHIVE_PATH], "the second build reached the HTTP server"
