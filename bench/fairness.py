#!/usr/bin/env python3
"""Fairness between builds: does a small build wait behind a big one?

A grid of B synthetic bots (each holds a lease for --duration seconds, then
completes it) is given a big build (--big actions under one tool invocation id)
and, --delay seconds later, a small one (--small actions under another).  Both
come as Execute calls with the RequestMetadata header Bazel sends.  Measured: how
long the small build takes from its first submission to its last result, alone on
an idle grid and behind the big one, with fair-builds on and off (a server each).
Prints the times and their ratio (behind / alone); the issue's bar is 2x with
fairness on.

    python bench/fairness.py --bots 8 --big 2000 --small 20 --duration 0.1
    python bench/fairness.py --selection 100000 --groups 1000   # the queue alone

`--core N` runs N actions through the embedded scheduler in this process (no gRPC,
no store writes: a memory store), 32 bots of capacity 1 completing at once: the
scheduling core's own cost per action, steadier than a figure over gRPC; it uses
only interfaces older than fairness, so the same command measures an earlier
checkout (`PYTHONPATH=<checkout>/src`).

`--selection N --groups G` measures the embedded queue's pick with N queued jobs in
G builds (no server): microseconds per pick, fair and by priority alone.  With
`--postgres URL` it measures the replicated strategy's claim statement instead, on
a schema of its own that it drops afterwards: milliseconds per claim.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import channel, report, spawned_server  # noqa: E402
from scheduler import (  # noqa: E402
    ACTIVE,
    COMPLETED,
    OPTIONS,
    PENDING,
    leased_action_digest,
    upload_actions,
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

HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin"


async def bot(address: str, index: int, duration: float, stop: asyncio.Event) -> None:
    """A bot of capacity 1 that holds each lease `duration` seconds, then reports it
    completed (and asks for the next in the same call)."""
    async with channel(address, None, OPTIONS) as ch:
        stub = bots_pb2_grpc.BotsStub(ch)
        session = bots_pb2.BotSession(bot_id=f"fair-bot-{index}",
                                      status=bots_pb2.BotStatus.Value("OK"))
        session.worker.properties.add(key="OSFamily", value="linux")
        session = await stub.CreateBotSession(
            bots_pb2.CreateBotSessionRequest(parent="", bot_session=session))
        while not stop.is_set():
            running = [lease for lease in session.leases if lease.state in (ACTIVE, PENDING)]
            if running:
                await asyncio.sleep(duration)
                for lease in running:
                    result = re_pb2.ActionResult(exit_code=0)
                    result.stdout_digest.CopyFrom(leased_action_digest(lease))
                    lease.state = COMPLETED
                    lease.result.Pack(result)
            try:
                session = await stub.UpdateBotSession(
                    bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                    timeout=10.0)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED and not stop.is_set():
                    raise


async def build(stub: re_grpc.ExecutionStub, digests: list[re_pb2.Digest],
                invocation: str, accepted: asyncio.Event | None = None) -> float:
    """Run one build's actions at once; seconds from the first submission to the last
    result.  `accepted` is set once the server has queued every one of them."""
    metadata = re_pb2.RequestMetadata(
        tool_details=re_pb2.ToolDetails(tool_name="bench"), tool_invocation_id=invocation)
    headers = ((HEADER, metadata.SerializeToString()),)
    waiting = len(digests)

    async def one(digest: re_pb2.Digest) -> None:
        nonlocal waiting
        last = None
        async for operation in stub.Execute(
                re_pb2.ExecuteRequest(action_digest=digest, skip_cache_lookup=True),
                metadata=headers):
            if last is None:
                waiting -= 1
                if waiting == 0 and accepted is not None:
                    accepted.set()
            last = operation
        response = re_pb2.ExecuteResponse()
        assert last is not None and last.done and last.response.Unpack(response)
        assert response.result.stdout_digest == digest, "a wrong result"

    started = time.monotonic()
    await asyncio.gather(*(one(d) for d in digests))
    return time.monotonic() - started


async def scenario(address: str, args: argparse.Namespace) -> tuple[float, float]:
    """(the small build alone, the small build behind the big one)."""
    stop = asyncio.Event()
    bots = [asyncio.create_task(bot(address, i, args.duration, stop))
            for i in range(args.bots)]
    try:
        async with channel(address, None, OPTIONS) as ch:
            run = uuid.uuid4().hex
            alone_actions = await upload_actions(ch, "", args.small, run + "-alone")
            big_actions = await upload_actions(ch, "", args.big, run + "-big")
            small_actions = await upload_actions(ch, "", args.small, run + "-small")
            stub = re_grpc.ExecutionStub(ch)
            alone = await build(stub, alone_actions, "alone-" + run)
            queued = asyncio.Event()
            big = asyncio.create_task(build(stub, big_actions, "big-" + run, queued))
            await queued.wait()  # the whole big build is queued, and then some time passes
            await asyncio.sleep(args.delay)
            behind = await build(stub, small_actions, "small-" + run)
            await big
            return alone, behind
    finally:
        stop.set()
        for task in bots:
            task.cancel()
        await asyncio.gather(*bots, return_exceptions=True)


def server_config(fair: bool) -> str:
    return f"instances:\n  \"\":\n    scheduler:\n      fair-builds: {str(fair).lower()}\n"


def selection(jobs: int, groups: int, picks: int = 20_000) -> None:
    """Microseconds per pick of the embedded queue with `jobs` queued in `groups` builds."""
    from buildfleet.digest import Digest
    from buildfleet.scheduler.embedded.queue import JobQueue
    from buildfleet.scheduler.embedded.records import JobRecord

    linux = frozenset({("OSFamily", "linux")})
    picks = min(picks, jobs)

    def queued_job(seq: int, priority: int, build: str) -> JobRecord:
        return JobRecord(id=f"job-{seq}", instance="", action_digest=Digest.of(b"%d" % seq),
                         action=b"", requirements=linux, priority=priority, cacheable=True,
                         timeout=0, run_limit=60, queued_at=0.0, seq=seq, builds={build})

    for fair in (True, False):
        chooser = random.Random(5)
        running: dict[str, int] = {}

        def runs(build: str, counts: dict[str, int] = running) -> int:
            return counts.get(build, 0)

        queue = JobQueue(0.1, running=runs if fair else None)
        for seq in range(jobs):
            queue.push(queued_job(seq, chooser.choice((-100, 0, 0, 50)),
                                  f"invocation:{chooser.randrange(groups)}"))
        started = time.perf_counter()
        taken: list[JobRecord] = []
        for _ in range(picks):
            job = queue.pop_for(linux)
            assert job is not None
            taken.append(job)
            for name in job.builds:
                running[name] = running.get(name, 0) + 1
            if len(taken) > 100:  # 100 running: each pick ends the oldest of them
                for name in taken[-101].builds:
                    running[name] -= 1
                    queue.build_changed(name)
        elapsed = time.perf_counter() - started
        report("fairness-selection", {"order": "fair" if fair else "priority",
                                      "queued": jobs, "groups": groups,
                                      "pick_us": elapsed / picks * 1e6})


async def claims(url: str, jobs: int, groups: int, picks: int = 20) -> None:
    """Milliseconds per claim of the replicated strategy with `jobs` queued in `groups`
    builds, fair and by priority alone."""
    import secrets

    import psycopg

    from buildfleet.config import PostgresConfig, SchedulerConfig
    from buildfleet.postgres import Database
    from buildfleet.scheduler.model import BotStatus
    from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler, bots
    from buildfleet.scheduler.replicated.transactions import Effects, Tx

    schema = f"bench_{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    scoped = f"{url}{separator}options=-csearch_path%3D{schema}"
    try:
        for fair in (True, False):
            # a silent claimer: keep its session and leases for the whole run
            settings = SchedulerConfig(fair_builds=fair, housekeeping_interval=60,
                                       keepalive=3600, lease_timeout=3000)
            grid = ReplicatedGrid(Database(scoped, PostgresConfig()))
            instance = f"fair-{fair}"
            scheduler = ReplicatedScheduler(instance, grid, settings=settings)
            await scheduler.start()
            try:
                async with grid.database.connection() as conn:
                    await conn.execute(
                        """INSERT INTO grid_jobs (id, instance, action_hash, action_size,
                               action, requirements, priority, cacheable, timeout,
                               run_limit, queued_at, stage, builds)
                           SELECT %s || '-job-' || n, %s, md5(n::text), n, '', '{}'::jsonb,
                                  (ARRAY[-100, 0, 0, 50])[1 + n %% 4], false, 0, 60, 0, 2,
                                  ARRAY['invocation:' || (n * 7919 %% %s)]
                           FROM generate_series(1, %s) AS n""",
                        (instance, instance, groups, jobs))
                    await conn.execute("ANALYZE grid_jobs")
                session = await scheduler.create_session(
                    "claimer", status=BotStatus.OK,
                    properties=frozenset({("OSFamily", "linux")}), capacity=picks + 1)
                started = time.perf_counter()
                for _ in range(picks):
                    async with grid.database.transaction() as conn:
                        tx = Tx(conn, Effects(), instance, settings)
                        row = await tx.row("SELECT * FROM grid_sessions WHERE name = %s",
                                           (session.name,))
                        assert row is not None
                        claimed = await bots.claim_batch(
                            tx, row, frozenset({("OSFamily", "linux")}), 1, False,
                            offer_pending=False)
                        assert len(claimed) == 1
                elapsed = time.perf_counter() - started
                report("fairness-claim", {"order": "fair" if fair else "priority",
                                          "queued": jobs, "groups": groups,
                                          "claim_ms": elapsed / picks * 1e3})
            finally:
                await scheduler.close()
                await grid.close()
    finally:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def core(actions: int, bots: int = 32) -> None:
    """Seconds of this process per action through submit, assignment and completion."""
    from google.protobuf.any_pb2 import Any as AnyProto

    from buildfleet.config import SchedulerConfig
    from buildfleet.digest import Digest
    from buildfleet.scheduler.embedded import EmbeddedScheduler, MemorySchedulerStore
    from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease
    from buildfleet.scheduler.protos import ACTION_RESULT_URL

    result = AnyProto(type_url=ACTION_RESULT_URL,
                      value=re_pb2.ActionResult(exit_code=0).SerializeToString())
    store = MemorySchedulerStore()
    await store.start()
    scheduler = EmbeddedScheduler("", store, settings=SchedulerConfig(housekeeping_interval=60))
    await scheduler.start()
    linux = frozenset({("OSFamily", "linux")})
    try:
        sessions = [(await scheduler.create_session(f"bot-{i}", status=BotStatus.OK,
                                                     properties=linux, capacity=1)).name
                    for i in range(bots)]
        actions_made = []
        for number in range(actions):
            action = re_pb2.Action(salt=b"%d" % number)
            actions_made.append((Digest.of(action.SerializeToString()), action))
        started = time.process_time()
        for digest, action in actions_made:
            await scheduler.submit(digest, action, linux)
        held: dict[str, list[str]] = {name: [] for name in sessions}
        done = 0
        while done < actions:
            for index, name in enumerate(sessions):
                reports = [ReportedLease(id=lease, state=LeaseState.COMPLETED, status_code=0,
                                         result=result) for lease in held[name]]
                done += len(reports)
                _, leases = await scheduler.update_session(
                    name, bot_id=f"bot-{index}", status=BotStatus.OK, leases=reports)
                held[name] = [lease.id for lease in leases]
        elapsed = time.process_time() - started
        report("fairness-core", {"actions": actions, "bots": bots,
                                 "cpu_us_per_action": elapsed / actions * 1e6})
    finally:
        await scheduler.close()
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=8)
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--duration", type=float, default=0.1, help="seconds per action")
    parser.add_argument("--delay", type=float, default=1.0,
                        help="seconds between the big build and the small one")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--selection", type=int, metavar="N",
                        help="measure the queue's pick with N queued jobs instead")
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--core", type=int, metavar="N",
                        help="run N actions through the embedded scheduler in-process")
    parser.add_argument("--postgres", metavar="URL",
                        help="with --selection: measure the replicated claim on this database")
    args = parser.parse_args()
    if args.core:
        asyncio.run(core(args.core))
        return
    if args.selection and args.postgres:
        asyncio.run(claims(args.postgres, args.selection, args.groups))
        return
    if args.selection:
        selection(args.selection, args.groups)
        return
    for fair in (True, False):
        alone_times, behind_times = [], []
        for _ in range(args.repeat):
            with spawned_server(config=server_config(fair)) as (address, _):
                alone, behind = asyncio.run(scenario(address, args))
            alone_times.append(alone)
            behind_times.append(behind)
        alone, behind = statistics.median(alone_times), statistics.median(behind_times)
        report("fairness", {"fair_builds": fair, "small_alone_s": alone,
                            "small_behind_big_s": behind, "ratio": behind / alone,
                            "bots": args.bots, "big": args.big, "small": args.small,
                            "duration_s": args.duration})


if __name__ == "__main__":
    main()
