"""A second, independent client: BuildGrid's `bgd execute command` on a `buildfleet up` grid.

bgd uploads an input tree (a script in a subdirectory, executable, and a data file),
asks for two output files (one executable, in a subdirectory), executes, and
downloads the outputs.  With ``-c`` the result is cached and a second run is served
from the action cache; without it the action runs again.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import text_format
from interop.test_bgd import ensure_bgd_venv, run_bgd
from upprocess import UpProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

from .conftest import NAMED_INSTANCE

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

WORDS = b"banana\napple\ncherry\n"
PROCESS = b"""\
#!/bin/sh
set -eu
mkdir -p out
sort "$1" > out/sorted.txt
printf '#!/bin/sh\\necho "%s words"\\n' "$(wc -l < "$1" | tr -d ' ')" > out/run-me.sh
chmod +x out/run-me.sh
echo "processed $(wc -l < "$1" | tr -d ' ') words"
"""
SORTED = b"apple\nbanana\ncherry\n"
RUN_ME = b'#!/bin/sh\necho "3 words"\n'
STDOUT = b"processed 3 words\n"


@pytest.fixture(scope="session")
def bgd_venv() -> Path:
    return ensure_bgd_venv()


def make_input_root(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "data" / "words.txt").write_bytes(WORDS)
    (root / "bin" / "process.sh").write_bytes(PROCESS)
    (root / "bin" / "process.sh").chmod(0o755)


def final_response(output: str) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of the last Operation that `bgd execute command` printed."""
    starts = [match.start() for match in re.finditer(r'^name: "', output, re.MULTILINE)]
    assert starts, output
    start = starts[-1]
    end = output.index("Response status code:", start)
    operation = text_format.Parse(output[start:end], operations_pb2.Operation())
    assert operation.done, operation
    response = re_pb2.ExecuteResponse()
    assert operation.response.Unpack(response), operation
    return response


def read_blob(address: str, instance: str, digest: re_pb2.Digest, *, ca: Path | None = None,
              token: str | None = None) -> bytes:
    if ca is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(ca.read_bytes())
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token))
        channel = grpc.secure_channel(address, credentials)
    with channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        response = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            instance_name=instance, digests=[digest]), timeout=30)
    assert response.responses[0].status.code == 0, response
    return response.responses[0].data


@pytest.mark.parametrize("instance", ["", NAMED_INSTANCE],
                         ids=["default-instance", "named-instance"])
def test_bgd_executes_a_command_with_inputs_and_outputs(
        tmp_path: Path, bgd_venv: Path, grid: UpProcess, instance: str) -> None:
    source = tmp_path / "input-root"
    make_input_root(source)
    # A salt in the data keeps runs (and instances) from sharing a cached result.
    (source / "data" / "salt").write_bytes(os.urandom(16))

    def execute(download: Path, *options: str) -> re_pb2.ExecuteResponse:
        return run_command(bgd_venv, grid, source, download, instance,
                           ["--remote", f"http://{grid.endpoint}"], *options)

    first = execute(tmp_path / "first", "--enable-action-cache")
    assert not first.cached_result
    check(grid, instance, first, tmp_path / "first")

    cached = execute(tmp_path / "cached", "--enable-action-cache")
    assert cached.cached_result, cached
    assert cached.result == first.result
    check(grid, instance, cached, tmp_path / "cached")

    # Without -c bgd asks for a fresh execution (skip_cache_lookup, do_not_cache).
    fresh = execute(tmp_path / "fresh")
    assert not fresh.cached_result
    check(grid, instance, fresh, tmp_path / "fresh")


def test_bgd_executes_over_tls_with_an_auth_token(
        tmp_path: Path, bgd_venv: Path, secure_grid: UpProcess) -> None:
    """`--server-cert` (the grid's CA) and `--auth-token` (a file holding the client
    token that `up --secure` made) on a `buildfleet up --secure` grid."""
    source = tmp_path / "input-root"
    make_input_root(source)
    (source / "data" / "salt").write_bytes(os.urandom(16))
    secure = secure_grid.data_dir / "secure"
    connection = ["--remote", f"https://{secure_grid.endpoint}",
                  "--server-cert", str(secure / "ca.pem"),
                  "--auth-token", str(secure / "client.token")]
    response = run_command(bgd_venv, secure_grid, source, tmp_path / "out", "", connection,
                           "--enable-action-cache")
    assert not response.cached_result
    check(secure_grid, "", response, tmp_path / "out", ca=secure / "ca.pem",
          token=(secure / "client.token").read_text().strip())

    # Without the token the grid refuses bgd.
    refused = run_bgd(bgd_venv, "execute", *connection[:4], "command", "-p", "OSFamily",
                      "linux", str(source), "./bin/process.sh", "data/words.txt")
    assert "UNAUTHENTICATED" in refused.stderr + refused.stdout, (refused.stdout,
                                                                  refused.stderr)


def run_command(bgd_venv: Path, grid: UpProcess, source: Path, download: Path,
                instance: str, connection: list[str], *options: str) -> re_pb2.ExecuteResponse:
    args = ["execute", *connection]
    if instance:
        args += ["--instance-name", instance]
    args += ["command", "--output-file", "out/sorted.txt", "--output-file", "out/run-me.sh",
             "--output-directory", str(download), "-p", "OSFamily", "linux", *options,
             str(source), "./bin/process.sh", "data/words.txt"]
    result = run_bgd(bgd_venv, *args)
    report = (f"bgd exited {result.returncode}\nstdout:\n{result.stdout}\n"
              f"stderr:\n{result.stderr}\ngrid:\n{grid.report()}")
    assert result.returncode == 0, report
    assert "Error" not in result.stderr, report
    response = final_response(result.stdout)
    assert response.status.code == 0, (response, report)
    assert response.result.exit_code == 0, (response, report)
    return response


def check(grid: UpProcess, instance: str, response: re_pb2.ExecuteResponse, download: Path,
          *, ca: Path | None = None, token: str | None = None) -> None:
    result = response.result
    stdout = (read_blob(grid.endpoint, instance, result.stdout_digest, ca=ca, token=token)
              if result.HasField("stdout_digest") else result.stdout_raw)
    assert stdout == STDOUT
    assert "-bot" in result.execution_metadata.worker
    assert {f.path: f.is_executable for f in result.output_files} == {
        "out/sorted.txt": False, "out/run-me.sh": True}
    assert (download / "out" / "sorted.txt").read_bytes() == SORTED
    run_me = download / "out" / "run-me.sh"
    assert run_me.read_bytes() == RUN_ME
    assert os.access(run_me, os.X_OK)
    ran = subprocess.run([str(run_me)], capture_output=True, timeout=30)
    assert ran.stdout == b"3 words\n", ran
