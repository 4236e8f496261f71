"""Fair shares between builds: the core's rule as plain functions, and the embedded
strategy applying it with the clock in the test's hands.

A build is what rules.invocations.build_key names (a correlated invocation, a
tool invocation, a principal).  When a bot asks for work, the build furthest below
its share goes first: fewest running actions, a more urgent build counting its
running actions for less."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field

import pytest
from schedkit import LINUX, action, active, completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.embedded import EmbeddedScheduler, MemorySchedulerStore
from buildfleet.scheduler.model import BotStatus, Lease, Operation
from buildfleet.scheduler.rules.invocations import build_key, count_by_kind
from buildfleet.scheduler.rules.matching import build_load, fair_order, pick_fairly


@dataclass
class Job:
    priority: int
    seq: int
    builds: Collection[str]
    requirements: frozenset[tuple[str, str]] = field(default_factory=frozenset)


# -- the rule ---------------------------------------------------------------------------

def test_the_build_with_fewer_running_actions_goes_first() -> None:
    running = {"big": 8, "small": 0}.get
    big, small = Job(0, 1, {"big"}), Job(0, 99, {"small"})
    # the small build arrived later, but runs nothing: it is next
    assert pick_fairly([big, small], LINUX, oldest_first=False,
                       running=lambda b: running(b) or 0) is small
    # the age guard still takes the oldest
    assert pick_fairly([big, small], LINUX, oldest_first=True,
                       running=lambda b: running(b) or 0) is big


def test_a_more_urgent_build_counts_its_running_actions_for_less() -> None:
    assert build_load(3, -100) == build_load(1, 0) == 2.0  # 4 running at -100 weigh 2
    urgent, normal = Job(-100, 2, {"urgent"}), Job(0, 1, {"normal"})
    counts = {"urgent": 2, "normal": 1}
    assert pick_fairly([normal, urgent], LINUX, oldest_first=False,
                       running=counts.__getitem__) is urgent  # 1.5 < 2
    counts["urgent"] = 4
    assert pick_fairly([normal, urgent], LINUX, oldest_first=False,
                       running=counts.__getitem__) is normal  # 2.5 > 2


def test_a_job_two_builds_wait_for_counts_for_the_less_loaded_one() -> None:
    counts = {"a": 5, "b": 0, "c": 1}
    shared = Job(0, 3, {"a", "b"})
    assert fair_order(shared, counts.__getitem__)[0] == build_load(0, 0)
    assert pick_fairly([Job(0, 1, {"c"}), shared], LINUX, oldest_first=False,
                       running=counts.__getitem__) is shared


def test_a_build_at_its_limit_gets_nothing_more() -> None:
    counts = {"a": 2, "b": 2}
    jobs = [Job(0, 1, {"a"}), Job(0, 2, {"b"})]
    assert pick_fairly(jobs, LINUX, oldest_first=False, running=counts.__getitem__,
                       limit=2) is None
    counts["b"] = 1
    assert pick_fairly(jobs, LINUX, oldest_first=False, running=counts.__getitem__,
                       limit=2) is jobs[1]
    assert pick_fairly(jobs, LINUX, oldest_first=True, running=counts.__getitem__,
                       limit=2) is jobs[1]  # the age guard too


def test_the_build_key() -> None:
    metadata = re_pb2.RequestMetadata(tool_invocation_id="inv", correlated_invocations_id="ci")
    assert build_key(metadata.SerializeToString(), "alice") == "correlated:ci"
    metadata.ClearField("correlated_invocations_id")
    assert build_key(metadata.SerializeToString(), "alice") == "invocation:inv"
    assert build_key(b"", "alice") == "principal:alice"
    assert build_key(b"", "") == ""


# -- the embedded strategy applying it ---------------------------------------------------

def invocation(name: str) -> bytes:
    return re_pb2.RequestMetadata(tool_invocation_id=name).SerializeToString()


@dataclass
class Grid:
    scheduler: EmbeddedScheduler
    numbers: int = 0
    held: dict[str, set[str]] = field(default_factory=dict)  # lease ids per session

    async def submit(self, build: str, count: int = 1, priority: int = 0,
                     number: int | None = None) -> list[Operation]:
        submitted = []
        for _ in range(count):
            if number is None:
                self.numbers += 1
            submitted.append(await self.scheduler.submit(
                *action(number if number is not None else self.numbers), LINUX,
                priority=priority, request_metadata=invocation(build)))
        return submitted

    async def bot(self, name: str, capacity: int) -> str:
        session = await self.scheduler.create_session(name, status=BotStatus.OK,
                                                      properties=LINUX, capacity=capacity)
        return session.name

    async def poll(self, session: str, bot_id: str, done: Sequence[Lease] = ()
                   ) -> list[Lease]:
        """Report `done` completed and the rest of what the bot holds running; the
        leases it gets that it did not hold."""
        held = self.held.setdefault(session, set())
        finished = {lease.id for lease in done}
        reports = [completed(lease_id) if lease_id in finished else active(lease_id)
                   for lease_id in sorted(held)]
        _, leases = await self.scheduler.update_session(
            session, bot_id=bot_id, status=BotStatus.OK, leases=reports)
        fresh = [lease for lease in leases if lease.id not in held]
        held -= finished
        held |= {lease.id for lease in fresh}
        return fresh

    def build_of(self, lease: Lease) -> str:
        job = next(j for j in self.scheduler.state.jobs.values()
                   if j.lease is not None and j.lease.id == lease.id)
        return min(job.builds)


@pytest.fixture
async def grid() -> AsyncIterator[Grid]:
    async for made in _grid(SchedulerConfig(housekeeping_interval=60)):
        yield made


async def _grid(settings: SchedulerConfig) -> AsyncIterator[Grid]:
    store = MemorySchedulerStore()
    await store.start()
    now = [1000.0]
    scheduler = EmbeddedScheduler("", store, settings=settings, clock=lambda: now[0],
                                  wall=lambda: 1.7e9 + now[0])
    await scheduler.start()
    try:
        yield Grid(scheduler)
    finally:
        await scheduler.close()
        await store.close()


async def test_two_builds_share_the_bots_evenly(grid: Grid) -> None:
    await grid.submit("ci", 40)
    await grid.submit("laptop", 40)
    session = await grid.bot("bot", 8)
    builds = [grid.build_of(lease) for lease in await grid.poll(session, "bot")]
    assert builds.count("invocation:ci") == builds.count("invocation:laptop") == 4


async def test_a_more_urgent_build_gets_proportionally_more(grid: Grid) -> None:
    await grid.submit("ci", 40)
    await grid.submit("release", 40, priority=-100)
    session = await grid.bot("bot", 16)
    builds = [grid.build_of(lease) for lease in await grid.poll(session, "bot")]
    ci, release = builds.count("invocation:ci"), builds.count("invocation:release")
    # (release + 1) / 2 stays within one of ci + 1: about twice the bots, ci not starved
    assert ci + release == 16 and ci == 5 and release == 11, builds


async def test_a_build_that_arrives_late_is_served_at_the_next_free_slot() -> None:
    async for grid in _grid(SchedulerConfig(housekeeping_interval=60, fairness_share=0)):
        await _late_arrival(grid)  # (the age guard, off here, takes every 10th pick)


async def _late_arrival(grid: Grid) -> None:
    await grid.submit("ci", 2000)
    session = await grid.bot("bot", 8)
    running = await grid.poll(session, "bot")
    assert {grid.build_of(lease) for lease in running} == {"invocation:ci"}
    await grid.submit("laptop", 20)
    # each action of the big build that ends frees a slot for the small one, until
    # both run as many
    for _ in range(4):
        finished = running[:1]
        fresh = await grid.poll(session, "bot", finished)
        assert [grid.build_of(lease) for lease in fresh] == ["invocation:laptop"]
        running = [lease for lease in running if lease not in finished] + fresh
    builds = [grid.build_of(lease) for lease in running]
    assert builds.count("invocation:ci") == builds.count("invocation:laptop") == 4


async def test_a_deduplicated_action_counts_for_every_build_waiting_for_it(
        grid: Grid) -> None:
    await grid.submit("a", number=7)
    await grid.submit("b", number=7)  # the same action: joins the job
    session = await grid.bot("bot", 1)
    (shared,) = await grid.poll(session, "bot")
    job = next(j for j in grid.scheduler.state.jobs.values() if j.lease is not None)
    assert job.builds == {"invocation:a", "invocation:b"}
    # a and b both run one action now; c runs none, so c goes first, though it came last
    await grid.submit("a")
    await grid.submit("b")
    await grid.submit("c")
    other = await grid.bot("other", 1)
    (next_one,) = await grid.poll(other, "other")
    assert grid.build_of(next_one) == "invocation:c"


async def test_a_build_gets_no_more_than_its_limit() -> None:
    settings = SchedulerConfig(housekeeping_interval=60, max_running_per_build=2)
    async for grid in _grid(settings):
        await grid.submit("ci", 10)
        session = await grid.bot("bot", 5)
        leases = await grid.poll(session, "bot")
        assert len(leases) == 2
        await grid.submit("laptop", 10)
        more = await grid.poll(session, "bot", [])
        assert [grid.build_of(lease) for lease in more] == ["invocation:laptop"] * 2
        # one of ci's ends: ci may run another
        again = await grid.poll(session, "bot", leases[:1])
        assert [grid.build_of(lease) for lease in again] == ["invocation:ci"]


async def test_without_fair_builds_priority_and_age_decide() -> None:
    async for grid in _grid(SchedulerConfig(housekeeping_interval=60, fair_builds=False,
                                            fairness_share=0)):
        await grid.submit("ci", 10)
        await grid.submit("laptop", 10)
        session = await grid.bot("bot", 8)
        builds = {grid.build_of(lease) for lease in await grid.poll(session, "bot")}
        assert builds == {"invocation:ci"}


def test_builds_are_counted_by_kind_for_metrics() -> None:
    counts = count_by_kind(
        queued=[{"invocation:a"}, {"invocation:a", "correlated:ci"}, {""}, set()],
        running=[{"principal:alice"}, {"invocation:b"}])
    assert counts["invocation"] == (2, 2, 1)  # builds a and b; 2 queued, 1 running
    assert counts["correlated"] == (1, 1, 0)
    assert counts["principal"] == (1, 0, 1)
    assert counts["anonymous"] == (1, 2, 0)
    assert set(counts) == {"correlated", "invocation", "principal", "anonymous"}


def test_what_makes_a_build_is_configurable() -> None:
    both = re_pb2.RequestMetadata(tool_invocation_id="inv", correlated_invocations_id="ci")
    data = both.SerializeToString()
    assert build_key(data, "alice", ("principal",)) == "principal:alice"
    assert build_key(data, "alice", ("invocation", "principal")) == "invocation:inv"
    assert build_key(data, "", ("principal",)) == ""  # anonymous: the shared build
    assert build_key(b"", "bob", ("correlated", "invocation")) == ""
    settings = SchedulerConfig(fair_share_by=["principal"])
    assert settings.fair_share_by == ("principal",)
    with pytest.raises(ValueError, match="fair_share_by"):
        SchedulerConfig(fair_share_by=["hostname"])
