"""ActionCache service: lookups, updates, completeness, inlining, limits, persistence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import pytest
from conftest import RunningServer, StartServer, proto_digest
from google.rpc import error_details_pb2, status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildfleet.digest import Digest

DETAILS_KEY = "grpc-status-details-bin"


def action_digest(name: str) -> re_pb2.Digest:
    """The digest of a (never executed) Action; the action cache only needs its key."""
    action = re_pb2.Action(command_digest=proto_digest(f"command of {name}".encode()),
                           input_root_digest=proto_digest(b""))
    return proto_digest(action.SerializeToString())


def key(message: re_pb2.Digest) -> Digest:
    return Digest(message.hash, message.size_bytes)


async def get(server: RunningServer, digest: re_pb2.Digest, instance: str = "", *,
              inline_stdout: bool = False, inline_stderr: bool = False,
              inline_output_files: Sequence[str] = ()) -> re_pb2.ActionResult:
    return await server.action_cache.GetActionResult(re_pb2.GetActionResultRequest(
        instance_name=instance, action_digest=digest, inline_stdout=inline_stdout,
        inline_stderr=inline_stderr, inline_output_files=inline_output_files))


async def update(server: RunningServer, digest: re_pb2.Digest, result: re_pb2.ActionResult,
                 instance: str = "") -> re_pb2.ActionResult:
    return await server.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name=instance, action_digest=digest, action_result=result))


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for name, value in error.trailing_metadata() or ():
        if name == DETAILS_KEY:
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} in the trailing metadata of {error!r}")


@dataclass
class FullResult:
    """An ActionResult using every kind of reference, with its blobs uploaded."""

    result: re_pb2.ActionResult
    output_file: re_pb2.Digest
    stdout: re_pb2.Digest
    stderr: re_pb2.Digest
    tree: re_pb2.Digest
    file_in_tree: re_pb2.Digest


async def full_result(server: RunningServer, tag: str = "") -> FullResult:
    output_file = await server.upload(f"object code {tag}".encode())
    stdout = await server.upload(f"compiling {tag}\n".encode())
    stderr = await server.upload(f"warning: {tag} is unused\n".encode())
    nested = await server.upload(f"generated header {tag}".encode())
    child = re_pb2.Directory(files=[re_pb2.FileNode(name="gen.h", digest=nested)])
    tree_message = re_pb2.Tree(
        root=re_pb2.Directory(directories=[re_pb2.DirectoryNode(
            name="include", digest=proto_digest(child.SerializeToString()))]),
        children=[child])
    tree = await server.upload(tree_message.SerializeToString())
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/main.o", digest=output_file,
                                        is_executable=True)],
        output_directories=[re_pb2.OutputDirectory(path="out/gen", tree_digest=tree)],
        output_symlinks=[re_pb2.OutputSymlink(path="out/link", target="main.o")],
        exit_code=3,
        stdout_digest=stdout,
        stderr_digest=stderr,
        execution_metadata=re_pb2.ExecutedActionMetadata(worker="worker-1"),
    )
    return FullResult(result, output_file, stdout, stderr, tree, nested)


async def test_miss_is_not_found(grid: RunningServer) -> None:
    digest = action_digest("never stored")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(grid, digest)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert digest.hash in (caught.value.details() or "")


async def test_update_then_get_round_trip(grid: RunningServer) -> None:
    full = await full_result(grid)
    digest = action_digest("round trip")
    stored = await update(grid, digest, full.result)
    assert stored == full.result
    assert await get(grid, digest) == full.result


async def test_update_replaces_an_earlier_result(grid: RunningServer) -> None:
    digest = action_digest("replaced")
    first = await full_result(grid, "first")
    second = await full_result(grid, "second")
    await update(grid, digest, first.result)
    await update(grid, digest, second.result)
    assert await get(grid, digest) == second.result


@pytest.mark.parametrize("lost", ["output_file", "stdout", "stderr", "tree", "file_in_tree"])
async def test_hit_disappears_when_a_referenced_blob_is_gone(grid: RunningServer,
                                                             lost: str) -> None:
    full = await full_result(grid, lost)
    digest = action_digest(f"loses {lost}")
    await update(grid, digest, full.result)
    assert await get(grid, digest) == full.result

    removed = await grid.server.instances.get("").cas.store.delete(key(getattr(full, lost)))
    assert removed
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(grid, digest)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_directory_given_only_as_root_directory(grid: RunningServer) -> None:
    leaf = await grid.upload(b"deep file")
    sub = re_pb2.Directory(files=[re_pb2.FileNode(name="leaf.txt", digest=leaf)])
    sub_digest = await grid.upload(sub.SerializeToString())
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="sub", digest=sub_digest)])
    root_digest = await grid.upload(root.SerializeToString())
    result = re_pb2.ActionResult(output_directories=[
        re_pb2.OutputDirectory(path="out", root_directory_digest=root_digest)])
    digest = action_digest("directory only")
    await update(grid, digest, result)
    assert await get(grid, digest) == result

    await grid.server.instances.get("").cas.store.delete(key(leaf))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(grid, digest)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_with_missing_blobs_is_failed_precondition(grid: RunningServer) -> None:
    present = await grid.upload(b"this one was uploaded")
    absent_file = proto_digest(b"never uploaded output")
    absent_stderr = proto_digest(b"never uploaded stderr")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="a", digest=present),
                      re_pb2.OutputFile(path="b", digest=absent_file)],
        stderr_digest=absent_stderr)
    digest = action_digest("missing blobs")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(grid, digest, result)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    status = status_details(caught.value)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    failures = []
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        assert detail.Unpack(failure)
        failures.append(failure)
    assert len(failures) == 1
    violations = failures[0].violations
    assert {v.type for v in violations} == {"MISSING"}
    assert sorted(v.subject for v in violations) == sorted(
        f"blobs/{d.hash}/{d.size_bytes}" for d in (absent_file, absent_stderr))

    with pytest.raises(grpc.aio.AioRpcError) as after:
        await get(grid, digest)
    assert after.value.code() == grpc.StatusCode.NOT_FOUND


INLINE_LIMIT = 100


@pytest.fixture
async def small_inline(start_server: StartServer) -> RunningServer:
    server: RunningServer = await start_server(
        {"instances": {"": {"max-inline-size": INLINE_LIMIT}}})
    return server


async def test_inline_stdout_and_stderr_on_request(small_inline: RunningServer) -> None:
    out, err = b"o" * 40, b"e" * 50
    result = re_pb2.ActionResult(stdout_digest=await small_inline.upload(out),
                                 stderr_digest=await small_inline.upload(err))
    digest = action_digest("inline std streams")
    await update(small_inline, digest, result)

    plain = await get(small_inline, digest)
    assert plain.stdout_raw == b"" and plain.stderr_raw == b""
    both = await get(small_inline, digest, inline_stdout=True, inline_stderr=True)
    assert (both.stdout_raw, both.stderr_raw) == (out, err)
    assert both.stdout_digest == result.stdout_digest
    only_err = await get(small_inline, digest, inline_stderr=True)
    assert (only_err.stdout_raw, only_err.stderr_raw) == (b"", err)
    # Inlining builds a copy: the stored entry is unchanged.
    assert await get(small_inline, digest) == result


async def test_inline_stdout_over_the_limit_is_left_out(small_inline: RunningServer) -> None:
    out = b"x" * (INLINE_LIMIT + 1)
    result = re_pb2.ActionResult(stdout_digest=await small_inline.upload(out))
    digest = action_digest("big stdout")
    await update(small_inline, digest, result)
    answer = await get(small_inline, digest, inline_stdout=True)
    assert answer.stdout_raw == b""
    assert answer.stdout_digest == result.stdout_digest


async def test_inline_output_files_within_the_total_limit(
        small_inline: RunningServer) -> None:
    contents = {"a": b"a" * 30, "b": b"b" * 60, "c": b"c" * 50, "d": b"d" * 10,
                "e": b"e" * 5}
    result = re_pb2.ActionResult(output_files=[
        re_pb2.OutputFile(path=path, digest=await small_inline.upload(data))
        for path, data in contents.items()])
    digest = action_digest("inline files")
    await update(small_inline, digest, result)

    none = await get(small_inline, digest, inline_output_files=[])
    assert all(f.contents == b"" for f in none.output_files)

    answer = await get(small_inline, digest, inline_output_files=["a", "b", "c", "d"])
    inlined = {f.path: f.contents for f in answer.output_files if f.contents}
    # a and b fill 90 bytes; c (50) does not fit and is skipped; d (10) still fits;
    # e was not asked for.
    assert inlined == {p: contents[p] for p in ("a", "b", "d")}
    assert sum(len(data) for data in inlined.values()) <= INLINE_LIMIT
    assert [f.digest for f in answer.output_files] == [f.digest for f in result.output_files]


async def test_inline_budget_is_shared_with_stdout(small_inline: RunningServer) -> None:
    out, file_data = b"s" * 60, b"f" * 60
    result = re_pb2.ActionResult(
        stdout_digest=await small_inline.upload(out),
        output_files=[re_pb2.OutputFile(path="f", digest=await small_inline.upload(file_data))])
    digest = action_digest("shared budget")
    await update(small_inline, digest, result)
    answer = await get(small_inline, digest, inline_stdout=True, inline_output_files=["f"])
    assert answer.stdout_raw == out
    assert answer.output_files[0].contents == b""
    alone = await get(small_inline, digest, inline_output_files=["f"])
    assert alone.output_files[0].contents == file_data


async def test_inline_contents_in_an_update_go_to_the_cas(grid: RunningServer) -> None:
    out, err, data = b"inline stdout", b"inline stderr", b"inline output file"
    result = re_pb2.ActionResult(
        stdout_raw=out,  # no digest given: the server computes it
        stderr_raw=err, stderr_digest=proto_digest(err),
        output_files=[re_pb2.OutputFile(path="o", digest=proto_digest(data), contents=data)])
    digest = action_digest("inline update")
    stored = await update(grid, digest, result)

    assert stored.stdout_digest == proto_digest(out)
    assert stored.stderr_digest == proto_digest(err)
    assert stored.stdout_raw == b"" and stored.stderr_raw == b""
    assert stored.output_files[0].contents == b""
    assert await get(grid, digest) == stored

    wanted = [proto_digest(out), proto_digest(err), proto_digest(data)]
    read = await grid.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=wanted))
    assert {(r.digest.hash, r.data) for r in read.responses if r.status.code == 0} == {
        (proto_digest(blob).hash, blob) for blob in (out, err, data)}

    inlined = await get(grid, digest, inline_stdout=True, inline_stderr=True,
                        inline_output_files=["o"])
    assert (inlined.stdout_raw, inlined.stderr_raw) == (out, err)
    assert inlined.output_files[0].contents == data


@pytest.mark.parametrize("field", ["stdout", "output_file"])
async def test_inline_contents_must_match_their_digest(grid: RunningServer, field: str) -> None:
    wrong = proto_digest(b"something else")
    if field == "stdout":
        result = re_pb2.ActionResult(stdout_raw=b"real", stdout_digest=wrong)
    else:
        result = re_pb2.ActionResult(output_files=[
            re_pb2.OutputFile(path="o", digest=wrong, contents=b"real")])
    digest = action_digest(f"mismatch {field}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(grid, digest, result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[proto_digest(b"real")]))
    assert list(missing.missing_blob_digests) == [proto_digest(b"real")]


async def test_results_cache_policy_is_accepted(grid: RunningServer) -> None:
    result = re_pb2.ActionResult(exit_code=1)
    digest = action_digest("with policy")
    await grid.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=digest, action_result=result,
        results_cache_policy=re_pb2.ResultsCachePolicy(priority=5)))
    assert await get(grid, digest) == result


async def test_read_only_instance_refuses_updates(start_server: StartServer) -> None:
    server: RunningServer = await start_server(
        {"instances": {"": {"allow-action-cache-updates": False}}})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(server, action_digest("read only"), re_pb2.ActionResult())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "read-only" in (caught.value.details() or "")

    capabilities = await server.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=""))
    assert not capabilities.cache_capabilities.action_cache_update_capabilities.update_enabled
    # Lookups still work.
    with pytest.raises(grpc.aio.AioRpcError) as miss:
        await get(server, action_digest("read only"))
    assert miss.value.code() == grpc.StatusCode.NOT_FOUND


GOOD = proto_digest(b"good")
BAD_DIGESTS = {
    "uppercase hash": re_pb2.Digest(hash=GOOD.hash.upper(), size_bytes=GOOD.size_bytes),
    "short hash": re_pb2.Digest(hash=GOOD.hash[:40], size_bytes=GOOD.size_bytes),
    "negative size": re_pb2.Digest(hash=GOOD.hash, size_bytes=-1),
    "unset": re_pb2.Digest(),
}


@pytest.mark.parametrize("bad", BAD_DIGESTS.values(), ids=BAD_DIGESTS.keys())
async def test_malformed_action_digest(grid: RunningServer, bad: re_pb2.Digest) -> None:
    for call in (get(grid, bad), update(grid, bad, re_pb2.ActionResult())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "action_digest" in (caught.value.details() or "")


def _result_with_bad(field: str) -> re_pb2.ActionResult:
    bad = BAD_DIGESTS["short hash"]
    if field == "output_files":
        return re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="x", digest=bad)])
    if field == "stdout_digest":
        return re_pb2.ActionResult(stdout_digest=bad)
    if field == "stderr_digest":
        return re_pb2.ActionResult(stderr_digest=bad)
    if field == "tree_digest":
        return re_pb2.ActionResult(output_directories=[
            re_pb2.OutputDirectory(path="d", tree_digest=bad)])
    if field == "root_directory_digest":
        return re_pb2.ActionResult(output_directories=[
            re_pb2.OutputDirectory(path="d", root_directory_digest=bad)])
    assert field == "output_directories"  # neither digest set
    return re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(path="d")])


@pytest.mark.parametrize("field", ["output_files", "stdout_digest", "stderr_digest",
                                   "tree_digest", "root_directory_digest",
                                   "output_directories"])
async def test_malformed_digest_in_result(grid: RunningServer, field: str) -> None:
    digest = action_digest(f"bad {field}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(grid, digest, _result_with_bad(field))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_other_digest_functions_are_refused(grid: RunningServer) -> None:
    sha1 = re_pb2.DigestFunction.SHA1
    digest = action_digest("sha1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grid.action_cache.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=digest, digest_function=sha1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grid.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=digest, action_result=re_pb2.ActionResult(), digest_function=sha1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # SHA256 given explicitly is fine.
    await grid.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=digest, action_result=re_pb2.ActionResult(),
        digest_function=re_pb2.DigestFunction.SHA256))


async def test_unknown_instance_is_invalid_argument(grid: RunningServer) -> None:
    digest = action_digest("elsewhere")
    for call in (get(grid, digest, instance="nope"),
                 update(grid, digest, re_pb2.ActionResult(), instance="nope")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nope" in (caught.value.details() or "")


async def test_instances_have_separate_action_caches(start_server: StartServer) -> None:
    server: RunningServer = await start_server({"instances": {"": {}, "ci": {}}})
    digest = action_digest("per instance")
    result = re_pb2.ActionResult(exit_code=7)
    await update(server, digest, result, instance="ci")
    assert await get(server, digest, instance="ci") == result
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(server, digest, instance="")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_entries_survive_a_restart(start_server: StartServer) -> None:
    first: RunningServer = await start_server()
    full = await full_result(first, "persistent")
    digest = action_digest("persistent")
    await update(first, digest, full.result)
    await first.server.stop(0)

    second: RunningServer = await start_server(data_dir=first.data_dir)
    assert await get(second, digest) == full.result
