"""The embedded strategy's queue: it picks what `rules.matching.pick` says, by index."""

from __future__ import annotations

import random
from collections.abc import Callable

from schedkit import LINUX, LINUX_X86, make_job

from buildfleet.scheduler.embedded.queue import JobQueue
from buildfleet.scheduler.embedded.records import JobRecord
from buildfleet.scheduler.model import Properties
from buildfleet.scheduler.rules.matching import Fairness, pick, pick_fairly


def drain(queue: JobQueue, properties: Properties = LINUX_X86) -> list[JobRecord]:
    taken: list[JobRecord] = []
    while (job := queue.pop_for(properties)) is not None:
        taken.append(job)
    return taken


# ------------------------------------------------------------------- JobQueue

def test_priority_then_submission_order() -> None:
    queue = JobQueue(fairness_share=0)
    jobs = [make_job(p) for p in (5, -1, 3, 0, -1, 5)]
    for job in jobs:
        queue.push(job)
    assert len(queue) == 6
    taken = drain(queue)
    assert taken == [jobs[1], jobs[4], jobs[3], jobs[2], jobs[0], jobs[5]]
    assert len(queue) == 0


def test_groups_are_matched_by_subset_and_merged_in_order() -> None:
    queue = JobQueue(fairness_share=0)
    anywhere = make_job(2)
    linux = make_job(1, LINUX)
    x86 = make_job(0, LINUX_X86)
    windows = make_job(-5, frozenset({("OSFamily", "windows")}))
    for job in (anywhere, linux, x86, windows):
        queue.push(job)
    assert queue.pop_for(frozenset({("OSFamily", "mac")})) is anywhere
    assert queue.pop_for(LINUX) is linux  # the x86 job needs ISA too
    assert queue.pop_for(LINUX) is None
    assert queue.pop_for(LINUX_X86) is x86
    assert len(queue) == 1 and windows in queue


def test_multi_valued_requirements() -> None:
    queue = JobQueue(fairness_share=0)
    both = frozenset({("ISA", "x86-64"), ("ISA", "x86-64-v3")})
    job = make_job(0, both)
    queue.push(job)
    assert queue.pop_for(frozenset({("ISA", "x86-64")})) is None
    assert queue.pop_for(frozenset({("ISA", "x86-64-v3"), ("ISA", "x86-64"),
                                    ("OSFamily", "linux")})) is job


def test_fairness_share_half_alternates_oldest_and_most_urgent() -> None:
    queue = JobQueue(fairness_share=0.5)
    jobs = [make_job(p) for p in (5, -1, 3, 0)]  # jobs[0] is the oldest
    for job in jobs:
        queue.push(job)
    assert drain(queue) == [jobs[1], jobs[0], jobs[3], jobs[2]]


def test_fairness_share_tenth_takes_every_tenth_pick_by_age() -> None:
    queue = JobQueue(fairness_share=0.1)
    old = make_job(100)
    urgent = [make_job(0) for _ in range(20)]
    for job in (old, *urgent):
        queue.push(job)
    taken = drain(queue)
    assert taken.index(old) == 9
    assert [job for job in taken if job is not old] == urgent


def test_fairness_share_zero_never_ignores_priority() -> None:
    queue = JobQueue(fairness_share=0)
    old = make_job(1)
    urgent = [make_job(0) for _ in range(30)]
    for job in (old, *urgent):
        queue.push(job)
    assert drain(queue)[-1] is old


def test_fairness_counts_assignments_not_empty_polls() -> None:
    queue = JobQueue(fairness_share=0.5)
    jobs = [make_job(p, LINUX) for p in (5, -1, 3, 0)]
    for job in jobs:
        queue.push(job)
    taken = []
    for _ in range(4):
        assert queue.pop_for(frozenset({("OSFamily", "windows")})) is None
        taken.append(queue.pop_for(LINUX))
    assert taken == [jobs[1], jobs[0], jobs[3], jobs[2]]


def test_reprioritize_moves_a_queued_job_forward_once() -> None:
    queue = JobQueue(fairness_share=0)
    first, second = make_job(0), make_job(5)
    queue.push(first)
    queue.push(second)
    second.priority = -5
    queue.reprioritize(second)
    assert drain(queue) == [second, first]  # and the stale entry yields nothing more


def test_remove_and_accept() -> None:
    queue = JobQueue(fairness_share=0)
    jobs = [make_job(p) for p in (0, 1, 2)]
    for job in jobs:
        queue.push(job)
    assert queue.remove(jobs[0]) and not queue.remove(jobs[0])
    assert jobs[0] not in queue and len(queue) == 2
    # A job the caller refuses stays queued; the next acceptable one is taken.
    assert queue.pop_for(LINUX, lambda job: job is not jobs[1]) is jobs[2]
    assert jobs[1] in queue
    assert queue.pop_for(LINUX, lambda job: False) is None
    assert drain(queue) == [jobs[1]]


def test_requeued_job_is_taken_once() -> None:
    queue = JobQueue(fairness_share=0.5)
    job, other = make_job(0), make_job(1)
    queue.push(job)
    queue.push(other)
    assert queue.pop_for(LINUX) is job
    queue.push(job)  # back in the queue (its bot went away)
    queue.push(job)  # pushing twice is harmless
    assert len(queue) == 2
    assert sorted(drain(queue), key=lambda j: j.seq) == [job, other]
    assert len(queue) == 0


def test_the_queue_picks_what_the_core_says() -> None:
    """Random queues and bots: each pick is `rules.matching.pick` over the queued jobs
    (with the fairness share the core counts), whatever the grouping and heaps do."""
    chooser = random.Random(14)
    keys = [("OSFamily", "linux"), ("OSFamily", "windows"), ("ISA", "x86-64"),
            ("ISA", "aarch64"), ("pool", "big")]
    for share in (0.0, 0.25, 0.5):
        queue = JobQueue(fairness_share=share)
        fairness = Fairness(share)
        queued: list[JobRecord] = []
        for _ in range(300):
            if chooser.random() < 0.55:
                job = make_job(chooser.randint(-3, 3),
                               frozenset(chooser.sample(keys, chooser.randint(0, 2))))
                queue.push(job)
                queued.append(job)
                continue
            bot = frozenset(chooser.sample(keys, chooser.randint(1, 4)))
            refused = {job.id for job in queued if chooser.random() < 0.1}

            def eligible(job: JobRecord, refused: set[str] = refused) -> bool:
                return job.id not in refused

            oldest_first = fairness.next_batch(1)[1]
            expected = pick(queued, bot, oldest_first=oldest_first, eligible=eligible)
            taken = queue.pop_for(bot, eligible)
            assert taken is expected
            if taken is not None:
                fairness.picked(1)
                queued.remove(taken)
        assert len(queue) == len(queued)


def test_the_fair_queue_picks_what_the_core_says() -> None:
    """Random builds, running counts that go up and down, limits, refusals: each pick
    is `rules.matching.pick_fairly` over the queued jobs."""
    chooser = random.Random(27)
    keys = [("OSFamily", "linux"), ("ISA", "x86-64"), ("pool", "big")]
    names = ["ci", "laptop", "nightly", "release", ""]
    for share, limit in ((0.0, None), (0.25, None), (0.0, 3), (0.1, 2)):
        running: dict[str, int] = {}
        count = running.get  # (bound to this round's counts)

        def runs(build: str, count: Callable[[str, int], int] = count) -> int:
            return count(build, 0)

        queue = JobQueue(fairness_share=share, running=runs, limit=limit)
        fairness = Fairness(share)
        queued: list[JobRecord] = []
        started: list[JobRecord] = []
        for _ in range(400):
            roll = chooser.random()
            if roll < 0.45:
                job = make_job(chooser.choice((-100, 0, 0, 50)),
                               frozenset(chooser.sample(keys, chooser.randint(0, 1))))
                job.builds = set(chooser.sample(names, chooser.choice((1, 1, 2))))
                queue.push(job)
                queued.append(job)
                continue
            if roll < 0.6 and started:  # one ends: its builds run one fewer
                ended = started.pop(chooser.randrange(len(started)))
                for build in ended.builds:
                    running[build] -= 1
                    queue.build_changed(build)
                continue
            bot = frozenset(chooser.sample(keys, chooser.randint(1, 3)))
            refused = {job.id for job in queued if chooser.random() < 0.05}

            def eligible(job: JobRecord, refused: set[str] = refused) -> bool:
                return job.id not in refused

            oldest_first = fairness.next_batch(1)[1]
            expected = pick_fairly(queued, bot, oldest_first=oldest_first,
                                   running=runs, limit=limit,
                                   eligible=eligible)
            taken = queue.pop_for(bot, eligible)
            assert taken is expected, (share, limit)
            if taken is not None:
                fairness.picked(1)
                queued.remove(taken)
                started.append(taken)
                for build in taken.builds:
                    running[build] = running.get(build, 0) + 1
        assert len(queue) == len(queued)
