"""The generated protocol modules must match proto/ (run scripts/gen_protos.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wire_names_match_the_public_definitions() -> None:
    from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2
    from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2

    assert remote_execution_pb2.DESCRIPTOR.package == "build.bazel.remote.execution.v2"
    assert remote_execution_pb2.DESCRIPTOR.name == (
        "build/bazel/remote/execution/v2/remote_execution.proto")
    bots = bots_pb2.DESCRIPTOR.services_by_name["Bots"]
    assert bots.full_name == "google.devtools.remoteworkers.v1test2.Bots"
    assert {m.name for m in bots.methods} == {
        "CreateBotSession", "UpdateBotSession", "PostBotEventTemp"}
    assert bots_pb2.BotStatus.Value("INITIALIZING") == 5
    lease = bots_pb2.Lease.DESCRIPTOR.fields_by_name
    assert (lease["id"].number, lease["payload"].number, lease["result"].number) == (7, 8, 9)
