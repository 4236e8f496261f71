"""PostgreSQL plumbing shared by the scheduler and the storage: a connection pool
that maps outages to UNAVAILABLE, and the versioned schema with its migrations."""

from buildfleet.postgres.database import (
    Database,
    UnusableDatabase,
    first_line,
    redact,
    retry_info,
    unavailable,
)
from buildfleet.postgres.migrations import migrate, upgrade

__all__ = ["Database", "UnusableDatabase", "first_line", "migrate", "redact", "retry_info",
           "unavailable", "upgrade"]
