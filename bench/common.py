"""Shared pieces of the benchmarks: spawning a server, timing, reporting."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

LISTENING = re.compile(r"listening on (\S+)")


@contextlib.contextmanager
def spawned_server(extra_args: list[str] | None = None, config: str | None = None,
                   timeout: float = 30.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `buildfleet serve` on a free loopback port in a temporary data dir."""
    with tempfile.TemporaryDirectory(prefix="buildfleet-bench-") as tmp:
        args = [sys.executable, "-m", "buildfleet", "serve", "--listen", "127.0.0.1:0",
                "--data-dir", str(Path(tmp) / "data"), "--log-level", "info"]
        if config is not None:
            path = Path(tmp) / "config.yaml"
            path.write_text(config)
            args += ["--config", str(path)]
        args += extra_args or []
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            address = None
            while address is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start:\n" + log_path.read_text())
                match = LISTENING.search(log_path.read_text())
                if match:
                    address = match.group(1)
                else:
                    time.sleep(0.05)
            yield address, process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass(frozen=True)
class Credentials:
    """What a client of a secure benchmark server presents: the CA to trust, a token."""

    ca_pem: bytes
    token: str | None  # None: TLS only

    def get(self) -> str:
        assert self.token is not None
        return self.token

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        """A TLS channel sending the token the way `buildfleet bot` does."""
        from buildfleet.client.credentials import bearer_interceptors

        return grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=self.ca_pem),
            options=options,
            interceptors=bearer_interceptors(self) if self.token is not None else None)


def channel(address: str, credentials: Credentials | None,
            options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """A plaintext channel, or a TLS one with a bearer token."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return credentials.channel(address, options)


@contextlib.contextmanager
def secure_settings(roles: list[str], *, tokens: bool = True
                    ) -> Iterator[tuple[str, dict[str, Credentials]]]:
    """TLS and bearer-token settings for a benchmark server (a YAML fragment for its
    configuration), and per role the credentials of a client holding that role.
    Without `tokens`: TLS only, no authentication (to tell the two costs apart)."""
    from buildfleet.auth.pki import issue, new_ca
    from buildfleet.auth.tokens import digest, new_token

    with tempfile.TemporaryDirectory(prefix="buildfleet-bench-keys-") as tmp:
        root = Path(tmp)
        ca = new_ca()
        issue(ca, "bench server", server_names=["localhost", "127.0.0.1"]).write(
            root / "server.pem", root / "server.key")
        made = {role: new_token() for role in roles}
        (root / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
            {"sha256": digest(token),
             "principal": f"bench-{role}", "grants": [role]}
            for role, token in made.items()]}))
        config: dict[str, object] = {
            "tls": {"cert": str(root / "server.pem"), "key": str(root / "server.key")}}
        if tokens:
            config["auth"] = {"tokens-file": str(root / "tokens.yaml")}
        yield yaml.safe_dump(config), {
            role: Credentials(ca.cert_pem, token if tokens else None)
            for role, token in made.items()}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--instance, and --target / --server-pid to measure a server already running."""
    parser.add_argument("--instance", default="")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: spawn one)")
    parser.add_argument("--server-pid", type=int,
                        help="with --target: the server's process id, to report its CPU time")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time a process has used so far (its own, not its
    children's), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc."""
    return sum(cpu_split(pid))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, figures: dict[str, object]) -> None:
    """One JSON line, then a human table."""
    print(json.dumps({"benchmark": name, **figures}, sort_keys=True))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key.ljust(width)}  {shown}")
