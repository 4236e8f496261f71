"""`buildfleet bots ...` and `buildfleet queues`: the operator's commands, over the
Admin API (buildfleet.admin.v1) of a running server.  Aligned tables by default,
`--json` for scripts; a refused or failed call exits 1 with the server's message."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_SERVER = "grpc://127.0.0.1:50051"
TIMEOUT = 30.0


def connection_options(command: F) -> F:
    """The options every admin command takes: where the server is and how to reach it."""
    options = [
        click.option("--server", default=DEFAULT_SERVER, show_default=True, metavar="URL",
                     help="The server: grpc://HOST:PORT, or grpcs:// for TLS."),
        click.option("--instance", default="", show_default=True, help="Instance name."),
        click.option("--tls-ca", type=click.Path(path_type=Path), default=None,
                     help="PEM certificates to verify the server by; implies TLS."),
        click.option("--client-cert", type=click.Path(path_type=Path), default=None,
                     help="PEM certificate chain for mutual TLS (with --client-key)."),
        click.option("--client-key", type=click.Path(path_type=Path), default=None,
                     help="PEM private key of --client-cert."),
        click.option("--token-file", type=click.Path(path_type=Path), default=None,
                     help="A file holding a bearer token."),
        click.option("--json", "as_json", is_flag=True, help="JSON instead of a table."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class Connection:
    def __init__(self, server: str, instance: str, tls_ca: Path | None,
                 client_cert: Path | None, client_key: Path | None,
                 token_file: Path | None, as_json: bool) -> None:
        self.server, self.instance, self.as_json = server, instance, as_json
        self.tls_ca, self.client_cert = tls_ca, client_cert
        self.client_key, self.token_file = client_key, token_file

    def call(self, method: Callable[[admin_grpc.AdminStub], Awaitable[Message]]) -> Any:
        """Run one Admin call; a gRPC error becomes a message and exit code 1."""
        from buildfleet.client.credentials import ClientCredentials
        from buildfleet.worker.config import open_channel

        credentials = ClientCredentials(tls_ca=self.tls_ca, client_cert=self.client_cert,
                                        client_key=self.client_key, token_file=self.token_file)
        try:
            credentials.check()
        except ValueError as error:
            raise click.BadParameter(str(error)) from None

        async def run() -> Message:
            async with open_channel(self.server, credentials) as channel:
                return await method(admin_grpc.AdminStub(channel))

        try:
            return asyncio.run(run())
        except grpc.aio.AioRpcError as error:
            raise click.ClickException(f"{error.code().name}: {error.details()}") from None
        except ValueError as error:  # a malformed --server
            raise click.BadParameter(str(error), param_hint="--server") from None

    def show(self, message: Message, table: Callable[[], list[str]]) -> None:
        if self.as_json:
            click.echo(json.dumps(MessageToDict(message, preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True),
                                  indent=2, sort_keys=True))
        else:
            for line in table():
                click.echo(line)


def connected(command: Callable[..., None]) -> Callable[..., None]:
    """Turn the connection options into a Connection passed as the first argument."""
    @functools.wraps(command)
    def run(server: str, instance: str, tls_ca: Path | None, client_cert: Path | None,
            client_key: Path | None, token_file: Path | None, as_json: bool,
            **arguments: Any) -> None:
        command(Connection(server, instance, tls_ca, client_cert, client_key, token_file,
                           as_json), **arguments)
    return run


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows,
                                                                       strict=True)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in (header, *rows)]


def _properties(properties: Sequence[admin_pb2.Property]) -> str:
    return ",".join(f"{p.name}={p.value}" for p in properties) or "-"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


@click.group()
def bots() -> None:
    """See the bots of an instance and drain them (the Admin API of a server)."""


@bots.command("list")
@click.argument("pattern", default="")
@connection_options
@connected
def list_bots(connection: Connection, pattern: str) -> None:
    """The live bots (whose id matches the glob PATTERN, if given)."""
    answer = connection.call(lambda admin: admin.ListBots(admin_pb2.ListBotsRequest(
        instance_name=connection.instance, bot_id_pattern=pattern), timeout=TIMEOUT))
    connection.show(answer, lambda: aligned(
        ["BOT", "STATUS", "DRAINING", "RUNNING", "PROPERTIES"],
        [[bot.bot_id, bot.status, "yes" if bot.draining else "no",
          f"{bot.running}/{bot.capacity}", _properties(bot.properties)] for bot in answer.bots]))


@bots.command("show")
@click.argument("bot_id")
@connection_options
@connected
def show_bot(connection: Connection, bot_id: str) -> None:
    """One bot: its session, status, properties and recent events."""
    bot = connection.call(lambda admin: admin.GetBot(admin_pb2.GetBotRequest(
        instance_name=connection.instance, bot_id=bot_id), timeout=TIMEOUT))

    def lines() -> list[str]:
        shown = [f"bot:        {bot.bot_id}", f"session:    {bot.session}",
                 f"status:     {bot.status}{' (draining)' if bot.draining else ''}",
                 f"running:    {bot.running} of {bot.capacity}",
                 f"registered: {bot.registered.ToDatetime().isoformat(sep=' ')}Z",
                 f"properties: {_properties(bot.properties)}"]
        if bot.events:
            shown.append("events:")
            shown += [f"  {event.time.ToDatetime().isoformat(sep=' ')}Z {event.type}: "
                      f"{event.message}" for event in bot.events]
        return shown

    connection.show(bot, lines)


def _drain_lines(drains: Sequence[admin_pb2.Drain]) -> list[str]:
    return aligned(["PATTERN", "SINCE", "DRAINS"],
                   [[d.pattern, d.created.ToDatetime().isoformat(sep=" ", timespec="seconds"),
                     ",".join(d.bot_ids) or "-"] for d in drains])


@bots.command("drain")
@click.argument("pattern")
@connection_options
@connected
def drain(connection: Connection, pattern: str) -> None:
    """Drain the bots matching PATTERN: a bot id glob (spot-*) or PROPERTY=VALUE-GLOB
    (pool=spot).  They finish what they run and take nothing new, also when they
    register later, until `undrain`."""
    answer = connection.call(lambda admin: admin.AddDrain(admin_pb2.AddDrainRequest(
        instance_name=connection.instance, pattern=pattern), timeout=TIMEOUT))
    connection.show(answer, lambda: _drain_lines([answer]))


@bots.command("undrain")
@click.argument("pattern")
@connection_options
@connected
def undrain(connection: Connection, pattern: str) -> None:
    """Lift the drain PATTERN (exactly as it was given to `drain`)."""
    answer = connection.call(lambda admin: admin.RemoveDrain(admin_pb2.RemoveDrainRequest(
        instance_name=connection.instance, pattern=pattern), timeout=TIMEOUT))
    connection.show(answer, lambda: [f"undrained {answer.pattern}"])


@bots.command("drains")
@connection_options
@connected
def drains(connection: Connection) -> None:
    """The drains of the instance and the live bots each one drains."""
    answer = connection.call(lambda admin: admin.ListDrains(admin_pb2.ListDrainsRequest(
        instance_name=connection.instance), timeout=TIMEOUT))
    connection.show(answer, lambda: _drain_lines(answer.drains))


@click.command()
@connection_options
@connected
def queues(connection: Connection) -> None:
    """Queued work per platform: how much, how old, and the bots that could take it."""
    answer = connection.call(lambda admin: admin.ListQueues(admin_pb2.ListQueuesRequest(
        instance_name=connection.instance), timeout=TIMEOUT))

    def lines() -> list[str]:
        table = aligned(["PLATFORM", "QUEUED", "OLDEST", "MATCHING BOTS", "AVAILABLE"],
                        [[_properties(q.requirements), str(q.queued),
                          _age(q.oldest_age.ToTimedelta().total_seconds()),
                          str(q.matching_bots), str(q.available_bots)]
                         for q in answer.queues])
        return [*table, f"executing: {answer.executing}"]

    connection.show(answer, lines)
