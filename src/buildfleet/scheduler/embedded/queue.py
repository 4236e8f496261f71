"""The embedded strategy's index of queued jobs.

It answers `rules.matching.pick_fairly` (or `pick`, with fair-builds off) without
looking at every job.  Jobs with the same requirement set share a `_Platform`;
in it, each build waiting for a job has a heap of its jobs in urgency order, and
a ranking heap orders the builds by load (`rules.matching.fair_order` of their
most urgent job); an age heap serves the `Fairness` picks that take the oldest
job.  A bot looks at every platform whose requirements it satisfies: a few, not
one per job.

Everything is lazy.  A removed job stays in the heaps until it surfaces, and is
skipped then.  A ranking entry is checked against the build's load when it
surfaces: a build whose load has grown since is put back at its current place;
one whose load shrinks (an action of it ended, a more urgent job came) gets a
fresh entry at once (`build_changed`, `push`).  A ranking that has grown much
larger than its builds is rebuilt.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from buildfleet.scheduler.embedded.records import JobRecord
from buildfleet.scheduler.model import Properties
from buildfleet.scheduler.rules.matching import Fairness, age, build_load, satisfies, urgency

SCAN_LIMIT = 32  # how deep one build's heap is searched for a job `accept` admits


def _no_builds_running(build: str) -> int:
    return 0


@dataclass
class _Build:
    """The queued jobs of one build on one platform, most urgent first."""

    by_priority: list[tuple[int, int, int, JobRecord]] = field(default_factory=list)


@dataclass
class _Platform:
    requirements: Properties
    members: set[JobRecord] = field(default_factory=set)
    by_age: list[tuple[int, JobRecord]] = field(default_factory=list)
    builds: dict[str, _Build] = field(default_factory=dict)
    # (load, priority, seq of the head, entry id, build); a build's live entry is the
    # one `ranked` names, any other of its entries is dropped when it surfaces
    ranking: list[tuple[float, int, int, int, str]] = field(default_factory=list)
    ranked: dict[str, tuple[tuple[float, int, int], int]] = field(default_factory=dict)


def _valid(platform: _Platform, entry: tuple[int, int, int, JobRecord]) -> bool:
    job = entry[-1]
    return job in platform.members and entry[0] == job.priority


def _head(platform: _Platform, build: _Build) -> JobRecord | None:
    """The build's most urgent queued job (dropping stale entries on the way)."""
    heap = build.by_priority
    while heap and not _valid(platform, heap[0]):
        heapq.heappop(heap)
    return heap[0][-1] if heap else None


def _scan(platform: _Platform, heap: list[Any], accept: Callable[[JobRecord], bool],
          by_age: bool) -> JobRecord | None:
    """The first job of `heap` that `accept` admits, looking at most SCAN_LIMIT deep."""
    skipped: list[Any] = []
    found: JobRecord | None = None
    while heap and len(skipped) < SCAN_LIMIT:
        entry = heap[0]
        job = entry[-1]
        if job not in platform.members or (not by_age and entry[0] != job.priority):
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
    """Queued jobs of one instance.  `running(build)`: how many actions a build runs
    now (None: builds are not told apart, the order is urgency alone); `limit`: the
    most a build may run (None: no limit)."""

    def __init__(self, fairness_share: float = 0.1, *,
                 running: Callable[[str], int] | None = None,
                 limit: int | None = None) -> None:
        self._platforms: dict[Properties, _Platform] = {}
        self._size = 0
        self.fairness = Fairness(fairness_share)
        self.fair = running is not None
        self.running = running or _no_builds_running
        self.limit = limit

    def __len__(self) -> int:
        return self._size

    def __contains__(self, job: JobRecord) -> bool:
        platform = self._platforms.get(job.requirements)
        return platform is not None and job in platform.members

    def _builds_of(self, job: JobRecord) -> list[str]:
        if not self.fair:
            return [""]
        return sorted(job.builds) or [""]

    def _key(self, name: str, head: JobRecord) -> tuple[float, int, int]:
        load = build_load(self.running(name), head.priority) if self.fair else 0.0
        return load, head.priority, head.seq

    def _enter(self, platform: _Platform, name: str, key: tuple[float, int, int]) -> None:
        entry = next(_tiebreak)
        platform.ranked[name] = (key, entry)
        heapq.heappush(platform.ranking, (*key, entry, name))

    def _rank(self, platform: _Platform, name: str) -> None:
        """Call when build `name`'s place on `platform` may have moved forward (a job
        came, its load went down): a fresh entry if it did.  A place that moved back
        is found out when its entry surfaces."""
        build = platform.builds.get(name)
        head = None if build is None else _head(platform, build)
        if head is None:
            platform.builds.pop(name, None)
            platform.ranked.pop(name, None)
            return
        key = self._key(name, head)
        live = platform.ranked.get(name)
        if live is not None and live[0] <= key:
            return
        self._enter(platform, name, key)
        if len(platform.ranking) > 2 * len(platform.builds) + 64:
            self._rebuild_ranking(platform)

    def _rebuild_ranking(self, platform: _Platform) -> None:
        platform.ranking, platform.ranked = [], {}
        for name in list(platform.builds):
            head = _head(platform, platform.builds[name])
            if head is None:
                del platform.builds[name]
                continue
            key = self._key(name, head)
            entry = next(_tiebreak)
            platform.ranked[name] = (key, entry)
            platform.ranking.append((*key, entry, name))
        heapq.heapify(platform.ranking)

    def push(self, job: JobRecord) -> None:
        platform = self._platforms.get(job.requirements)
        if platform is None:
            platform = self._platforms[job.requirements] = _Platform(job.requirements)
        if job in platform.members:
            return
        platform.members.add(job)
        self._size += 1
        heapq.heappush(platform.by_age, (*age(job), job))
        for name in self._builds_of(job):
            self._file(platform, name, job)

    def _file(self, platform: _Platform, name: str, job: JobRecord) -> None:
        build = platform.builds.setdefault(name, _Build())
        heapq.heappush(build.by_priority, (*urgency(job), next(_tiebreak), job))
        self._rank(platform, name)

    def joined(self, job: JobRecord, build: str) -> None:
        """Call after `build` starts waiting for the queued `job` too."""
        platform = self._platforms.get(job.requirements)
        if self.fair and platform is not None and job in platform.members:
            self._file(platform, build, job)

    def reprioritize(self, job: JobRecord) -> None:
        """Call after lowering `job.priority` (more urgent) while it is queued."""
        platform = self._platforms.get(job.requirements)
        if platform is not None and job in platform.members:
            for name in self._builds_of(job):
                self._file(platform, name, job)

    def build_changed(self, build: str) -> None:
        """Call after a build's running actions went down (one ended or went back)."""
        if not self.fair:
            return
        for platform in self._platforms.values():
            if build in platform.builds:
                self._rank(platform, build)

    def remove(self, job: JobRecord) -> bool:
        platform = self._platforms.get(job.requirements)
        if platform is None or job not in platform.members:
            return False
        platform.members.discard(job)
        self._size -= 1
        if not platform.members:
            del self._platforms[job.requirements]
        return True

    def _under_limit(self, name: str) -> bool:
        return self.limit is None or self.running(name) < self.limit

    def _fair_candidate(self, platform: _Platform, accept: Callable[[JobRecord], bool]
                        ) -> tuple[tuple[float, int, int], JobRecord] | None:
        """The best job of `platform` in the fair order, with its order key.  Builds
        are visited in ranking order until no later one can hold a better job (a
        build's jobs come after its head)."""
        skipped: list[tuple[float, int, int, int, str]] = []
        found: tuple[tuple[float, int, int], JobRecord] | None = None
        ranking = platform.ranking
        while ranking and (found is None or ranking[0][:3] < found[0]):
            entry = heapq.heappop(ranking)
            name = entry[4]
            live = platform.ranked.get(name)
            if live is None or live[1] != entry[3]:
                continue  # an entry that a newer one of its build replaced
            build = platform.builds.get(name)
            head = None if build is None else _head(platform, build)
            if build is None or head is None:
                platform.builds.pop(name, None)
                platform.ranked.pop(name, None)
                continue
            running = self.running(name)
            key = self._key(name, head)
            if key != entry[:3]:  # its place moved: back in at the new one
                self._enter(platform, name, key)
                continue
            skipped.append(entry)
            if self.limit is not None and running >= self.limit:
                continue
            job = head if accept(head) else _scan(platform, build.by_priority, accept,
                                                  by_age=False)
            if job is None:
                continue
            key = (build_load(running, job.priority) if self.fair else 0.0,
                   job.priority, job.seq)
            if found is None or key < found[0]:
                found = (key, job)
        for entry in skipped:
            heapq.heappush(ranking, entry)
        return found

    def _oldest_candidate(self, platform: _Platform, accept: Callable[[JobRecord], bool]
                          ) -> JobRecord | None:
        def admitted(job: JobRecord) -> bool:
            return accept(job) and any(self._under_limit(b) for b in self._builds_of(job))

        return _scan(platform, platform.by_age, admitted, by_age=True)

    def pop_for(self, properties: Properties,
                accept: Callable[[JobRecord], bool] = lambda job: True) -> JobRecord | None:
        """Remove and return the job a bot with `properties` should run next."""
        oldest_first = self.fairness.next_batch(1)[1]
        best: JobRecord | None = None
        best_key: tuple[Any, ...] | None = None
        for requirements, platform in self._platforms.items():
            if not satisfies(properties, requirements):
                continue
            if oldest_first:
                job = self._oldest_candidate(platform, accept)
                key: tuple[Any, ...] | None = None if job is None else age(job)
            else:
                candidate = self._fair_candidate(platform, accept)
                job, key = (None, None) if candidate is None else (candidate[1], candidate[0])
            if job is not None and key is not None and (best_key is None or key < best_key):
                best, best_key = job, key
        if best is not None:
            self.fairness.picked(1)  # only assignments count towards the fairness share
            self.remove(best)
        return best

    def groups(self) -> Iterator[tuple[Properties, set[JobRecord]]]:
        for requirements, platform in self._platforms.items():
            yield requirements, platform.members

    def jobs(self) -> Iterator[JobRecord]:
        for platform in self._platforms.values():
            yield from platform.members


_tiebreak = itertools.count()
