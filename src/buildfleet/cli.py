"""The `buildfleet` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from buildfleet import __version__
from buildfleet.admin_commands import bots, ops, queues
from buildfleet.config import ConfigError, load_config
from buildfleet.errors import Unavailable
from buildfleet.up import up
from buildfleet.worker.command import bot


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="buildfleet")
def main() -> None:
    """buildfleet: a remote-execution grid for Bazel and other REAPI v2 clients."""


@main.command()
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve on (repeatable). Default 127.0.0.1:50051.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where blobs, the action cache and scheduler state live. "
                   "Default ./buildfleet-data.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML configuration file (instances, storage backends, limits).")
@click.option("--database", default=None, metavar="PATH_OR_URL",
              help="Scheduler state: a SQLite file (relative to the data dir) or a "
                   "postgresql:// URL shared by several replicas. "
                   "Default scheduler.sqlite3.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--insecure", is_flag=True,
              help="Serve addresses other machines can reach without authentication "
                   "(refused otherwise).")
def serve(listen: tuple[str, ...], data_dir: Path | None, config_file: Path | None,
          database: str | None, log_level: str, insecure: bool) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C."""
    from buildfleet.postgres import UnusableDatabase
    from buildfleet.server.app import serve as run_server

    _setup_logging(log_level)
    try:
        config = load_config(config_file).with_overrides(listen=list(listen), data_dir=data_dir,
                                                         database=database, insecure=insecure)
    except (ConfigError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    try:
        asyncio.run(run_server(config))
    except (ConfigError, OSError, Unavailable, UnusableDatabase) as error:
        raise click.ClickException(str(error)) from None


@main.group()
def db() -> None:
    """Manage the scheduler database."""


@db.command()
@click.option("--database", default=None, metavar="URL",
              help="The postgresql:// URL (default: `database` from --config).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML configuration file whose `database` and `postgres` settings to use.")
def upgrade(database: str | None, config_file: Path | None) -> None:
    """Bring a PostgreSQL scheduler database to this buildfleet's schema.

    `buildfleet serve` does the same when it starts; this is for operators who
    prefer to migrate separately.
    """
    from buildfleet.config import is_postgres_url
    from buildfleet.postgres import UnusableDatabase
    from buildfleet.postgres import upgrade as upgrade_schema

    try:
        config = load_config(config_file).with_overrides(database=database)
    except (ConfigError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if not is_postgres_url(config.database):
        raise click.ClickException(
            f"{config.database} is a SQLite database, which migrates itself when "
            "`buildfleet serve` starts; `db upgrade` is for postgresql:// URLs "
            "(--database or `database` in --config)")
    try:
        before, after = asyncio.run(upgrade_schema(config.database, config.postgres))
    except (Unavailable, UnusableDatabase) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"schema version {before} -> {after}")


@main.group()
def auth() -> None:
    """Manage credentials."""


@auth.command()
@click.option("--principal", required=True, help="The name the token authenticates as.")
@click.option("--grant", "grants", multiple=True, metavar="ROLE[:INSTANCES]",
              help="A grant of the token (repeatable): read, execute, cache-write, bot or "
                   "admin, optionally on the instances matching a glob (execute:ci/*).")
@click.option("--tokens-file", type=click.Path(path_type=Path), default=None,
              help="Add the token's entry to this tokens file (created if missing; a "
                   "running server re-reads it). Without it the entry is printed.")
def token(principal: str, grants: tuple[str, ...], tokens_file: Path | None) -> None:
    """Make a bearer token: print it, and add its hash to a tokens file."""
    import yaml

    from buildfleet.auth.tokens import add_entries, digest, new_token
    from buildfleet.config import Role

    roles = [role.value for role in Role]
    for grant in grants:
        if grant.partition(":")[0] not in roles:
            raise click.BadParameter(f"{grant!r}: the role must be one of {', '.join(roles)}",
                                     param_hint="--grant")
    secret = new_token()
    entry = {"sha256": digest(secret), "principal": principal, "grants": list(grants)}
    if tokens_file is None:
        click.echo(yaml.safe_dump({"tokens": [entry]}, sort_keys=False), err=True, nl=False)
    else:
        try:
            add_entries(tokens_file, [entry])
        except ValueError as error:
            raise click.ClickException(f"not changed: {error}") from None
        click.echo(f"added a token of {principal!r} to {tokens_file}", err=True)
    click.echo(secret)


main.add_command(bot)  # `buildfleet bot`, defined with the bot in buildfleet.worker
main.add_command(bots)  # `buildfleet bots ...` and `buildfleet queues`: the Admin API
main.add_command(queues)
main.add_command(ops)
main.add_command(up)  # `buildfleet up`: server plus local bots, in buildfleet.up
