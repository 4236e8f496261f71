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


PUBLIC_LIST = ROOT / "tests" / "data" / "public_proto_fields.txt"
PUBLIC_MODULES = [
    "build.bazel.remote.execution.v2.remote_execution_pb2",
    "build.bazel.semver.semver_pb2",
    "build.bazel.remote.logstream.v1.remote_logstream_pb2",
    "build.bazel.remote.asset.v1.remote_asset_pb2",
    "google.bytestream.bytestream_pb2",
    "google.devtools.remoteworkers.v1test2.bots_pb2",
    "google.devtools.remoteworkers.v1test2.command_pb2",
    "google.devtools.remoteworkers.v1test2.worker_pb2",
]
Members = dict[str, set[tuple[str, str]]]


def _public_definitions() -> Members:
    listed: Members = {}
    current: set[tuple[str, str]] = set()
    for line in PUBLIC_LIST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("  "):
            current.add(tuple(line.split(maxsplit=1)))  # type: ignore[arg-type]
        else:
            current = listed.setdefault(line, set())
    return listed


def _generated_definitions() -> Members:
    import importlib

    from google.protobuf.descriptor import Descriptor

    found: Members = {}

    def message(descriptor: Descriptor) -> None:
        found[f"message {descriptor.full_name}"] = {
            (str(f.number), f.name) for f in descriptor.fields}
        for enum in descriptor.enum_types:
            found[f"enum {enum.full_name}"] = {(str(v.number), v.name) for v in enum.values}
        for nested in descriptor.nested_types:
            message(nested)

    for name in PUBLIC_MODULES:
        file = importlib.import_module(f"buildfleet._proto.{name}").DESCRIPTOR
        for descriptor in file.message_types_by_name.values():
            message(descriptor)
        for enum in file.enum_types_by_name.values():
            found[f"enum {enum.full_name}"] = {(str(v.number), v.name) for v in enum.values}
        for service in file.services_by_name.values():
            found[f"service {service.full_name}"] = {("rpc", m.name) for m in service.methods}
    return found


def test_every_public_message_field_and_number_is_generated() -> None:
    public = _public_definitions()
    generated = _generated_definitions()
    for services in (public, generated):  # methods are listed by name only
        for key, members in services.items():
            if key.startswith("service "):
                services[key] = {("rpc", member[-1]) for member in members}
    assert sorted(set(public) - set(generated)) == [], "public definitions not generated"
    assert sorted(set(generated) - set(public)) == [], "generated but not public"
    differences = {key: (sorted(public[key] - generated[key]),
                         sorted(generated[key] - public[key]))
                   for key in public if public[key] != generated[key]}
    assert differences == {}, "(missing or renumbered, not in the public definition)"
