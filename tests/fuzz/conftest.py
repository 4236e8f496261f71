"""Hypothesis profiles and the server the property tests fuzz.

Profiles (settings for the fuzzing properties only; other tests are untouched):

- ``buildfleet-fuzz-ci`` (default): derandomized, so every run sends the same
  requests; no deadline (a request's time depends on the server, not on
  hypothesis); no example database; health checks about slow or large data off.
- ``buildfleet-fuzz-long``: the same with a fresh random seed each run (or the
  one in ``BUILDFLEET_FUZZ_SEED``), for long runs.

Either way the server's answers feed the pool of names later requests draw from
(sessions, leases, operations), so two runs send the same requests only as far
as those names go.

``BUILDFLEET_FUZZ_REQUESTS`` sets how many requests the properties send in all
(default 10,000); ``BUILDFLEET_FUZZ_PROFILE`` picks the profile.  The long run::

    BUILDFLEET_FUZZ_REQUESTS=100000 BUILDFLEET_FUZZ_PROFILE=buildfleet-fuzz-long \\
        .venv/bin/pytest tests/fuzz -p no:cacheprovider

(bench/fuzz.py does the same outside pytest and prints the figures.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from hypothesis import HealthCheck, seed, settings
from hypothesis.configuration import set_hypothesis_home_dir
from procutil import ServeProcess

from .fuzz_engine import Harness, Pool, Protected, seed_server

FUZZ_REQUESTS = int(os.environ.get("BUILDFLEET_FUZZ_REQUESTS", "10000"))
FUZZ_PROFILE = os.environ.get("BUILDFLEET_FUZZ_PROFILE", "buildfleet-fuzz-ci")
FUZZ_SEED = os.environ.get("BUILDFLEET_FUZZ_SEED", "")
BATCH = 25  # requests per hypothesis example, sent concurrently
F = TypeVar("F", bound=Callable[..., Any])

settings.register_profile(
    "buildfleet-fuzz-ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)
settings.register_profile("buildfleet-fuzz-long", parent=settings.get_profile(
    "buildfleet-fuzz-ci"), derandomize=False)

# Three instances: the default (disk, executing), one in memory offering PENDING
# leases with a name of two segments, and a read-only cache without execution.
INSTANCES = ["", "mem/inst", "cache-only"]
CACHE_WRITABLE = ["", "mem/inst"]
SERVER_CONFIG = {
    "instances": {
        "": {"scheduler": {"keepalive": 3600, "long-poll": 1, "busy-poll": 0.2,
                           "unmatched-timeout": 3600, "housekeeping-interval": 0.5,
                           "max-attempts": 3}},
        "mem/inst": {"cas": {"type": "memory", "max-size": "256MiB"},
                     "action-cache": {"type": "memory", "max-size": "16MiB"},
                     "scheduler": {"lease-offer": "pending", "keepalive": 3600,
                                   "long-poll": 1, "busy-poll": 0.2}},
        "cache-only": {"scheduler": {"enabled": False}, "allow-action-cache-updates": False,
                       "max-batch-total-size": "4MiB"},
    },
}


def fuzzing(share: float) -> Callable[[F], F]:
    """Decorate a @given property: the active profile, enough examples for `share` of
    the requests, and the seed from BUILDFLEET_FUZZ_SEED if there is one."""
    examples = max(1, -(-int(FUZZ_REQUESTS * share) // BATCH))

    def decorate(test: F) -> F:
        test = settings(settings.get_profile(FUZZ_PROFILE), max_examples=examples)(test)
        if FUZZ_SEED:
            test = seed(int(FUZZ_SEED))(test)
        return test

    return decorate


@pytest.fixture(scope="session", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hypothesis keeps caches under ./.hypothesis unless told otherwise: a temp dir."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))


@dataclass
class FuzzTarget:
    server: ServeProcess
    harness: Harness
    pool: Pool
    protected: Protected


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """A `buildfleet serve` process with seeded data, and a harness to fuzz it."""
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(SERVER_CONFIG))
    with ServeProcess.start(workdir, data_dir=workdir / "data", config=config) as server:
        harness = Harness(server.address, alive=server.running)
        try:
            pool, protected = harness.run(seed_server(harness.channel, INSTANCES,
                                                      cache_writable=CACHE_WRITABLE))
            harness.pool = pool
            yield FuzzTarget(server, harness, pool, protected)
        finally:
            harness.close()

