"""Two Bazel builds at once on a grid of two bots: the one that starts second does not
wait for the first one's queue to drain.  Each build has its own invocation id; the
operations of both (the Admin API, by invocation) show when each action started,
and the second build's actions start while the first one still has actions
waiting.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from upprocess import UpProcess

from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc

from .conftest import BOTS_PER_INSTANCE, Bazel
from .workspace import write_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ACTIONS = 16  # per build, one second each: eight rounds of the two bots for one build


def slow_package(root: Path, name: str) -> None:
    """A package of ACTIONS genrules that each take a second (distinct per build, so
    that nothing is shared between the two)."""
    rules = "".join(
        f'genrule(\n    name = "step{i}",\n    outs = ["step{i}.txt"],\n'
        f'    cmd = "sleep 1; echo {name} {i} > $@",\n)\n' for i in range(ACTIONS))
    (root / "slow").mkdir(exist_ok=True)
    (root / "slow" / "BUILD").write_text(rules)


def started_at(channel: grpc.Channel, invocation: str) -> list[float]:
    """When each action of the build started on a bot (seconds since the epoch)."""
    admin = admin_grpc.AdminStub(channel)
    listed = admin.ListOperations(admin_pb2.ListOperationsRequest(
        instance_name="", invocation=invocation, page_size=1000), timeout=30)
    times = []
    for summary in listed.operations:
        detail = admin.GetOperation(admin_pb2.GetOperationRequest(name=summary.name),
                                    timeout=30)
        stamp = detail.execution_metadata.worker_start_timestamp
        assert stamp.seconds, detail
        times.append(stamp.seconds + stamp.nanos / 1e9)
    return sorted(times)


def test_a_second_build_is_served_while_the_first_still_has_work_queued(
        bazel: Bazel, grid: UpProcess, tmp_path: Path) -> None:
    assert BOTS_PER_INSTANCE == 2
    first = bazel
    second = Bazel(first.binary, write_workspace(tmp_path / "second"),
                   tmp_path / "second-output-root")
    try:
        for runner, name in ((first, "first"), (second, "second")):
            slow_package(runner.workspace.root, name)
            runner.workspace.user_rc.write_text("")
        flags = [*grid.bazel_flags(""), "--spawn_strategy=remote", "--jobs=64"]
        ids = {"first": str(uuid.uuid4()), "second": str(uuid.uuid4())}
        # both Bazel servers up before the race starts
        for runner in (first, second):
            warm = runner("info", "release")
            assert warm.returncode == 0, warm.describe()

        def start(runner: Bazel, name: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [runner.binary, *runner.startup_options(), "build", "//slow:all", *flags,
                 f"--invocation_id={ids[name]}"],
                cwd=runner.workspace.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)

        one = start(first, "first")
        time.sleep(3)  # the first build has queued its actions and holds both bots
        two = start(second, "second")
        outputs = [process.communicate(timeout=600)[0] for process in (one, two)]
        for process, output in zip((one, two), outputs, strict=True):
            assert process.returncode == 0, output[-6000:]

        with grpc.insecure_channel(grid.endpoint) as channel:
            first_times = started_at(channel, ids["first"])
            second_times = started_at(channel, ids["second"])
        assert len(first_times) == len(second_times) == ACTIONS
        # they interleave: the second build ran while the first still had actions to
        # start (on a queue by submission order alone it would start after all of them)
        assert second_times[0] < first_times[-1] - 2, (first_times, second_times)
        running_then = sum(1 for t in first_times if t > second_times[0])
        assert running_then >= ACTIONS // 4, (first_times, second_times)
    finally:
        second.shutdown()
