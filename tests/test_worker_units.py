"""Smaller pieces of the bot: output collection, backoff, configuration parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.worker.config import parse_properties, parse_server, with_defaults
from buildfleet.worker.health import check_health
from buildfleet.worker.inputs import check_command
from buildfleet.worker.outputs import collect_outputs
from buildfleet.worker.session import Backoff


def test_outputs_behind_a_symlink_out_of_the_root_are_not_read(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "f").write_text("do not upload")
    os.symlink(outside, root / "out")  # the command replaced out/ by a symlink
    (root / "fine").write_text("ok")
    outputs = check_command(re_pb2.Command(arguments=["x"],
                                           output_paths=["out/secret", "out/secret/f", "fine"]))
    collected = collect_outputs(root, root, outputs)
    assert [f.path for f in collected.result.output_files] == ["fine"]
    assert not collected.result.output_directories
    assert len(collected.skipped) == 2 and all("outside" in s for s in collected.skipped)
    assert all(not str(p).startswith(str(outside)) for p in collected.blobs.values()
               if isinstance(p, Path))


def test_legacy_outputs_of_the_wrong_kind_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "is-a-dir").mkdir()
    (tmp_path / "is-a-file").write_text("x")
    outputs = check_command(re_pb2.Command(arguments=["x"], output_files=["is-a-dir"],
                                           output_directories=["is-a-file", "missing"]))
    collected = collect_outputs(tmp_path, tmp_path, outputs)
    result = collected.result
    assert not result.output_files and not result.output_directories
    assert len(collected.skipped) == 2


def test_whole_working_directory_as_output(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    outputs = check_command(re_pb2.Command(arguments=["x"], output_directories=[""]))
    collected = collect_outputs(tmp_path, tmp_path, outputs)
    (directory,) = collected.result.output_directories
    assert directory.path == ""


def test_backoff_grows_to_a_cap_with_jitter() -> None:
    backoff = Backoff(cap=2.0, first=0.1)
    delays = [backoff.next() for _ in range(12)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert delays[0] <= 0.1 and max(delays[-4:]) > 0.9
    assert len(set(delays)) > 1
    backoff.reset()
    assert backoff.next() <= 0.1


def test_configuration_parsing() -> None:
    assert parse_server("grpc://host:1234") == ("host:1234", False)
    assert parse_server("grpcs://host:443/") == ("host:443", True)
    assert parse_server("10.0.0.1:50051") == ("10.0.0.1:50051", False)
    assert parse_server("unix:/run/bf.sock") == ("unix:/run/bf.sock", False)
    with pytest.raises(ValueError):
        parse_server("ftp://host:1")
    assert parse_properties(["a=b", "empty=", "x=y=z"]) == [("a", "b"), ("empty", ""),
                                                             ("x", "y=z")]
    with pytest.raises(ValueError):
        parse_properties(["novalue"])
    merged = with_defaults([("OSFamily", "freebsd"), ("pool", "a"), ("pool", "b")])
    assert ("OSFamily", "freebsd") in merged and ("pool", "b") in merged
    assert [k for k, _ in merged].count("OSFamily") == 1
    assert [k for k, _ in merged].count("ISA") == 1


def test_health_check(tmp_path: Path) -> None:
    assert check_health([tmp_path], 0) is None
    assert "below the floor" in (check_health([tmp_path], 1 << 62) or "")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not a directory" in (check_health([blocker], 0) or "")
