#!/usr/bin/env python3
"""The long fuzzing run: random requests to every RPC of every service, counted.

Starts `buildfleet serve` (three instances: disk, memory, cache-only -- the
configuration of tests/fuzz), seeds it like the property tests do, then sends
REQUESTS random requests through hypothesis (the strategies of
tests/fuzz/fuzz_engine.py): well-typed messages for every method and raw bytes
as request bodies, BATCH at a time.  At the end it checks that the server is
still up, that its log holds no traceback and that the seeded blobs and action
results read back intact.  Prints one JSON line and a table (requests, answers
by status code, duration, requests/s, problems); exits 1 if anything was wrong.

    python bench/fuzz.py --requests 100000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

import yaml  # noqa: E402
from common import report, rss_mib  # noqa: E402
from fuzz.conftest import CACHE_WRITABLE, INSTANCES, SERVER_CONFIG  # noqa: E402
from fuzz.fuzz_engine import (  # noqa: E402
    BUG_IN_LOG,
    Call,
    Harness,
    RequestStrategies,
    check_protected,
    seed_server,
)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from procutil import ServeProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=25, help="requests sent at once")
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--junk-share", type=int, default=4,
                        help="one request in N is raw bytes (default 4)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    with tempfile.TemporaryDirectory(prefix="buildfleet-fuzz-") as tmp:
        workdir = Path(tmp)
        set_hypothesis_home_dir(workdir / "hypothesis")  # not ./.hypothesis
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump(SERVER_CONFIG))
        with ServeProcess.start(workdir, data_dir=workdir / "data", config=config) as server:
            harness = Harness(server.address, alive=server.running)
            pool, protected = harness.run(seed_server(harness.channel, INSTANCES,
                                                      cache_writable=CACHE_WRITABLE))
            harness.pool = pool
            calls = RequestStrategies(pool).calls(junk_share=args.junk_share)
            examples = -(-args.requests // args.batch)

            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None,
                      phases=[Phase.generate], print_blob=True,
                      suppress_health_check=list(HealthCheck))
            @given(st.lists(calls, min_size=args.batch, max_size=args.batch))
            def fuzz(batch: list[Call]) -> None:
                harness.send_all(batch)  # problems are counted, not raised

            started = time.monotonic()
            fuzz()
            duration = time.monotonic() - started
            alive = server.running()
            differences = harness.run(check_protected(harness.channel, INSTANCES, protected)) \
                if alive else ["the server died"]
            log = server.output()
            bugs = [line for line in log.splitlines() if BUG_IN_LOG.search(line)]
            rss = rss_mib(server.pid) if alive else float("nan")
            harness.close()

    figures: dict[str, object] = {
        "requests": harness.sent,
        "seed": seed,
        "duration_s": round(duration, 1),
        "requests_per_s": round(harness.sent / duration, 1),
        "problems": len(harness.problems),
        "server_alive": alive,
        "stored_data_intact": not differences,
        "tracebacks_in_server_log": len(bugs),
        "server_rss_mib": round(rss, 1),
        "cores": os.cpu_count(),
    }
    for code, count in harness.counts.most_common():
        figures[f"status {code}"] = count
    report("fuzz", figures)
    for problem in harness.problems[:20]:
        print("PROBLEM:", problem)
    for difference in differences[:20]:
        print("DIFFERENCE:", difference)
    for line in bugs[:20]:
        print("SERVER LOG:", line)
    return 1 if harness.problems or differences or bugs or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
