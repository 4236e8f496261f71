"""Execution settings (each instance's `scheduler:`) and the scheduler database
(`database`, `postgres:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from buildfleet.config.base import Model


class SchedulerConfig(Model):
    """Execution on an instance: how actions are queued and handed to bots.

    The one settings model of the scheduler: both strategies read it as it is.
    Durations are seconds.
    """

    enabled: bool = True
    max_attempts: int = Field(default=5, ge=1)  # leases that may end in infrastructure failure
    keepalive: float = Field(default=60.0, gt=0)  # a silent session lives this long
    # A bot holding leases calls at least once per busy-poll; silent this long, its
    # leases go back to the queue (the session lives on until the keepalive).
    lease_timeout: float = Field(default=10.0, gt=0)
    long_poll: float = Field(default=60.0, gt=0)  # hold bound of an update without deadline
    busy_poll: float = Field(default=1.0, gt=0)  # hold bound while the bot runs leases
    default_timeout: float = Field(default=3600.0, gt=0)  # when the Action sets none
    max_timeout: float = Field(default=86400.0, gt=0)  # larger Action.timeout is refused
    timeout_grace: float = Field(default=30.0, ge=0)  # extra time before a job is ended
    unmatched_timeout: float = Field(default=300.0, gt=0)  # fail jobs no live bot can run
    max_queued: int = Field(default=100_000, ge=1)  # queued jobs before RESOURCE_EXHAUSTED
    fairness_share: float = Field(default=0.1, ge=0, le=1)  # picks that take the oldest job
    # Share the bots between builds (rules.matching.fair_order); off: by priority alone.
    fair_builds: bool = True
    # What makes a build (rules.invocations.build_key), the first that an operation has.
    fair_share_by: tuple[Literal["correlated", "invocation", "principal"], ...] = (
        "correlated", "invocation", "principal")
    # The most actions one build (invocation, or principal) runs at once; None: no limit.
    max_running_per_build: int | None = Field(default=None, ge=1)
    lease_offer: Literal["active", "pending"] = "active"
    # The bot that failed an action gets it again only when no other bot could run
    # it, and only after this delay (doubled per attempt, at most retry-backoff-max).
    retry_backoff: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=30.0, ge=0)
    completed_retention: float = Field(default=3600.0, gt=0)  # keep finished operations
    # Finished operations the embedded strategy keeps in memory (the most recent);
    # older ones are read back from the scheduler's database while they are retained.
    completed_in_memory: int = Field(default=10_000, ge=0)
    cache_failed_results: bool = False  # also cache results with a non-zero exit code
    bot_label_key: str = "OSFamily"  # property that labels bots in metrics
    # Platform properties that tell the bot how to run an action (its limits), not
    # which bots may: left out of matching, passed to the bot with the action.
    hint_properties: list[str] = Field(default_factory=lambda: ["memory", "pids"])
    housekeeping_interval: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _check_build_limit(self) -> SchedulerConfig:
        if self.max_running_per_build is not None and not self.fair_builds:
            raise ValueError("max-running-per-build counts each build's actions: it needs "
                             "fair-builds")
        return self

    @model_validator(mode="after")
    def _check_lease_timeout(self) -> SchedulerConfig:
        if self.lease_timeout <= self.busy_poll:
            raise ValueError(f"lease-timeout ({self.lease_timeout:g}) must be longer than "
                             f"busy-poll ({self.busy_poll:g}): a bot holding leases calls "
                             "once per busy-poll")
        return self

    @property
    def offer_pending(self) -> bool:
        """Offer leases PENDING with Any(Digest) payloads (older bots) instead of ACTIVE."""
        return self.lease_offer == "pending"

    @property
    def tick(self) -> float:
        """Seconds between housekeeping passes."""
        return self.housekeeping_interval


class PostgresConfig(Model):
    """The PostgreSQL connection pool, when `database` is a postgresql:// URL.

    `mode`: ``replicated`` (the default) keeps the scheduler's state in the
    database, so several `buildfleet serve` replicas can share it;
    ``single-server`` keeps it in the one server's memory and writes it behind to
    the database (the way SQLite is used): faster, but only one server process
    may use the database at a time.
    """

    mode: Literal["replicated", "single-server"] = "replicated"
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=10, ge=1)
    statement_timeout: float = Field(default=10.0, gt=0)  # seconds
    connect_timeout: float = Field(default=5.0, gt=0)  # seconds
    retry_after: float = Field(default=1.0, gt=0)  # the retry hint while it is down

    @model_validator(mode="after")
    def _check_pool(self) -> PostgresConfig:
        if self.pool_max < self.pool_min:
            raise ValueError(f"pool-max ({self.pool_max}) is below pool-min ({self.pool_min})")
        return self


def check_database(database: str) -> None:
    """ValueError unless `database` is a SQLite file path or a PostgreSQL URL."""
    if not database.strip():
        raise ValueError("the database must be a SQLite file or a postgresql:// URL, "
                         "not empty")
    if "://" in database and not database.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"the database must be a SQLite file or a postgresql:// URL, not "
                         f"{database.partition('://')[0]}://...")


def is_postgres_url(database: str) -> bool:
    """Whether a `database` setting names PostgreSQL rather than a SQLite file."""
    return database.startswith(("postgresql://", "postgres://"))


