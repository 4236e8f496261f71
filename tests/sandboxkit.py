"""Whether the bot's bubblewrap sandbox works here, for the tests that need it: they
skip, saying why, where it does not -- except in CI, where `.ci/run` installs
bubblewrap and sets BUILDFLEET_REQUIRE_SANDBOX=1, and a sandbox that does not work
fails them."""

from __future__ import annotations

import functools
import os

import pytest

from buildfleet.worker.sandbox import SandboxConfig, SandboxUnusable, check_bwrap

REQUIRED = os.environ.get("BUILDFLEET_REQUIRE_SANDBOX") == "1"


@functools.cache
def sandbox_problem() -> str | None:
    """Why the sandbox does not work here, or None when it does."""
    try:
        check_bwrap(SandboxConfig())
    except SandboxUnusable as error:
        return str(error)
    return None


def require_sandbox() -> None:
    """Skip the calling test where the sandbox does not work (fail it in CI)."""
    problem = sandbox_problem()
    if problem is None:
        return
    if REQUIRED:
        pytest.fail(f"BUILDFLEET_REQUIRE_SANDBOX=1 but the sandbox does not work: {problem}")
    pytest.skip(f"no sandbox here: {problem}")
