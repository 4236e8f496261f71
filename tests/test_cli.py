"""`buildfleet` as a user runs it: a real `serve` process, talked to over loopback."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from procutil import ServeProcess, run_buildfleet

import buildfleet
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.config import ConfigError, PostgresConfig, ServerConfig, parse_config
from buildfleet.digest import Digest
from buildfleet.postgres.schema import MIGRATIONS

REAPI_SERVICES = {
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "google.bytestream.ByteStream",
    # what REAPI's Capabilities cannot say: the Remote Asset API is served
    "build.bazel.remote.asset.v1.Fetch",
    "build.bazel.remote.asset.v1.Push",
}
RPC_TIMEOUT = 10.0


# -- helpers ---------------------------------------------------------------------

Connect = Callable[[str], grpc.Channel]


@pytest.fixture
def open_channel() -> Iterator[Connect]:
    """Factory: a connected channel to an address; all are closed at the end."""
    channels: list[grpc.Channel] = []

    def connect(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        return channel

    yield connect
    for channel in channels:
        channel.close()


def proto_digest(data: bytes) -> re_pb2.Digest:
    digest = Digest.of(data)
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


def upload(channel: grpc.Channel, data: bytes, instance: str = "") -> re_pb2.Digest:
    digest = proto_digest(data)
    response = re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]),
        timeout=RPC_TIMEOUT)
    assert [r.status.code for r in response.responses] == [0], response
    return digest


def missing(channel: grpc.Channel, digests: list[re_pb2.Digest],
            instance: str = "") -> list[re_pb2.Digest]:
    response = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=digests),
        timeout=RPC_TIMEOUT)
    return list(response.missing_blob_digests)


def read_blob(channel: grpc.Channel, digest: re_pb2.Digest, instance: str = "") -> bytes:
    response = re_grpc.ContentAddressableStorageStub(channel).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(instance_name=instance, digests=[digest]),
        timeout=RPC_TIMEOUT)
    assert len(response.responses) == 1, response
    (entry,) = response.responses
    assert entry.status.code == 0, entry.status
    assert entry.digest == digest
    return bytes(entry.data)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    return int(response.status)


def write_config(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def assert_no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


# -- serving ---------------------------------------------------------------------

def test_serve_answers_health_checks_and_reflection(tmp_path: Path,
                                                   open_channel: Connect) -> None:
    with ServeProcess.start(tmp_path, data_dir=tmp_path / "data") as server:
        channel = open_channel(server.address)
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        for name in sorted(REAPI_SERVICES):
            assert health_status(channel, name) == health_pb2.HealthCheckResponse.SERVING

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=RPC_TIMEOUT))
        assert len(responses) == 1
        listed = {s.name for s in responses[0].list_services_response.service}
        assert REAPI_SERVICES <= listed, listed
        assert "grpc.health.v1.Health" in listed

        # Reflection can describe the CAS, as grpcurl's `describe` needs.
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="build.bazel.remote.execution.v2.ContentAddressableStorage",
        )]), timeout=RPC_TIMEOUT))
        assert responses[0].file_descriptor_response.file_descriptor_proto, responses[0]

        # Data went where it was told to go, nowhere else.
        upload(channel, b"where do I live")
        assert (tmp_path / "data").is_dir()
        assert not (tmp_path / "buildfleet-data").exists()


def test_version_is_printed(tmp_path: Path) -> None:
    result = run_buildfleet("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert buildfleet.__version__ in result.stdout


def test_two_listen_addresses_both_serve(tmp_path: Path, open_channel: Connect) -> None:
    with ServeProcess.start(tmp_path, data_dir=tmp_path / "data",
                            listen=["127.0.0.1:0", "127.0.0.1:0"]) as server:
        first, second = server.addresses
        assert first != second
        digest = upload(open_channel(first), b"sent to the first address")
        assert read_blob(open_channel(second), digest) == b"sent to the first address"
        for address in (first, second):
            assert health_status(open_channel(address)) == health_pb2.HealthCheckResponse.SERVING


def test_listen_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_buildfleet("serve", "--listen", address, "--data-dir", str(tmp_path / "d"),
                                cwd=tmp_path, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert address in output, output
    assert_no_traceback(output)


# -- configuration -----------------------------------------------------------------

@pytest.mark.parametrize(("document", "key"), [
    ({"listen": ["127.0.0.1:0"], "colour": "blue"}, "colour"),
    ({"storage": {"big": {"type": "disk", "path": "cas", "max-size": "lots"}},
      "instances": {"": {"cas": "big"}}}, "max-size"),
], ids=["unknown-key", "bad-value"])
def test_bad_config_stops_start_up_naming_the_key(tmp_path: Path, document: object,
                                                 key: str) -> None:
    config = write_config(tmp_path / "buildfleet.yaml", document)
    result = run_buildfleet("serve", "--config", str(config), "--listen", "127.0.0.1:0",
                            "--data-dir", str(tmp_path / "data"), cwd=tmp_path, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert key in result.stderr, output
    assert_no_traceback(output)
    assert "listening on" not in output


def test_config_with_two_instances_serves_both(tmp_path: Path,
                                               open_channel: Connect) -> None:
    config = write_config(tmp_path / "buildfleet.yaml", {"instances": {"": {}, "linux": {}}})
    with ServeProcess.start(tmp_path, data_dir=tmp_path / "data", config=config) as server:
        channel = open_channel(server.address)
        on_default = upload(channel, b"for the default instance")
        on_linux = upload(channel, b"for linux", instance="linux")
        assert read_blob(channel, on_default) == b"for the default instance"
        assert read_blob(channel, on_linux, instance="linux") == b"for linux"
        # Each instance has its own storage by default.
        assert missing(channel, [on_linux]) == [on_linux]
        assert missing(channel, [on_default], instance="linux") == [on_default]

        with pytest.raises(grpc.RpcError) as raised:
            missing(channel, [on_default], instance="windows")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "windows" in (raised.value.details() or "")


# -- stopping and restarting ---------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_within_the_grace_period(
        tmp_path: Path, open_channel: Connect, signum: int) -> None:
    grace = 2.0
    config = write_config(tmp_path / "buildfleet.yaml", {"grace-period": grace})
    with ServeProcess.start(tmp_path, data_dir=tmp_path / "data", config=config) as server:
        channel = open_channel(server.address)
        upload(channel, b"before the signal")

        # A client in the middle of an upload that never finishes: the server must
        # not wait for it longer than the grace period.
        release = threading.Event()
        resource = f"uploads/{os.urandom(8).hex()}/blobs/{'0' * 64}/1000000"

        def stalled_upload() -> Iterator[bs_pb2.WriteRequest]:
            yield bs_pb2.WriteRequest(resource_name=resource, write_offset=0, data=b"x" * 1000)
            release.wait(60)

        call = bs_grpc.ByteStreamStub(channel).Write.future(stalled_upload(), timeout=60)
        try:
            started = time.monotonic()
            server.send_signal(signum)
            code = server.wait(timeout=grace + 15)
            elapsed = time.monotonic() - started
        finally:
            release.set()
        assert code == 0, server.output()
        assert elapsed < grace + 5, f"took {elapsed:.1f} s to stop\n{server.output()}"
        with pytest.raises(grpc.RpcError):
            call.result(timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_blobs_on_disk_survive_a_restart(tmp_path: Path, open_channel: Connect,
                                         signum: int) -> None:
    data_dir = tmp_path / "data"
    blobs = [os.urandom(100), os.urandom(300 * 1024), b""]
    with ServeProcess.start(tmp_path, data_dir=data_dir) as server:
        channel = open_channel(server.address)
        digests = [upload(channel, blob) for blob in blobs]
        assert missing(channel, digests) == []
        code = server.stop(signum)
        assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL), server.output()

    with ServeProcess.start(tmp_path, data_dir=data_dir) as server:
        channel = open_channel(server.address)
        assert missing(channel, digests) == []
        for blob, digest in zip(blobs, digests, strict=True):
            assert read_blob(channel, digest) == blob
        never_uploaded = proto_digest(b"never uploaded")
        assert missing(channel, [never_uploaded]) == [never_uploaded]


# -- the scheduler database ----------------------------------------------------------

def test_database_setting_takes_a_postgres_url_with_pool_settings() -> None:
    config = parse_config({"database": "postgresql://bf@db.example:5432/grid",
                           "postgres": {"pool-min": 2, "pool-max": 20, "statement-timeout": 3,
                                        "connect-timeout": 2.5, "retry-after": 4}})
    assert config.database == "postgresql://bf@db.example:5432/grid"
    assert config.postgres == PostgresConfig(pool_min=2, pool_max=20, statement_timeout=3,
                                             connect_timeout=2.5, retry_after=4)
    # `serve --database` replaces the file's setting, checked the same way.
    assert ServerConfig().with_overrides(database="postgres://db/x").database == (
        "postgres://db/x")
    with pytest.raises(ValueError, match="postgresql://"):
        ServerConfig().with_overrides(database="mysql://db/x")


@pytest.mark.parametrize(("document", "key"), [
    ({"database": "mysql://db/grid"}, "database"),
    ({"postgres": {"pool-min": 0}}, "pool-min"),
    ({"postgres": {"pool-min": 5, "pool-max": 2}}, "pool-max"),
    ({"postgres": {"statement-timeout": 0}}, "statement-timeout"),
    ({"postgres": {"retry-after": -1}}, "retry-after"),
], ids=["scheme", "pool-min", "pool-max-below-min", "statement-timeout", "retry-after"])
def test_bad_database_settings_name_the_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(document)


def test_serve_with_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres:s3cret@127.0.0.1:{refusing.getsockname()[1]}/test"
        config = write_config(tmp_path / "buildfleet.yaml",
                              {"postgres": {"connect-timeout": 0.5}})
        result = run_buildfleet("serve", "--config", str(config), "--database", url,
                                "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                                cwd=tmp_path, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot connect to the scheduler database" in output, output
    assert "s3cret" not in output
    assert_no_traceback(output)


def test_db_upgrade_migrates_a_postgres_database(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path / "buildfleet.yaml", {"database": pg_url})
    latest = len(MIGRATIONS)
    result = run_buildfleet("db", "upgrade", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"schema version 0 -> {latest}"
    result = run_buildfleet("db", "upgrade", "--database", pg_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"schema version {latest} -> {latest}"


def test_db_upgrade_of_a_sqlite_database_says_it_migrates_itself(tmp_path: Path) -> None:
    result = run_buildfleet("db", "upgrade", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "SQLite" in output and "migrates itself" in output, output
    assert_no_traceback(output)
