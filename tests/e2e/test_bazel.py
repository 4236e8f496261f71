"""Bazel (Debian's 4.2.3) builds and tests a real workspace on a `buildfleet up` grid.

Every action runs on buildfleet's bots (Bazel's summary counts them "remote"), the
outputs are byte for byte what the commands produce, the sh_test passes; after
`bazel clean` the same build is all remote cache hits; a failing genrule is
reported with its stderr; a named instance works with --remote_instance_name,
configured the way the README's .bazelrc snippet says.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest
from upprocess import UpProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc
from buildfleet.digest import Digest

from .conftest import NAMED_INSTANCE, Bazel, BazelRun
from .workspace import FAIL_MARKER, HELLO_OUTPUT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Actions of `bazel test //...` that run a command we wrote: 5 genrules, two C
# compilations and a link, the test.  Bazel adds spawns of its own (the test's
# test.xml); symlink trees and the like are "internal".
SPAWNS = 9
LOCAL_KINDS = {"local", "linux-sandbox", "processwrapper-sandbox", "sandboxed", "worker",
               "disk cache hit"}


def remote_flags(up: UpProcess, instance: str = "") -> list[str]:
    """The flags `buildfleet up` printed for `instance`, plus a remote-only strategy."""
    return [*up.bazel_flags(instance), "--spawn_strategy=remote"]


def assert_all_remote(run: BazelRun, kind: str, count: int | None = None) -> int:
    """Every process of `run` that was not Bazel-internal is `kind` ("remote" or
    "remote cache hit"): at least SPAWNS of them, or exactly `count`. Their number."""
    processes = run.processes()
    assert run.returncode == 0, run.describe()
    assert not LOCAL_KINDS & processes.keys(), (processes, run.describe())
    others = set(processes) - {kind, "internal"}
    assert not others, (processes, run.describe())
    if count is None:
        assert processes.get(kind, 0) >= SPAWNS, (processes, run.describe())
    else:
        assert processes.get(kind, 0) == count, (processes, run.describe())
    return processes[kind]


def assert_outputs(bazel: Bazel) -> None:
    for relative, content in bazel.workspace.expected_outputs().items():
        path = bazel.bin_path(relative)
        assert path.read_bytes() == content, f"{relative} differs"
    hello = subprocess.run([str(bazel.bin_path("hello"))], capture_output=True, timeout=30)
    assert hello.returncode == 0 and hello.stdout == HELLO_OUTPUT, hello


def readme_bazelrc(endpoint: str, instance: str) -> str:
    """The README's .bazelrc snippet, pointed at `endpoint` and `instance`."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Use with Bazel", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, re.DOTALL)
    snippet = next(b for b in blocks if "build --remote_executor=" in b)
    assert "127.0.0.1:50051" in snippet and "--remote_instance_name=" in snippet, snippet
    snippet = snippet.replace("127.0.0.1:50051", endpoint)
    return re.sub(r"--remote_instance_name=\S*", f"--remote_instance_name={instance}", snippet)


def test_build_and_test_remotely_then_from_the_cache(bazel: Bazel, grid: UpProcess) -> None:
    bazel.workspace.user_rc.write_text("")
    flags = remote_flags(grid)
    assert f"--remote_executor=grpc://{grid.endpoint}" in flags
    assert "--remote_default_exec_properties=OSFamily=linux" in flags

    invocation = str(uuid.uuid4())
    built = bazel("test", "//...", *flags, f"--invocation_id={invocation}")
    remote = assert_all_remote(built, "remote")
    assert re.search(r"//:hello_test\s+PASSED", built.output), built.describe()
    assert "1 test passes" in built.output, built.describe()
    assert_outputs(bazel)
    # every action it ran is known as this invocation's, with the tool that sent it
    with grpc.insecure_channel(grid.endpoint) as channel:
        listed = admin_grpc.AdminStub(channel).ListOperations(
            admin_pb2.ListOperationsRequest(instance_name="", invocation=invocation,
                                            page_size=1000), timeout=30)
    assert len(listed.operations) == remote, listed
    assert {o.request_metadata.tool_details.tool_name for o in listed.operations} == {"bazel"}
    assert {o.build for o in listed.operations} == {
        listed.operations[0].build} and listed.operations[0].build.startswith("correlated:")

    cleaned = bazel("clean")
    assert cleaned.returncode == 0, cleaned.describe()
    assert not bazel.bin_path("report.txt").exists()

    again = bazel("test", "//...", *flags)
    assert_all_remote(again, "remote cache hit", remote)
    assert re.search(r"//:hello_test\s+\(cached\) PASSED", again.output), again.describe()
    assert_outputs(bazel)


def bot_log_leases(grid: UpProcess, bot_marker: str, outcome: str = "") -> int:
    """How many leases the bots whose id contains `-<bot_marker>` have logged (only
    those whose line has `outcome`, when given)."""
    count = 0
    line = re.compile(r" lease \S+ action [0-9a-f]{64}/\d+: (?P<rest>.*)$", re.MULTILINE)
    for path in (grid.data_dir / "bots").glob("*/bot.log"):
        text = path.read_text(errors="replace")
        if f"-{bot_marker}" in text:
            count += sum(1 for match in line.finditer(text) if outcome in match["rest"])
    return count


def test_failing_genrule_reports_its_stderr(bazel: Bazel, grid: UpProcess) -> None:
    # Configured with the README's .bazelrc snippet as it is (the default instance).
    bazel.workspace.user_rc.write_text(readme_bazelrc(grid.endpoint, ""))
    before = bot_log_leases(grid, "bot", "exit code 3")
    try:
        failed = bazel("build", "//fail:bad", "--spawn_strategy=remote")
    finally:
        bazel.workspace.user_rc.write_text("")
    assert failed.returncode != 0, failed.describe()
    assert "Executing genrule //fail:bad failed" in failed.output, failed.describe()
    assert "(Exit 3)" in failed.output, failed.describe()
    assert FAIL_MARKER in failed.output, failed.describe()
    # It ran on one of the grid's bots.
    assert bot_log_leases(grid, "bot", "exit code 3") - before == 1, grid.bot_logs()


def test_named_instance_with_the_readme_bazelrc(bazel: Bazel, grid: UpProcess) -> None:
    bazel.workspace.user_rc.write_text(readme_bazelrc(grid.endpoint, NAMED_INSTANCE))
    named_bots = NAMED_INSTANCE.replace("/", "-") + "-bot"
    before = bot_log_leases(grid, named_bots)
    try:
        assert bazel("clean").returncode == 0
        built = bazel("test", "//...")
        # The instance has its own action cache: everything runs again, on its bots.
        assert_all_remote(built, "remote")
        assert "1 test passes" in built.output, built.describe()
        assert_outputs(bazel)
    finally:
        bazel.workspace.user_rc.write_text("")
    assert bot_log_leases(grid, named_bots) - before >= SPAWNS, grid.bot_logs()

    # The outputs are in the named instance's CAS.
    shout = Digest.of(bazel.workspace.expected_outputs()["shout.txt"])
    with grpc.insecure_channel(grid.endpoint) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            instance_name=NAMED_INSTANCE,
            blob_digests=[re_pb2.Digest(hash=shout.hash, size_bytes=shout.size_bytes)]),
            timeout=30)
    assert list(missing.missing_blob_digests) == []


def test_build_over_tls_with_a_bearer_token_on_a_secure_grid(
        tls_bazel: Bazel, secure_grid: UpProcess) -> None:
    """The flags `up --secure` prints (grpcs://, --tls_certificate, the authorization
    header) build remotely; without the header the grid refuses Bazel."""
    tls_bazel.workspace.user_rc.write_text("")
    flags = remote_flags(secure_grid)
    assert f"--remote_executor=grpcs://{secure_grid.endpoint}" in flags, flags
    assert any(f.startswith("--tls_certificate=") for f in flags), flags
    assert any(f.startswith("--remote_header=authorization=Bearer ") for f in flags), flags
    cleaned = tls_bazel("clean")
    assert cleaned.returncode == 0, cleaned.describe()

    built = tls_bazel("test", "//...", *flags)
    assert_all_remote(built, "remote")
    assert re.search(r"//:hello_test\s+PASSED", built.output), built.describe()
    assert_outputs(tls_bazel)

    anonymous = [f for f in flags if not f.startswith("--remote_header=")]
    assert tls_bazel("clean").returncode == 0
    refused = tls_bazel("build", "//...", *anonymous, "--remote_retries=0")
    assert refused.returncode != 0, refused.describe()
    assert "UNAUTHENTICATED" in refused.output, refused.describe()
