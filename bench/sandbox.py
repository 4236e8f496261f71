"""What the bot's sandbox costs per action: no-op actions (`true`) run one after another
by one real `buildfleet bot`, unsandboxed (`--sandbox none`) and in bubblewrap
(`--sandbox bwrap`), interleaved round by round against one server.

Per mode it reports the median time from Execute to the result (the client's view),
the median execution time the bot measured (from ExecutedActionMetadata: the
command's start to its end, which is where the sandbox's cost lies), and the bot's
CPU time per action including its children (bwrap, env and the command).

    python bench/sandbox.py --actions 200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import report, spawned_server  # noqa: E402

from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet.client.cas import CasClient, proto_digest  # noqa: E402

MODES = ("none", "bwrap")


def cpu_with_children(pid: int) -> float:
    """CPU seconds of a process and of its children that it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


def seconds(start: object, end: object) -> float:
    return (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


def start_bot(address: str, mode: str, work: Path) -> subprocess.Popen[bytes]:
    with open(work / f"bot-{mode}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "buildfleet", "bot", "--server", f"grpc://{address}",
             "--bot-id", f"bench-{mode}", "--work-dir", str(work / mode), "--sandbox", mode,
             "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


async def run_mode(address: str, mode: str, actions: int, work: Path) -> dict[str, float]:
    bot = start_bot(address, mode, work)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            cas = CasClient(channel)
            stub = re_grpc.ExecutionStub(channel)
            command = await cas.upload_message(re_pb2.Command(
                arguments=["true"],
                environment_variables=[re_pb2.Command.EnvironmentVariable(
                    name="PATH", value="/usr/bin:/bin")]))
            root = await cas.upload_message(re_pb2.Directory())
            salt = uuid.uuid4().hex
            digests = [await cas.upload_message(re_pb2.Action(
                command_digest=proto_digest(command), input_root_digest=proto_digest(root),
                do_not_cache=True, salt=f"{salt}-{n}".encode())) for n in range(actions + 1)]

            async def execute(digest: object) -> re_pb2.ExecuteResponse:
                last = None
                async for operation in stub.Execute(re_pb2.ExecuteRequest(
                        action_digest=proto_digest(digest))):  # type: ignore[arg-type]
                    last = operation
                response = re_pb2.ExecuteResponse()
                assert last is not None and last.response.Unpack(response)
                if response.status.code != 0 or response.result.exit_code != 0:
                    raise RuntimeError(f"{mode}: the action failed: {response}")
                return response

            await execute(digests[0])  # the bot is registered and warm
            latencies, executions = [], []
            cpu_before = cpu_with_children(bot.pid)
            for digest in digests[1:]:
                started = time.perf_counter()
                response = await execute(digest)
                latencies.append(time.perf_counter() - started)
                metadata = response.result.execution_metadata
                executions.append(seconds(metadata.execution_start_timestamp,
                                          metadata.execution_completed_timestamp))
            cpu = cpu_with_children(bot.pid) - cpu_before
    finally:
        bot.terminate()
        bot.wait(30)
    return {"latency_ms": statistics.median(latencies) * 1000,
            "execution_ms": statistics.median(executions) * 1000,
            "bot_cpu_ms": cpu * 1000 / actions}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="buildfleet-bench-sandbox-") as tmp, \
            spawned_server() as (address, _):
        for number in range(args.rounds):
            for mode in MODES:
                work = Path(tmp) / f"round{number}"
                work.mkdir(exist_ok=True)
                rounds[mode].append(await run_mode(address, mode, args.actions, work))
                print(f"round {number + 1} {mode}: {rounds[mode][-1]}", file=sys.stderr)
    figures: dict[str, object] = {"actions": args.actions, "rounds": args.rounds}
    for mode in MODES:
        for key in ("latency_ms", "execution_ms", "bot_cpu_ms"):
            figures[f"{mode}_{key}"] = round(statistics.median(r[key] for r in rounds[mode]), 3)
    for key in ("latency_ms", "execution_ms", "bot_cpu_ms"):
        none, bwrap = figures[f"none_{key}"], figures[f"bwrap_{key}"]
        assert isinstance(none, float) and isinstance(bwrap, float)
        figures[f"added_{key}"] = round(bwrap - none, 3)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report("sandbox", asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
