#!/usr/bin/env python3
"""Scheduling throughput and latency, over gRPC only (REAPI for clients, RWAPI for bots).

B synthetic bots complete every lease at once with an ActionResult that names
the action it ran (its stdout_digest is the action's digest); C concurrent
clients submit N distinct no-op actions (uploaded beforehand) with Execute and
follow each to its result.  Every client checks that it got its own action's
result.  Prints actions/s, latency percentiles from Execute to result, errors,
and the CPU time each process (server, clients, bots) spent per action while the
actions ran (`*_cpu_ms_per_action_run`; `server_cpu_ms_per_action` also counts
the upload): on a machine shared with other work these are steadier than
wall-clock figures.

    python bench/scheduler.py --bots 32 --clients 64 --actions 5000
    python bench/scheduler.py --target 127.0.0.1:50051 ...   # an existing server
    python bench/scheduler.py --target 127.0.0.1:50051 --server-pid 1234 ...
    python bench/scheduler.py --secure ...   # TLS, bots and clients with bearer tokens
    python bench/scheduler.py --tls-only ... # TLS without authentication
    python bench/scheduler.py --metrics ...  # metrics on, scraped every second
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import (  # noqa: E402
    Credentials,
    add_server_arguments,
    channel,
    cpu_seconds,
    percentile,
    report,
    rss_mib,
    secure_settings,
    spawned_server,
)

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
from buildfleet.digest import Digest  # noqa: E402

ACTIVE = bots_pb2.LeaseState.Value("ACTIVE")
PENDING = bots_pb2.LeaseState.Value("PENDING")
COMPLETED = bots_pb2.LeaseState.Value("COMPLETED")
OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
           ("grpc.max_send_message_length", 64 << 20)]


def proto_digest(data: bytes) -> re_pb2.Digest:
    digest = Digest.of(data)
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


async def upload_actions(channel: grpc.aio.Channel, instance: str, count: int,
                         run_id: str) -> list[re_pb2.Digest]:
    """Store `count` distinct no-op actions; their digests."""
    cas = re_grpc.ContentAddressableStorageStub(channel)
    command = re_pb2.Command(arguments=["true"])
    command_blob = command.SerializeToString()
    root_blob = re_pb2.Directory().SerializeToString()
    blobs = [command_blob, root_blob]
    digests = []
    for index in range(count):
        action = re_pb2.Action(command_digest=proto_digest(command_blob),
                               input_root_digest=proto_digest(root_blob),
                               salt=f"{run_id}/{index}".encode())
        blob = action.SerializeToString()
        blobs.append(blob)
        digests.append(proto_digest(blob))
    for start in range(0, len(blobs), 1000):
        chunk = blobs[start:start + 1000]
        response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(b), data=b)
                      for b in chunk]))
        assert all(r.status.code == 0 for r in response.responses), response
    return digests


def leased_action_digest(lease: bots_pb2.Lease) -> re_pb2.Digest:
    """The digest of the action a lease names: given as a Digest (PENDING offers), or
    computed from the Action sent inline (its canonical serialization)."""
    if lease.payload.type_url.endswith("/" + re_pb2.Digest.DESCRIPTOR.full_name):
        digest = re_pb2.Digest()
        lease.payload.Unpack(digest)
        return digest
    action = re_pb2.Action()
    lease.payload.Unpack(action)
    return proto_digest(action.SerializeToString(deterministic=True))


async def bot_loop(channel: grpc.aio.Channel, instance: str, index: int,
                   stop: asyncio.Event, counters: dict[str, int]) -> None:
    """A bot that completes every lease at once."""
    stub = bots_pb2_grpc.BotsStub(channel)
    bot_id = f"bench-bot-{os.getpid()}-{index}"
    # Status OK, as real bots send it (BuildGrid leases to no bot in another status).
    session = bots_pb2.BotSession(bot_id=bot_id, status=bots_pb2.BotStatus.Value("OK"))
    session.worker.properties.add(key="OSFamily", value="linux")
    session = await stub.CreateBotSession(
        bots_pb2.CreateBotSessionRequest(parent=instance, bot_session=session))
    while not stop.is_set():
        try:
            session = await stub.UpdateBotSession(
                bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                # long enough that every server long-polls (BuildGrid answers at
                # once when 80% of the deadline is under 3 s)
                timeout=10.0)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                continue
            if stop.is_set():
                return
            counters["bot_errors"] += 1
            await asyncio.sleep(0.1)
            continue
        for lease in session.leases:
            if lease.state not in (ACTIVE, PENDING):
                continue
            result = re_pb2.ActionResult(exit_code=0)
            result.stdout_digest.CopyFrom(leased_action_digest(lease))
            lease.state = COMPLETED
            lease.status.code = 0
            lease.result.Pack(result)
            counters["leases"] += 1


async def client_loop(stub: re_grpc.ExecutionStub,
                      work: asyncio.Queue[tuple[re_pb2.Digest, re_pb2.ExecuteRequest]],
                      latencies: list[float], counters: dict[str, int]) -> None:
    """Execute actions from `work` one at a time, each checked against its own digest."""
    while True:
        try:
            digest, request = work.get_nowait()
        except asyncio.QueueEmpty:
            return
        started = time.perf_counter()
        try:
            last = None
            async for operation in stub.Execute(request):
                last = operation
            response = re_pb2.ExecuteResponse()
            if last is None or not last.done or not last.response.Unpack(response):
                counters["errors"] += 1
                continue
            if response.status.code != 0 or response.result.stdout_digest != digest:
                counters["wrong_results"] += 1
                continue
            latencies.append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as error:
            counters["errors"] += 1
            print(f"execute failed: {error.code()} {error.details()}", file=sys.stderr)


async def run_bots(address: str, instance: str, count: int, stop_after: float,
                   ready: multiprocessing.synchronize.Event | None = None,
                   credentials: Credentials | None = None) -> dict[str, int]:
    counters = {"leases": 0, "bot_errors": 0}
    stop = asyncio.Event()
    async with channel(address, credentials, OPTIONS) as bots_channel:
        tasks = [asyncio.create_task(bot_loop(bots_channel, instance, i, stop, counters))
                 for i in range(count)]
        if ready is not None:
            ready.set()
        await asyncio.sleep(stop_after)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return counters


def bots_process(address: str, instance: str, count: int, stop_after: float,
                 ready: multiprocessing.synchronize.Event,
                 credentials: Credentials | None) -> None:
    asyncio.run(run_bots(address, instance, count, stop_after, ready, credentials))


async def run_clients(address: str, instance: str, args: argparse.Namespace,
                      cpu_pids: dict[str, int],
                      credentials: Credentials | None = None) -> dict[str, object]:
    """Upload, then run the clients; CPU of the processes in `cpu_pids` over the run."""
    async with channel(address, credentials, OPTIONS) as client_channel:
        upload_started = time.perf_counter()
        digests = await upload_actions(client_channel, instance, args.actions,
                                       uuid.uuid4().hex)
        upload_seconds = time.perf_counter() - upload_started
        # Requests are built before the clock starts: the load generator shares the
        # machine with the server, and what it spends is taken from the server.
        work: asyncio.Queue[tuple[re_pb2.Digest, re_pb2.ExecuteRequest]] = asyncio.Queue()
        for digest in digests:
            work.put_nowait((digest, re_pb2.ExecuteRequest(
                instance_name=instance, action_digest=digest, skip_cache_lookup=True)))
        stub = re_grpc.ExecutionStub(client_channel)
        latencies: list[float] = []
        counters = {"errors": 0, "wrong_results": 0}
        print(f"uploaded {args.actions} actions in {upload_seconds:.1f} s; executing them",
              file=sys.stderr, flush=True)
        cpu_before = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(stub, work, latencies, counters)
                               for _ in range(args.clients)))
        elapsed = time.perf_counter() - started
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in cpu_pids.items()}
    figures: dict[str, object] = {
        "actions": args.actions, "bots": args.bots, "clients": args.clients,
        "secure": "plaintext" if credentials is None else (
            "tls" if credentials.token is None else "tls+token"),
        "completed": len(latencies), "seconds": round(elapsed, 3),
        "upload_seconds": round(upload_seconds, 3),
        "actions_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p90_ms": round(percentile(latencies, 0.9) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        **counters,
    }
    # CPU per completed action while actions run (upload excluded), per process.
    per_action = 1000 / max(1, len(latencies))
    for name, seconds in cpu.items():
        figures[f"{name}_cpu_ms_per_action_run"] = round(seconds * per_action, 3)
    return figures


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def scraping(url: str, every: float = 1.0) -> Iterator[list[int]]:
    """Scrape `url` every `every` seconds on a thread, as Prometheus would; the count of
    successful scrapes is in the yielded list."""
    done = threading.Event()
    count = [0]

    def loop() -> None:
        while not done.wait(every):
            try:
                with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
                    response.read()
                count[0] += 1
            except OSError as error:
                print(f"scrape failed: {error}", file=sys.stderr)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        thread.join(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--actions", type=int, default=1000)
    add_server_arguments(parser)
    parser.add_argument("--bot-processes", type=int, default=1,
                        help="processes the synthetic bots are spread over")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--secure", action="store_true",
                        help="spawn the server with TLS and bearer tokens (a `bot` token "
                             "for the bots, an `execute` token for the clients)")
    parser.add_argument("--tls-only", action="store_true",
                        help="spawn the server with TLS but no authentication (with "
                             "--secure and plaintext runs, this separates the cost of TLS "
                             "from that of checking credentials)")
    parser.add_argument("--metrics", action="store_true",
                        help="spawn the server with its Prometheus endpoint on, and scrape "
                             "it every second while the actions run")
    args = parser.parse_args()
    if (args.secure or args.tls_only) and args.target:
        parser.error("--secure and --tls-only spawn their own server: not with --target")
    if args.secure and args.tls_only:
        parser.error("--secure and --tls-only exclude each other")
    tokens: dict[str, Credentials] = {}

    def run(address: str, server_pid: int | None) -> dict[str, object]:
        ready = [multiprocessing.Event() for _ in range(args.bot_processes)]
        share = [args.bots // args.bot_processes + (i < args.bots % args.bot_processes)
                 for i in range(args.bot_processes)]
        workers = [multiprocessing.Process(
            target=bots_process,
            args=(address, args.instance, n, args.max_seconds, r, tokens.get("bot")),
            daemon=True) for n, r in zip(share, ready, strict=True) if n]
        for worker in workers:
            worker.start()
        for event in ready:
            event.wait(60)
        cpu_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
        cpu_pids = {"clients": os.getpid()}
        cpu_pids.update((f"bots{i}" if len(workers) > 1 else "bots", w.pid)
                        for i, w in enumerate(workers) if w.pid is not None)
        if server_pid is not None:
            cpu_pids["server"] = server_pid
        try:
            figures = asyncio.run(run_clients(address, args.instance, args, cpu_pids,
                                              tokens.get("execute")))
        finally:
            for worker in workers:
                worker.terminate()
        if server_pid is not None:
            figures["server_rss_mib"] = round(rss_mib(server_pid), 1)
            # Server CPU per action (upload phase included): steadier than wall
            # time on a machine shared with other work.
            figures["server_cpu_ms_per_action"] = round(
                (cpu_seconds(server_pid) - cpu_before) * 1000 / max(1, args.actions), 3)
        return figures

    if args.target:
        figures = run(args.target, args.server_pid)
    elif args.secure or args.tls_only:
        with secure_settings(["bot", "execute"], tokens=args.secure) as (settings, credentials), \
                spawned_server(config=settings) as (address, process):
            tokens.update(credentials)
            figures = run(address, process.pid)
    elif args.metrics:
        port = free_port()
        with spawned_server(config=f"metrics: {{listen: '127.0.0.1:{port}'}}\n") as (
                address, process), scraping(f"http://127.0.0.1:{port}/metrics") as scrapes:
            figures = run(address, process.pid)
        figures["metrics_scrapes"] = scrapes[0]
    else:
        with spawned_server() as (address, process):
            figures = run(address, process.pid)
    report("scheduler", figures)
    ok = (figures["completed"] == args.actions and not figures["errors"]
          and not figures["wrong_results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
