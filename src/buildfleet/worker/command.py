"""`buildfleet bot`: the command line of the bot (added to the `buildfleet` group)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

DEFAULT_WORK_DIR = Path("buildfleet-bot")


def _bytes(value: str, option: str) -> int:
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 10GiB, 500MB, 1048576)",
                                 param_hint=option) from None


@click.command("bot")
@click.option("--server", required=True, metavar="URL",
              help="The Bots service: grpc://HOST:PORT (grpcs:// for TLS).")
@click.option("--cas", default=None, metavar="URL",
              help="The CAS and ByteStream service, if not the server.")
@click.option("--instance", default="", show_default=True,
              help="Instance name to register under (also used for the CAS).")
@click.option("--bot-id", default=None, help="Default: the host name plus a unique suffix.")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE",
              help="A platform property (repeatable). OSFamily and ISA default to the "
                   "machine's (e.g. OSFamily=linux, ISA=x86-64) unless given.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1),
              help="Actions run at once (the worker's capacity).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=DEFAULT_WORK_DIR,
              show_default=True, help="Actions run in fresh directories under DIR/actions.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Local cache of input files (default WORK_DIR/cache; keep it on the same "
                   "file system as the work dir so inputs are hard-linked).")
@click.option("--cache-size", default="10GiB", show_default=True, metavar="BYTES",
              help="Bound of the local cache (least recently used files are evicted).")
@click.option("--drain-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds running actions get to finish after SIGTERM/SIGINT.")
@click.option("--default-timeout", default=3600.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds an action may run when it sets no timeout.")
@click.option("--poll-timeout", default=60.0, show_default=True,
              type=click.FloatRange(min=1),
              help="Deadline of each UpdateBotSession long-poll, in seconds.")
@click.option("--min-free-space", default="0", show_default=True, metavar="BYTES",
              help="Report UNHEALTHY (take no work) while less is free in the work or "
                   "cache dir.")
@click.option("--health-interval", default=10.0, show_default=True,
              type=click.FloatRange(min=0.01), help="Seconds between health checks.")
@click.option("--allow-outside-symlinks", is_flag=True,
              help="Accept input symlinks that point outside the input root.")
@click.option("--reconnect-max-delay", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Cap of the reconnection backoff, in seconds.")
@click.option("--tls-ca", type=click.Path(path_type=Path), default=None,
              help="PEM certificates to verify the server (and the CAS) by; implies TLS.")
@click.option("--client-cert", type=click.Path(path_type=Path), default=None,
              help="PEM certificate chain for mutual TLS (with --client-key).")
@click.option("--client-key", type=click.Path(path_type=Path), default=None,
              help="PEM private key of --client-cert.")
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="A file holding a bearer token for every call; re-read when it changes.")
@click.option("--sandbox", "sandbox_kind", default="bwrap", show_default=True,
              type=click.Choice(["bwrap", "chroot", "none"]),
              help="Run each action in a bubblewrap sandbox (checked at start-up), in one "
                   "whose / is the action's input root (chroot: whole-system actions such as "
                   "BuildStream's), or unsandboxed (none).")
@click.option("--allow-network", is_flag=True,
              help="Give actions that ask for it (platform property network=on) the "
                   "network; advertises network=on.  Others never have it.")
@click.option("--sandbox-path", "sandbox_paths", multiple=True, metavar="PATH",
              help="Another host path visible read-only in the sandbox (repeatable), "
                   "besides /usr, /bin, /sbin, /lib* and /etc.")
@click.option("--memory-limit", default=None, metavar="BYTES",
              help="Memory each action may use (and the most one may ask for with the "
                   "platform property memory=...); default: unlimited.")
@click.option("--pids-limit", default=None, type=click.IntRange(min=1), metavar="N",
              help="Processes each action may have at once (and the most one may ask for "
                   "with pids=...); default: unlimited.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def bot(server: str, cas: str | None, instance: str, bot_id: str | None,
        properties: tuple[str, ...], concurrency: int, work_dir: Path, cache_dir: Path | None,
        cache_size: str, drain_timeout: float, default_timeout: float, poll_timeout: float,
        min_free_space: str, health_interval: float, allow_outside_symlinks: bool,
        reconnect_max_delay: float, tls_ca: Path | None, client_cert: Path | None,
        client_key: Path | None, token_file: Path | None, sandbox_kind: str,
        allow_network: bool, sandbox_paths: tuple[str, ...], memory_limit: str | None,
        pids_limit: int | None, log_level: str) -> None:
    """Run a bot: take leases from the server, run them, report the results."""
    from buildfleet.client.credentials import ClientCredentials
    from buildfleet.worker.config import (
        BotConfig,
        default_bot_id,
        parse_properties,
        parse_server,
        with_defaults,
    )
    from buildfleet.worker.limits import Limits
    from buildfleet.worker.sandbox import Kind, SandboxConfig, advertised
    from buildfleet.worker.session import BotError, run_bot

    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        parse_server(server)
        if cas:
            parse_server(cas)
        pairs = parse_properties(properties)
        credentials = ClientCredentials(tls_ca=tls_ca, client_cert=client_cert,
                                        client_key=client_key, token_file=token_file)
        credentials.check()
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    for path in sandbox_paths:
        if not path.startswith("/"):
            raise click.BadParameter(f"{path!r} is not an absolute path",
                                     param_hint="--sandbox-path")
    # Nothing of the bot's own is visible to actions, wherever it lies.
    hidden = tuple(p.resolve() for p in (work_dir, cache_dir, tls_ca, client_cert, client_key,
                                         token_file, Path.home()) if p is not None)
    sandbox = SandboxConfig(Kind(sandbox_kind), allow_network=allow_network,
                            extra_paths=sandbox_paths, hidden=hidden)
    # The sandbox's properties are the bot's to state: they replace any given.
    own = dict(advertised(sandbox))
    pairs = [(key, value) for key, value in pairs if key not in own] + list(own.items())
    config = BotConfig(
        server=server, cas=cas, instance=instance, bot_id=bot_id or default_bot_id(),
        properties=with_defaults(pairs), concurrency=concurrency, work_dir=work_dir,
        cache_dir=cache_dir, cache_size=_bytes(cache_size, "--cache-size"),
        drain_timeout=drain_timeout, default_timeout=default_timeout,
        poll_timeout=poll_timeout, min_free_space=_bytes(min_free_space, "--min-free-space"),
        health_interval=health_interval, allow_outside_symlinks=allow_outside_symlinks,
        reconnect_max_delay=reconnect_max_delay, credentials=credentials, sandbox=sandbox,
        limits=Limits(memory=_bytes(memory_limit, "--memory-limit") if memory_limit else None,
                      pids=pids_limit))
    try:
        code = asyncio.run(run_bot(config))
    except BotError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(code)
