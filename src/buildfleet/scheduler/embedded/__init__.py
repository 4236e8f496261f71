"""The embedded strategy: state in memory, written behind to a store (SQLite by
default, PostgreSQL for one server).  See `scheduler.py`."""

from buildfleet.scheduler.embedded.postgres import PostgresSchedulerStore
from buildfleet.scheduler.embedded.scheduler import EmbeddedScheduler
from buildfleet.scheduler.embedded.sqlite import SqliteSchedulerStore
from buildfleet.scheduler.embedded.store import MemorySchedulerStore, SchedulerStore

__all__ = ["EmbeddedScheduler", "MemorySchedulerStore", "PostgresSchedulerStore",
           "SchedulerStore", "SqliteSchedulerStore"]
