#!/usr/bin/env python3
"""Scheduling throughput of several `buildfleet serve` replicas on one PostgreSQL database.

The load is bench/scheduler.py's (B synthetic bots completing every lease at
once, C clients each executing distinct no-op actions and checking they got
their own result), spread round-robin over R replicas: bot i and client i talk
to replica i mod R.  The replicas share one CAS directory, a fresh schema of
the given database (dropped afterwards) and an action cache: in that directory
too (`--action-cache disk`, the default) or in the database (`postgres`, what
replicas on different machines use).

    python bench/replicas.py --replicas 2 --bots 32 --clients 64 --actions 5000 \\
        --database postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
import psycopg  # noqa: E402
from common import cpu_seconds, percentile, report, rss_mib, spawned_server  # noqa: E402
from scheduler import OPTIONS, bots_process, client_loop, upload_actions  # noqa: E402

from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A URL to a new schema of `url`'s database, dropped afterwards."""
    schema = f"bf_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = f"-csearch_path={schema}"
    try:
        yield urlunsplit(parts._replace(query=urlencode(query)))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def replica_config(database: str, shared: Path, action_cache: str) -> str:
    ac = (f"{{type: disk, path: '{shared / 'ac'}'}}" if action_cache == "disk"
          else "{type: postgres}")
    return (f"database: '{database}'\n"
            "storage:\n"
            f"  cas: {{type: disk, path: '{shared / 'cas'}'}}\n"
            f"  ac: {ac}\n"
            "instances:\n"
            "  '': {cas: cas, action-cache: ac}\n")


async def run_clients(addresses: list[str], args: argparse.Namespace,
                      server_pids: list[int]) -> dict[str, object]:
    channels = [grpc.aio.insecure_channel(a, options=OPTIONS) for a in addresses]
    try:
        upload_started = time.perf_counter()
        digests = await upload_actions(channels[0], "", args.actions, uuid.uuid4().hex)
        upload_seconds = time.perf_counter() - upload_started
        work: asyncio.Queue[tuple[re_pb2.Digest, re_pb2.ExecuteRequest]] = asyncio.Queue()
        for digest in digests:
            work.put_nowait((digest, re_pb2.ExecuteRequest(action_digest=digest,
                                                           skip_cache_lookup=True)))
        stubs = [re_grpc.ExecutionStub(channel) for channel in channels]
        latencies: list[float] = []
        counters = {"errors": 0, "wrong_results": 0}
        cpu_before = {pid: cpu_seconds(pid) for pid in server_pids}
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(stubs[i % len(stubs)], work, latencies, counters)
                               for i in range(args.clients)))
        elapsed = time.perf_counter() - started
        server_cpu = sum(cpu_seconds(pid) - cpu_before[pid] for pid in server_pids)
    finally:
        for channel in channels:
            await channel.close()
    return {
        "replicas": len(addresses), "actions": args.actions, "bots": args.bots,
        "clients": args.clients, "completed": len(latencies), "seconds": round(elapsed, 3),
        "upload_seconds": round(upload_seconds, 3),
        "actions_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p90_ms": round(percentile(latencies, 0.9) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        **counters,
        # Server CPU (all replicas) per completed action while actions run.
        "servers_cpu_ms_per_action_run": round(server_cpu * 1000 / max(1, len(latencies)), 3),
        "servers_rss_mib": [round(rss_mib(pid), 1) for pid in server_pids],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--database", default=os.environ.get(
        "BUILDFLEET_BENCH_DATABASE", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--bots", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--actions", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--action-cache", choices=["disk", "postgres"], default="disk")
    args = parser.parse_args()

    with fresh_schema(args.database) as url, contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="buildfleet-replicas-") as shared:
        config = replica_config(url, Path(shared), args.action_cache)
        servers = [stack.enter_context(spawned_server(config=config))
                   for _ in range(args.replicas)]
        addresses = [address for address, _ in servers]
        ready = [multiprocessing.Event() for _ in addresses]
        workers = []
        for index, (address, event) in enumerate(zip(addresses, ready, strict=True)):
            count = args.bots // len(addresses) + (index < args.bots % len(addresses))
            worker = multiprocessing.Process(
                target=bots_process, args=(address, "", count, args.max_seconds, event, None),
                daemon=True)
            worker.start()
            workers.append(worker)
        for event, worker in zip(ready, workers, strict=True):
            if not event.wait(60) or not worker.is_alive():
                raise SystemExit(f"the bots of a replica did not start (exit code "
                                 f"{worker.exitcode})")
        try:
            figures = asyncio.run(run_clients(addresses, args,
                                              [process.pid for _, process in servers]))
        finally:
            for worker in workers:
                worker.terminate()
    report("replicas", figures)
    ok = (figures["completed"] == args.actions and not figures["errors"]
          and not figures["wrong_results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
