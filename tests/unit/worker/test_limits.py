"""worker.limits as plain functions: what an action may ask for, and what it gets."""

from __future__ import annotations

import pytest

from buildfleet.errors import InvalidArgument
from buildfleet.worker.limits import Limits, human_bytes, requested

MiB = 1 << 20


def test_an_action_asks_for_limits_with_platform_properties() -> None:
    asked = requested([("OSFamily", "linux"), ("memory", "512MiB"), ("pids", "50")])
    assert asked == Limits(memory=512 * MiB, pids=50)
    assert requested([("OSFamily", "linux")]) == Limits()
    assert not Limits() and Limits(pids=1)


@pytest.mark.parametrize(("name", "value"), [("memory", "lots"), ("memory", "0"),
                                             ("pids", "-3"), ("pids", "many"), ("pids", "0")])
def test_a_malformed_limit_is_refused(name: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        requested([(name, value)])


def test_the_bots_limit_is_the_default_and_the_ceiling() -> None:
    bot = Limits(memory=1024 * MiB, pids=100)
    assert Limits().within(bot) == bot
    assert Limits(memory=64 * MiB).within(bot) == Limits(memory=64 * MiB, pids=100)
    assert Limits(memory=8192 * MiB, pids=1000).within(bot) == bot
    assert Limits(pids=5).within(Limits()) == Limits(pids=5)


def test_sizes_are_shown_in_the_largest_whole_unit() -> None:
    assert human_bytes(64 * MiB) == "64 MiB"
    assert human_bytes(2 << 30) == "2 GiB"
    assert human_bytes(1536) == "1536 bytes"
    assert human_bytes(1000) == "1000 bytes"
