"""Capabilities service: what clients and workers are told at start-up."""

from __future__ import annotations

import grpc
import pytest
from conftest import RunningServer, StartServer

from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)

SHA256 = re_pb2.DigestFunction.SHA256
ZSTD = re_pb2.Compressor.ZSTD
MiB = 1024 * 1024


async def capabilities(server: RunningServer, instance: str = "") -> re_pb2.ServerCapabilities:
    return await server.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=instance))


async def test_cache_capabilities(grid: RunningServer) -> None:
    instance = grid.server.instances.get("")
    cache = (await capabilities(grid)).cache_capabilities
    assert list(cache.digest_functions) == [SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert [(r.min_priority, r.max_priority)
            for r in cache.cache_priority_capabilities.priorities] == [(0, 0)]
    assert cache.max_batch_total_size_bytes == instance.settings.max_batch_total_size > 0
    assert cache.symlink_absolute_path_strategy == \
        re_pb2.SymlinkAbsolutePathStrategy.ALLOWED
    assert list(cache.supported_compressors) == [ZSTD]
    assert list(cache.supported_batch_update_compressors) == [ZSTD]
    assert cache.max_cas_blob_size_bytes == instance.cas.max_blob_size == 0  # no limit
    assert not cache.split_blob_support
    assert not cache.splice_blob_support


async def test_execution_capabilities(grid: RunningServer) -> None:
    execution = (await capabilities(grid)).execution_capabilities
    assert execution.digest_function == SHA256
    assert list(execution.digest_functions) == [SHA256]
    assert execution.exec_enabled  # the default instance executes
    [priorities] = execution.execution_priority_capabilities.priorities
    assert priorities.min_priority < 0 < priorities.max_priority
    assert list(execution.supported_node_properties) == []


async def test_exec_enabled_follows_the_instance_scheduler(start_server: StartServer) -> None:
    server: RunningServer = await start_server({"instances": {
        "": {}, "cache-only": {"scheduler": {"enabled": False}}}})
    assert server.server.instances.get("cache-only").scheduler is None
    executing = (await capabilities(server, "")).execution_capabilities
    cache_only = (await capabilities(server, "cache-only")).execution_capabilities
    assert executing.exec_enabled
    assert not cache_only.exec_enabled
    # The cache side is served either way.
    assert list((await capabilities(server, "cache-only")).cache_capabilities
                .digest_functions) == [SHA256]


async def test_api_versions(grid: RunningServer) -> None:
    answer = await capabilities(grid)
    low, high = answer.low_api_version, answer.high_api_version
    # Bazel 4.2 refuses a server whose low version is above 2.0.
    assert (low.major, low.minor, low.patch, low.prerelease) == (2, 0, 0, "")
    assert (high.major, high.minor, high.patch, high.prerelease) == (2, 3, 0, "")
    assert not answer.HasField("deprecated_api_version")


async def test_values_follow_each_instance_config(start_server: StartServer) -> None:
    server: RunningServer = await start_server({"instances": {
        "": {},
        "ci/read-only": {"allow-action-cache-updates": False,
                         "max-batch-total-size": "1MiB"},
    }})
    default = (await capabilities(server, "")).cache_capabilities
    read_only = (await capabilities(server, "ci/read-only")).cache_capabilities
    assert default.action_cache_update_capabilities.update_enabled
    assert not read_only.action_cache_update_capabilities.update_enabled
    assert read_only.max_batch_total_size_bytes == MiB
    assert default.max_batch_total_size_bytes == \
        server.server.instances.get("").max_batch_total_size


@pytest.mark.parametrize("name", ["unknown", "ci", "/"])
async def test_unknown_instance_is_invalid_argument(grid: RunningServer, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await capabilities(grid, name)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(name) in (caught.value.details() or "")
