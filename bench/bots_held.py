#!/usr/bin/env python3
"""How many long-polling bot sessions one server process holds, and how fast work reaches them.

Opens K bot sessions (spread over several client processes and channels) that
long-poll concurrently, waits until every one is parked in UpdateBotSession,
then submits actions one at a time and measures how long each takes to reach
a bot (the bot process stamps the lease's arrival; CLOCK_MONOTONIC is shared
by all processes).  Reports the server's RSS and whether every session stayed
healthy (no failed calls).

    python bench/bots_held.py --bots 10000 --probes 200
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import percentile, report, rss_mib, spawned_server  # noqa: E402
from scheduler import OPTIONS, upload_actions  # noqa: E402

from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (  # noqa: E402
    bots_pb2,
    bots_pb2_grpc,
)

COMPLETED = bots_pb2.LeaseState.Value("COMPLETED")
SESSIONS_PER_CHANNEL = 500
POLL_DEADLINE = 30.0


async def one_bot(stub: bots_pb2_grpc.BotsStub, bot_id: str, parked: multiprocessing.Value,
                  arrivals: multiprocessing.Queue, errors: multiprocessing.Value,
                  stop: asyncio.Event) -> None:
    session = bots_pb2.BotSession(bot_id=bot_id)
    session.worker.properties.add(key="OSFamily", value="linux")
    try:
        session = await stub.CreateBotSession(
            bots_pb2.CreateBotSessionRequest(parent="", bot_session=session), timeout=60)
    except grpc.aio.AioRpcError as error:
        with errors.get_lock():
            errors.value += 1
        print(f"bot {bot_id}: CreateBotSession: {error.code()} {error.details()}",
              file=sys.stderr)
        return
    first = True
    while not stop.is_set():
        call = stub.UpdateBotSession(
            bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
            timeout=POLL_DEADLINE)
        if first:
            with parked.get_lock():
                parked.value += 1
            first = False
        try:
            session = await call
        except grpc.aio.AioRpcError as error:
            if stop.is_set():
                return
            with errors.get_lock():
                errors.value += 1
            print(f"bot {bot_id}: {error.code()} {error.details()}", file=sys.stderr)
            await asyncio.sleep(1)
            continue
        stamp = time.monotonic()
        for lease in session.leases:
            if lease.state == COMPLETED:
                continue
            action = re_pb2.Action()
            lease.payload.Unpack(action)
            arrivals.put((action.salt.decode(), stamp))
            result = re_pb2.ActionResult(exit_code=0)
            lease.state = COMPLETED  # type: ignore[assignment]
            lease.result.Pack(result)


def bots_process(address: str, count: int, prefix: str, parked: multiprocessing.Value,
                 arrivals: multiprocessing.Queue, errors: multiprocessing.Value,
                 seconds: float) -> None:
    async def run() -> None:
        stop = asyncio.Event()
        channels = [grpc.aio.insecure_channel(address, options=OPTIONS + [
            ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(1, count // SESSIONS_PER_CHANNEL))]
        tasks = []
        for index in range(count):
            stub = bots_pb2_grpc.BotsStub(channels[index % len(channels)])
            tasks.append(asyncio.create_task(one_bot(stub, f"{prefix}-{index}", parked,
                                                     arrivals, errors, stop)))
            if index % 200 == 199:
                await asyncio.sleep(0.05)  # register gradually
        await asyncio.sleep(seconds)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


async def probe(address: str, probes: int, arrivals: multiprocessing.Queue
                ) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        digests = await upload_actions(channel, "", probes, uuid.uuid4().hex)
        action_salts = {}
        cas = re_grpc.ContentAddressableStorageStub(channel)
        response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
        for entry in response.responses:
            action = re_pb2.Action()
            action.ParseFromString(entry.data)
            action_salts[entry.digest.hash] = action.salt.decode()
        execution = re_grpc.ExecutionStub(channel)
        for digest in digests:
            salt = action_salts[digest.hash]
            sent = time.monotonic()
            call = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest,
                                                           skip_cache_lookup=True))
            arrival = None
            while arrival is None:
                got_salt, stamp = await asyncio.to_thread(arrivals.get, True, 30)
                if got_salt == salt:
                    arrival = stamp
            latencies.append(arrival - sent)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError:
                failures += 1
            await asyncio.sleep(0.01)
    return latencies, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2, help="bot client processes")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: spawn one)")
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()

    def run(address: str, server_pid: int | None) -> dict[str, object]:
        parked = multiprocessing.Value("i", 0)
        errors = multiprocessing.Value("i", 0)
        arrivals: multiprocessing.Queue = multiprocessing.Queue()
        share = [args.bots // args.processes + (i < args.bots % args.processes)
                 for i in range(args.processes)]
        workers = [multiprocessing.Process(
            target=bots_process, daemon=True,
            args=(address, n, f"held-{os.getpid()}-{i}", parked, arrivals, errors,
                  args.max_seconds)) for i, n in enumerate(share) if n]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        while parked.value < args.bots:
            if time.monotonic() - started > args.max_seconds / 2:
                break
            time.sleep(0.2)
        connect_seconds = time.monotonic() - started
        time.sleep(2)  # let the last polls reach the server
        latencies, failures = asyncio.run(probe(address, args.probes, arrivals))
        figures: dict[str, object] = {
            "bots": args.bots, "parked": parked.value,
            "connect_seconds": round(connect_seconds, 1),
            "probes": len(latencies),
            "reach_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "reach_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "bot_errors": errors.value, "execute_errors": failures,
        }
        if server_pid is not None:
            figures["server_rss_mib"] = round(rss_mib(server_pid), 1)
        for worker in workers:
            worker.terminate()
        figures["healthy"] = (parked.value == args.bots and errors.value == 0
                              and failures == 0)
        return figures

    if args.target:
        figures = run(args.target, None)
    else:
        config = f"instances:\n  \"\":\n    scheduler: {{keepalive: {POLL_DEADLINE * 2}}}\n"
        with spawned_server(config=config) as (address, process):
            figures = run(address, process.pid)
    report("bots_held", figures)
    return 0 if figures["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
