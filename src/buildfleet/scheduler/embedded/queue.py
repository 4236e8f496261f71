"""The embedded strategy's index of queued jobs, grouped by platform requirements.

It answers `rules.matching.pick` without looking at every job: jobs with the
same requirement set share a group with two heaps, one in the core's urgency
order and one in its age order; a bot takes from every group whose
requirements it satisfies, and `rules.matching.Fairness` says which order each
pick uses.  Removal is lazy: stale heap entries are skipped when they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from buildfleet.scheduler.embedded.records import JobRecord
from buildfleet.scheduler.model import Properties
from buildfleet.scheduler.rules.matching import Fairness, age, satisfies, urgency


@dataclass
class _Group:
    requirements: Properties
    members: set[JobRecord] = field(default_factory=set)
    by_priority: list[tuple[int, int, int, JobRecord]] = field(default_factory=list)
    by_age: list[tuple[int, JobRecord]] = field(default_factory=list)

    def _valid(self, job: JobRecord, priority: int | None = None) -> bool:
        return job in self.members and (priority is None or priority == job.priority)

    def candidates(self, oldest_first: bool, accept: Callable[[JobRecord], bool],
                   scan_limit: int = 32) -> JobRecord | None:
        """The best member that `accept` admits, looking at most `scan_limit` deep."""
        heap: list[Any] = self.by_age if oldest_first else self.by_priority
        skipped: list[Any] = []
        found: JobRecord | None = None
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
        self.fairness = Fairness(fairness_share)

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: JobRecord) -> bool:
        group = self._groups.get(job.requirements)
        return group is not None and job in group.members

    def push(self, job: JobRecord) -> None:
        group = self._groups.get(job.requirements)
        if group is None:
            group = self._groups[job.requirements] = _Group(job.requirements)
        if job not in group.members:
            group.members.add(job)
            self._size += 1
            heapq.heappush(group.by_age, (*age(job), job))
            heapq.heappush(group.by_priority, (*urgency(job), next(_tiebreak), job))

    def reprioritize(self, job: JobRecord) -> None:
        """Call after lowering `job.priority` (more urgent) while it is queued."""
        group = self._groups.get(job.requirements)
        if group is not None and job in group.members:
            heapq.heappush(group.by_priority, (*urgency(job), next(_tiebreak), job))

    def remove(self, job: JobRecord) -> bool:
        group = self._groups.get(job.requirements)
        if group is None or job not in group.members:
            return False
        group.members.discard(job)
        self._size -= 1
        if not group.members:
            del self._groups[job.requirements]
        return True

    def pop_for(self, properties: Properties,
                accept: Callable[[JobRecord], bool] = lambda job: True) -> JobRecord | None:
        """Remove and return the job a bot with `properties` should run next."""
        oldest_first = self.fairness.next_batch(1)[1]
        order = age if oldest_first else urgency
        best: JobRecord | None = None
        for requirements, group in self._groups.items():
            if not satisfies(properties, requirements):
                continue
            job = group.candidates(oldest_first, accept)
            if job is not None and (best is None or order(job) < order(best)):
                best = job
        if best is not None:
            self.fairness.picked(1)  # only assignments count towards the fairness share
            self.remove(best)
        return best

    def groups(self) -> Iterator[tuple[Properties, set[JobRecord]]]:
        for requirements, group in self._groups.items():
            yield requirements, group.members

    def jobs(self) -> Iterator[JobRecord]:
        for group in self._groups.values():
            yield from group.members


_tiebreak = itertools.count()
