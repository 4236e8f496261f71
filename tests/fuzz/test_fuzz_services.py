"""Property tests: random requests to every RPC of every service get a defined answer.

A real `buildfleet serve` process (three instances: disk, memory, cache-only) is
seeded with blobs, trees, actions, action results, operations, bot sessions and
leases; then hypothesis sends it well-typed random requests for every method
(CAS, ByteStream, ActionCache, Capabilities, Execution, Operations, Bots
including PostBotEventTemp) and raw random bytes as request bodies.  Every
answer must be a defined status code with a clean message (never INTERNAL,
UNKNOWN or DATA_LOSS, never a traceback), the process must stay up, its log
must hold no traceback, and the seeded data must read back intact at the end.
The number of requests is set in conftest.py (10,000 by default).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .conftest import BATCH, FUZZ_REQUESTS, INSTANCES, FuzzTarget, fuzzing
from .fuzz_engine import BUG_IN_LOG, METHODS, Call, RequestStrategies, check_protected

TYPED_SHARE = 0.7  # of FUZZ_REQUESTS; the rest are raw bytes

pytestmark = pytest.mark.fuzz


def _send(target: FuzzTarget, calls: list[Call]) -> None:
    problems = target.harness.send_all(calls)
    assert not problems, "\n".join(problems)
    assert target.server.running(), target.server.output()[-3000:]


def test_well_typed_requests_get_defined_statuses(fuzz_target: FuzzTarget) -> None:
    requests = RequestStrategies(fuzz_target.pool)
    typed = st.one_of([requests.typed(method) for method in METHODS])

    @fuzzing(TYPED_SHARE)
    @given(st.lists(typed, min_size=BATCH, max_size=BATCH))
    def property_(calls: list[Call]) -> None:
        _send(fuzz_target, calls)

    property_()


def test_raw_bytes_get_defined_statuses(fuzz_target: FuzzTarget) -> None:
    requests = RequestStrategies(fuzz_target.pool)
    junk = st.one_of([requests.junk(method) for method in METHODS])

    @fuzzing(1 - TYPED_SHARE)
    @given(st.lists(junk, min_size=BATCH, max_size=BATCH))
    def property_(calls: list[Call]) -> None:
        _send(fuzz_target, calls)

    property_()


def test_server_is_up_and_stored_data_intact(fuzz_target: FuzzTarget) -> None:
    harness = fuzz_target.harness
    assert fuzz_target.server.running()
    differences = harness.run(check_protected(harness.channel, INSTANCES,
                                              fuzz_target.protected))
    assert not differences, differences
    assert harness.sent >= FUZZ_REQUESTS, (harness.sent, harness.counts)
    # Every method was exercised, typed and raw.
    assert set(harness.by_method) == {m.name for m in METHODS}, harness.by_method
    assert min(harness.by_method.values()) >= FUZZ_REQUESTS // (4 * len(METHODS)), \
        harness.by_method
    log = fuzz_target.server.output().splitlines()
    bugs = [index for index, line in enumerate(log) if BUG_IN_LOG.search(line)]
    assert not bugs, "the server logged:\n" + "\n".join(
        "\n".join(log[max(0, index - 2):index + 25]) for index in bugs[:3])
    print(f"fuzz: {harness.sent} requests; by status {dict(harness.counts.most_common())}")
    for (method, code), count in sorted(harness.by_method_code.items()):
        sample = harness.samples.get((method, code), "")
        print(f"  {method:20} {code:22} {count:6}  {sample[:90]}")
