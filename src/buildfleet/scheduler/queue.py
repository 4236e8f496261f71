"""The queue of jobs waiting for a bot, grouped by platform requirements.

Jobs with the same requirement set share a group; a bot can take from every
group whose requirements are a subset of its properties.  Within and across
groups the order is priority (lower first), then submission order; a share of
picks ignores priority and takes the oldest job, so low-priority work is never
starved.  Removal is lazy: stale heap entries are skipped when they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from buildfleet.scheduler.model import Job, Properties, Stage


@dataclass
class _Group:
    requirements: Properties
    members: set[Job] = field(default_factory=set)
    by_priority: list[tuple[int, int, int, Job]] = field(default_factory=list)
    by_age: list[tuple[int, Job]] = field(default_factory=list)

    def _valid(self, job: Job, priority: int | None = None) -> bool:
        return job in self.members and (priority is None or priority == job.priority)

    def candidates(self, oldest_first: bool, accept: Callable[[Job], bool],
                   scan_limit: int = 32) -> Job | None:
        """The best member that `accept` admits, looking at most `scan_limit` deep."""
        heap: list[Any] = self.by_age if oldest_first else self.by_priority
        skipped: list[Any] = []
        found: Job | None = None
        while heap and len(skipped) < scan_limit:
            entry = heap[0]
            job = entry[-1]
            valid = self._valid(job) if oldest_first else self._valid(job, entry[0])
            if not valid:
                heapq.heappop(heap)
                continue
            if accept(job):
                found = job
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


class JobQueue:
    """Queued jobs of one instance."""

    def __init__(self, fairness_share: float = 0.1) -> None:
        self._groups: dict[Properties, _Group] = {}
        self._size = 0
        self._picks = 0
        self._every = round(1 / fairness_share) if fairness_share > 0 else 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: Job) -> bool:
        group = self._groups.get(job.requirements)
        return group is not None and job in group.members

    def push(self, job: Job) -> None:
        group = self._groups.get(job.requirements)
        if group is None:
            group = self._groups[job.requirements] = _Group(job.requirements)
        if job not in group.members:
            group.members.add(job)
            self._size += 1
            heapq.heappush(group.by_age, (job.seq, job))
            heapq.heappush(group.by_priority, (job.priority, job.seq, next(_tiebreak), job))

    def reprioritize(self, job: Job) -> None:
        """Call after lowering `job.priority` (more urgent) while it is queued."""
        group = self._groups.get(job.requirements)
        if group is not None and job in group.members:
            heapq.heappush(group.by_priority, (job.priority, job.seq, next(_tiebreak), job))

    def remove(self, job: Job) -> bool:
        group = self._groups.get(job.requirements)
        if group is None or job not in group.members:
            return False
        group.members.discard(job)
        self._size -= 1
        if not group.members:
            del self._groups[job.requirements]
        return True

    def pop_for(self, properties: Properties,
                accept: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """Remove and return the job a bot with `properties` should run next."""
        oldest_first = self._every > 0 and (self._picks + 1) % self._every == 0
        best: Job | None = None
        for requirements, group in self._groups.items():
            if not requirements <= properties:
                continue
            job = group.candidates(oldest_first, accept)
            if job is None:
                continue
            if best is None or _key(job, oldest_first) < _key(best, oldest_first):
                best = job
        if best is not None:
            self._picks += 1  # only assignments count towards the fairness share
            self.remove(best)
        return best

    def groups(self) -> Iterator[tuple[Properties, set[Job]]]:
        for requirements, group in self._groups.items():
            yield requirements, group.members

    def jobs(self) -> Iterator[Job]:
        for group in self._groups.values():
            yield from group.members


_tiebreak = itertools.count()


def _key(job: Job, oldest_first: bool) -> tuple[int, ...]:
    return (job.seq,) if oldest_first else (job.priority, job.seq)


def is_queued(job: Job) -> bool:
    return job.stage == Stage.QUEUED and job.lease is None
