"""`buildfleet bots ...` and `buildfleet queues`: the operator's commands, over the
Admin API (buildfleet.admin.v1) of a running server.  Aligned tables by default,
`--json` for scripts; a refused or failed call exits 1 with the server's message."""

from __future__ import annotations

import asyncio
import functools
import json
import shlex
import sys
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
        return self.run(lambda channel: method(admin_grpc.AdminStub(channel)))

    def run(self, work: Callable[[grpc.aio.Channel], Awaitable[Any]]) -> Any:
        """Run `work` on a channel to the server; a gRPC error becomes a message and
        exit code 1."""
        from buildfleet.client.credentials import ClientCredentials
        from buildfleet.worker.config import open_channel

        credentials = ClientCredentials(tls_ca=self.tls_ca, client_cert=self.client_cert,
                                        client_key=self.client_key, token_file=self.token_file)
        try:
            credentials.check()
        except ValueError as error:
            raise click.BadParameter(str(error)) from None

        async def run() -> Any:
            async with open_channel(self.server, credentials) as channel:
                return await work(channel)

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
        ["BOT", "STATUS", "DRAINING", "RUNNING", "SEEN", "PROPERTIES"],
        [[bot.bot_id, bot.status, "yes" if bot.draining else "no",
          f"{bot.running}/{bot.capacity}", _seen(bot), _properties(bot.properties)]
         for bot in answer.bots]))


def _seen(bot: admin_pb2.Bot) -> str:
    silent = bot.silent_for.ToTimedelta().total_seconds()
    return "now" if silent < 1 else f"{_age(silent)} ago"


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
                 f"seen:       {_seen(bot)}",
                 f"registered: {_when(bot.registered)}",
                 f"properties: {_properties(bot.properties)}"]
        if bot.running_operations:
            shown.append("running:")
            shown += [f"  {op.name} (action {op.action_digest.hash[:12]})"
                      for op in bot.running_operations]
        if bot.events:
            shown.append("events:")
            shown += _event_lines(bot)
        return shown

    connection.show(bot, lines)


def _event_lines(bot: admin_pb2.Bot) -> list[str]:
    return [f"  {_when(event.time)} {event.type}: {event.message}" for event in bot.events]


@bots.command("events")
@click.argument("bot_id")
@connection_options
@connected
def bot_events(connection: Connection, bot_id: str) -> None:
    """The recent events a bot reported (PostBotEventTemp), oldest first."""
    bot = connection.call(lambda admin: admin.GetBot(admin_pb2.GetBotRequest(
        instance_name=connection.instance, bot_id=bot_id), timeout=TIMEOUT))
    events = admin_pb2.Bot(bot_id=bot.bot_id, events=bot.events)
    connection.show(events, lambda: [line.strip() for line in _event_lines(bot)] or ["(none)"])


def _drain_lines(drains: Sequence[admin_pb2.Drain]) -> list[str]:
    return aligned(["PATTERN", "SINCE", "DRAINS"],
                   [[d.pattern, _when(d.created), ",".join(d.bot_ids) or "-"] for d in drains])


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


@click.group()
def ops() -> None:
    """See and cancel the operations of an instance (the Admin API of a server)."""


def _when(stamp: Any) -> str:
    """A timestamp as UTC, to the second."""
    return (stamp.ToDatetime().isoformat(sep=" ", timespec="seconds") + "Z"
            if stamp.seconds else "-")


def _outcome(summary: admin_pb2.OperationSummary) -> str:
    if summary.stage != "COMPLETED":
        return "-"
    if summary.cached:
        return "cached"
    if summary.ran and summary.status == "OK":
        return f"exit {summary.exit_code}"
    return summary.status or "OK"


@ops.command("list")
@click.option("--stage", type=click.Choice(["QUEUED", "EXECUTING", "COMPLETED"],
                                           case_sensitive=False), default=None)
@click.option("--bot", "bot_id", default="", help="Only those this bot runs or ran.")
@click.option("--action", "action_hash", default="", metavar="HASH",
              help="Only those of this action digest's hash.")
@click.option("--submitter", default="", help="Only those of this principal.")
@click.option("--invocation", default="", metavar="ID",
              help="Only those of this build: a tool invocation id (Bazel's "
                   "--invocation_id), a correlated invocations id, or a build key.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="How many, newest first.")
@connection_options
@connected
def list_ops(connection: Connection, stage: str | None, bot_id: str, action_hash: str,
             submitter: str, invocation: str, limit: int) -> None:
    """The operations of the instance, newest first."""
    answer = connection.call(lambda admin: admin.ListOperations(
        admin_pb2.ListOperationsRequest(
            instance_name=connection.instance, stage=stage or "", bot_id=bot_id,
            action_hash=action_hash, submitter=submitter, invocation=invocation,
            page_size=limit),
        timeout=TIMEOUT))
    connection.show(answer, lambda: aligned(
        ["OPERATION", "STAGE", "OUTCOME", "QUEUED", "BOT", "ACTION", "MNEMONIC"],
        [[o.name, o.stage, _outcome(o), _when(o.queued), o.worker or "-",
          o.action_digest.hash[:12], o.request_metadata.action_mnemonic or "-"]
         for o in answer.operations]))


def _request_lines(summary: admin_pb2.OperationSummary) -> list[str]:
    """What the client said of the action (RequestMetadata), where it said anything."""
    metadata = summary.request_metadata
    tool = metadata.tool_details
    shown = [("tool", " ".join(p for p in (tool.tool_name, tool.tool_version) if p)),
             ("invocation", metadata.tool_invocation_id),
             ("correlated", metadata.correlated_invocations_id),
             ("build", summary.build), ("mnemonic", metadata.action_mnemonic),
             ("target", metadata.target_id), ("config", metadata.configuration_id)]
    return [f"{label + ':':11} {value}" for label, value in shown if value]


def _detail_lines(detail: admin_pb2.OperationDetail) -> list[str]:
    summary = detail.summary
    lines = [f"operation:  {summary.name}", f"stage:      {summary.stage}"
             + (" (cancelled)" if summary.cancelled else ""),
             f"action:     {summary.action_digest.hash}/{summary.action_digest.size_bytes}",
             f"submitter:  {summary.submitter or '-'}", f"bot:        {summary.worker or '-'}",
             f"attempts:   {summary.attempts}", f"priority:   {summary.priority}",
             *_request_lines(summary)]
    if summary.stage == "COMPLETED":
        lines.append(f"outcome:    {_outcome(summary)}"
                     + (f" ({summary.message})" if summary.message else ""))
    if detail.arguments:
        lines.append("command:    " + shlex.join(detail.arguments))
    if detail.working_directory:
        lines.append(f"in:         {detail.working_directory}")
    if detail.platform:
        lines.append(f"platform:   {_properties(detail.platform)}")
    metadata = detail.execution_metadata
    for label, stamp in (("queued", metadata.queued_timestamp),
                         ("started", metadata.worker_start_timestamp),
                         ("executed", metadata.execution_start_timestamp),
                         ("finished", metadata.execution_completed_timestamp),
                         ("reported", metadata.worker_completed_timestamp)):
        if stamp.seconds:
            lines.append(f"{label + ':':11} {_when(stamp)}")
    for label, digest in (("stdout", detail.stdout_digest), ("stderr", detail.stderr_digest)):
        if digest.hash:
            lines.append(f"{label + ':':11} blobs/{digest.hash}/{digest.size_bytes}")
    return lines


@ops.command("show")
@click.argument("name")
@connection_options
@connected
def show_op(connection: Connection, name: str) -> None:
    """One operation: its action's command and platform, its bot and its timeline."""
    detail = connection.call(lambda admin: admin.GetOperation(
        admin_pb2.GetOperationRequest(name=name), timeout=TIMEOUT))
    connection.show(detail, lambda: _detail_lines(detail))


@ops.command("cancel")
@click.argument("name")
@connection_options
@connected
def cancel_op(connection: Connection, name: str) -> None:
    """Cancel an operation (anyone's: the admin role)."""
    detail = connection.call(lambda admin: admin.CancelOperation(
        admin_pb2.CancelOperationRequest(name=name), timeout=TIMEOUT))
    connection.show(detail, lambda: [f"cancelled {detail.summary.name}"])


@ops.command("logs")
@click.argument("name")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing the output as the action produces it, until it ends "
                   "(waiting for a queued action to start).")
@click.option("--stderr", "which", flag_value="stderr", help="Standard error instead.")
@click.option("--stdout", "which", flag_value="stdout", default=True, hidden=True)
@connection_options
@connected
def op_logs(connection: Connection, name: str, follow: bool, which: str) -> None:
    """What an operation's action printed: live while it runs (where the server streams
    output), from its result once it is done."""
    from buildfleet.client.output import print_output

    def note(message: str) -> None:
        click.echo(message, err=True)

    async def work(channel: grpc.aio.Channel) -> None:
        await print_output(channel, name, which, follow, sys.stdout.buffer, note)

    connection.run(work)
