"""The replicated strategy: state in PostgreSQL, shared by several server replicas.
See `scheduler.py`."""

from buildfleet.scheduler.replicated.grid import ReplicatedGrid
from buildfleet.scheduler.replicated.scheduler import ReplicatedScheduler

__all__ = ["ReplicatedGrid", "ReplicatedScheduler"]
